"""Tokenizer wrapper vs transformers on the default model, from GGUF and from the HF folder."""
from __future__ import annotations

import pytest

from kiln.models.gguf_loader import open_gguf
from kiln.models.spec import ModelError
from kiln.models.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

TEXTS = ["Hello world", "  leading spaces and\ttabs\nnewlines", "naïve café — 日本語 🙂", "<|im_start|>user",
         "def f(x):\n    return x ** 2"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


@pytest.fixture(scope="module")
def ref(default_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name, local_files_only=True)


@pytest.fixture(scope="module")
def tok(default_gguf):
    return Tokenizer.from_gguf(default_gguf)


@pytest.fixture(scope="module")
def tok_hf(default_hf_dir):
    return Tokenizer.from_hf_folder(default_hf_dir)


def test_encode_decode_match_transformers(tok, tok_hf, ref):
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text) == tok_hf.encode(text), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids)
    assert tok.encode("<|im_start|>user") == [1, 4093]  # special tokens are parsed, not spelled out
    assert tok.decode([1, 4093, 2]) == "user"


def test_chat_template_from_gguf_metadata(default_gguf, tok, tok_hf, ref):
    meta_template = open_gguf(default_gguf).fields["tokenizer.chat_template"].contents()
    assert tok.chat_template == meta_template
    ids = tok.apply_chat_template(CHAT)
    expect = ref.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == expect == tok_hf.apply_chat_template(CHAT)
    text = tok.render_chat(CHAT)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and text.endswith("<|im_start|>assistant\n")
    no_prompt = tok.apply_chat_template(CHAT, add_generation_prompt=False)
    assert ids[:len(no_prompt)] == no_prompt and len(ids) > len(no_prompt)


def test_properties(tok, tok_hf):
    for t in (tok, tok_hf):
        assert t.eos_token_id == 2 and t.bos_token_id == 1
        assert t.vocab_size == 49152
        assert set(t.all_special_ids) >= {0, 1, 2}
        assert t.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]


def test_no_chat_template_raises(default_hf_dir):
    t = Tokenizer.from_hf_folder(default_hf_dir)
    t.hf.chat_template = None
    with pytest.raises(ModelError, match="no chat template"):
        t.apply_chat_template(CHAT)


def test_bad_paths(tmp_path):
    with pytest.raises(ModelError):
        Tokenizer.from_hf_folder(tmp_path / "missing")
    with pytest.raises(ModelError):
        Tokenizer.from_hf_folder(tmp_path)  # exists, but holds no tokenizer
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelError):
        Tokenizer.from_gguf(bad)
