"""An LLMEngine over the MockRunner (backends/mock.py) and the tiny byte-level tokenizer of tests/tiny.py:
engine, server and batch tests run on it in milliseconds, with outputs computable by hand."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from kiln.backends.mock import MockRunner
from kiln.engine.build import build_config
from kiln.engine.llm_engine import LLMEngine
from kiln.models.spec import ModelSpec
from kiln.models.tokenizer import Tokenizer
from tests.tiny import BOS, EOS, VOCAB, save_tokenizer

TINY_CONFIG = dict(architectures=["LlamaForCausalLM"], vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                   rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS)


@functools.cache
def tiny_tokenizer() -> Tokenizer:
    folder = Path(tempfile.mkdtemp(prefix="kiln-mock-tok-"))
    save_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text().replace(
        '"tokenizer_class"', '"chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}\\n'
        '{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",\n  "tokenizer_class"', 1))
    return Tokenizer.from_hf_folder(folder)


def mock_spec(**overrides) -> ModelSpec:
    return ModelSpec.from_hf_config({**TINY_CONFIG, **overrides})


def mock_engine(**kwargs) -> LLMEngine:
    """An LLMEngine on the MockRunner; kwargs are engine.build.build_config's (max_num_seqs, max_model_len, ...)."""
    spec = mock_spec()
    kwargs.setdefault("max_model_len", 256)
    kwargs.setdefault("num_blocks", 128)
    config = build_config(spec, model="mock", platform="cpu", backend="mock", dtype="float32", free_bytes=2**34,
                          **kwargs)
    runner = MockRunner(spec=spec, config=config, tensors={})
    return LLMEngine(config, spec, runner, tiny_tokenizer())
