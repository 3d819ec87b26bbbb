"""kiln's forward pass and generation against Hugging Face transformers, the independent reference.

Logits: kiln's model code (`forward` + `lm_head`, the functions the runner's graphs are made of) is driven
through its paged KV cache the three ways the runner uses it: one-shot prefill, chunked prefill (later chunks
read earlier ones from the cache) and token-by-token decode; every position's logits must match transformers
in float32 within 1e-3. Block tables are scrambled so a wrong block lookup shows, and prompts span several
16-token blocks.

Generation: `kiln.LLM(...).generate` (scheduler, runner, compiled graphs, in-graph sampling) and transformers'
`generate` must give the same 32 greedy tokens.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import pytest

import jax  # noqa: E402
import torch  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kiln import LLM, SamplingParams  # noqa: E402
from kiln.backends.jax import model as M  # noqa: E402
from kiln.backends.jax.runner import JaxRunner  # noqa: E402
from kiln.engine.build import build_config  # noqa: E402
from kiln.models.loader import load_model  # noqa: E402
from tests.tiny import VARIANTS, load_hf, save_tiny_model  # noqa: E402

TOL = 1e-3
BLOCK = 16
PROMPT_LENS = (1, 7, 33, 50)   # 33 and 50 tokens span 3 and 4 blocks of 16
# compile only the buckets a test uses (warming every planned bucket is the compile tests' business)
LAZY = dict(warmup=False, allow_lazy_compile=True)


def prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed + n).integers(0, vocab, size=n).tolist()


@partial(jax.jit, static_argnames=("spec", "decode"), donate_argnums=(1, 2))
def _step(params, k_cache, v_cache, tokens, positions, slots, table, starts, lens, *, spec, decode):
    """One runner step's model part, returning every position's logits [B, T, V] instead of sampling."""
    attend = M.attend_fn(table, starts, lens, spec.head_dim ** -0.5, decode=decode)
    h, k_cache, v_cache = M.forward(spec, params, k_cache, v_cache, tokens, positions, slots, attend)
    return k_cache, v_cache, M.lm_head(params, h)


PREFILL_PAD = 64   # every prefill is padded to one bucket, as the runner pads to its buckets: one compile


class KilnForward:
    """kiln's forward over a paged cache, as the runner drives it, exposing every position's logits."""

    def __init__(self, spec, params, num_blocks: int = 24):
        self.spec, self.params = spec, params
        # the cache exactly as the runner lays it out
        config = build_config(spec, backend="jax", platform="cpu", dtype="float32", block_size=BLOCK,
                              num_blocks=num_blocks, max_model_len=128, warmup=False)
        self.shape = JaxRunner.from_params(spec=spec, config=config, params=params).k_cache.shape
        # a scrambled block table (block 0 is the null block), so positions are not block-contiguous
        self.table = np.random.default_rng(1).permutation(np.arange(1, num_blocks)).astype(np.int32)

    def _call(self, kv, ids: list[int], start: int, pad_to: int, decode: bool):
        n = len(ids)
        tokens = np.zeros((1, pad_to), np.int32)
        positions = np.zeros((1, pad_to), np.int32)
        slots = np.zeros((1, pad_to), np.int32)                      # padding writes go to null block 0
        pos = np.arange(start, start + n)
        tokens[0, :n], positions[0, :n] = ids, pos
        slots[0, :n] = self.table[pos // BLOCK] * BLOCK + pos % BLOCK
        k, v, logits = _step(self.params, *kv, tokens, positions, slots, self.table[None],
                             np.array([start], np.int32), np.array([n], np.int32), spec=self.spec, decode=decode)
        return (k, v), np.asarray(logits[0, :n])

    def logits(self, ids: list[int], *, chunk: int | None = None, decode_from: int | None = None) -> np.ndarray:
        """[T, V] logits of every position: prefill in chunks of `chunk` tokens (padded to PREFILL_PAD)
        up to `decode_from`, then decode one token at a time."""
        kv = (jnp.zeros(self.shape, jnp.float32), jnp.zeros(self.shape, jnp.float32))
        end = len(ids) if decode_from is None else decode_from
        chunk = chunk or end
        out = []
        for s in range(0, end, chunk):
            part = ids[s:min(s + chunk, end)]
            assert len(part) <= PREFILL_PAD
            kv, lg = self._call(kv, part, s, PREFILL_PAD, decode=False)
            out.append(lg)
        for s in range(end, len(ids)):
            kv, lg = self._call(kv, ids[s:s + 1], s, 1, decode=True)
            out.append(lg)
        return np.concatenate(out)


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy generate, with EOS neither stopping nor suppressed (kiln's ignore_eos)."""
    # eos_token_id=[]: None would fall back to the model's generation_config and stop at EOS
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, num_beams=1, max_new_tokens=n, eos_token_id=[], pad_token_id=0)
    new = out[0, len(ids):].tolist()
    assert len(new) == n
    return new


def kiln_greedy(llm: LLM, prompts: list[list[int]], n: int) -> list[list[int]]:
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    outs = llm.generate(prompts, sp)
    return [o.outputs[0].token_ids for o in outs]


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, what
    err = float(np.max(np.abs(ours - ref)))
    assert err <= TOL, f"{what}: max |dlogit| = {err:.2e} > {TOL}"


# -- tiny random models: every architecture feature ------------------------------------------------------

@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory):
    """(variant name, folder, HF reference model, kiln loaded model) per tiny variant."""
    folder = save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    loaded = load_model(str(folder), tmp_path_factory.getbasetemp())
    return request.param, folder, load_hf(folder), loaded


def test_tiny_logits_match_transformers(tiny):
    name, _, hf, loaded = tiny
    fwd = KilnForward(loaded.spec, M.params_from_hf(loaded.spec, loaded.tensors, jnp.float32))
    for n in PROMPT_LENS:
        ids = prompt(n, loaded.spec.vocab_size)
        ref = hf_logits(hf, ids)
        assert np.std(ref) > 0.5, "reference logits too flat to be a meaningful comparison"
        assert_close(fwd.logits(ids), ref, f"{name} prefill T={n}")
    ids = prompt(50, loaded.spec.vocab_size)
    ref = hf_logits(hf, ids)
    assert_close(fwd.logits(ids, chunk=BLOCK), ref, f"{name} chunked prefill (16-token chunks)")
    assert_close(fwd.logits(ids, chunk=20), ref, f"{name} chunked prefill (chunks not block-aligned)")
    assert_close(fwd.logits(ids, decode_from=13), ref, f"{name} prefill 13 then decode 37")


def test_tiny_greedy_matches_transformers(tiny):
    name, folder, hf, loaded = tiny
    llm = LLM(model=str(folder), dtype="float32", max_model_len=128, kv_cache_gib=0.01, max_num_seqs=4, **LAZY)
    prompts = [prompt(n, loaded.spec.vocab_size, seed=7) for n in (1, 7, 33)]
    ours = kiln_greedy(llm, prompts, 32)   # batched together: exercises batching and padding as well
    for p, got in zip(prompts, ours):
        want = hf_greedy(hf, p, 32)
        assert len(set(want)) > 3, f"{name}: reference continuation {want} is degenerate; change the weights"
        assert got == want, f"{name} prompt of {len(p)} tokens: kiln {got} != transformers {want}"


# -- the default model (SmolLM2-135M-Instruct): GGUF and HF folder ---------------------------------------

@pytest.fixture(scope="module")
def default_hf(default_hf_dir):
    return load_hf(default_hf_dir)


@pytest.fixture(scope="module")
def default_loaded(default_gguf, default_hf_dir, tmp_path_factory):
    return load_model(str(default_gguf), tmp_path_factory.getbasetemp()), \
        load_model(str(default_hf_dir), tmp_path_factory.getbasetemp())


@pytest.mark.slow
def test_default_logits_match_transformers(default_loaded, default_hf):
    from_gguf, from_folder = default_loaded
    assert from_gguf.spec == from_folder.spec
    V = from_gguf.spec.vocab_size
    fwd_g = KilnForward(from_gguf.spec, M.params_from_hf(from_gguf.spec, from_gguf.tensors, jnp.float32))
    fwd_f = KilnForward(from_folder.spec, M.params_from_hf(from_folder.spec, from_folder.tensors, jnp.float32))
    for n in (1, 7, 33):
        ids = prompt(n, V)
        ref = hf_logits(default_hf, ids)
        ours_g, ours_f = fwd_g.logits(ids), fwd_f.logits(ids)
        assert_close(ours_f, ref, f"default model (HF folder) T={n}")
        assert_close(ours_g, ref, f"default model (GGUF) T={n}")
        assert_close(ours_g, ours_f, f"default model GGUF vs HF folder T={n}")
    ids = prompt(40, V)
    assert_close(fwd_g.logits(ids, decode_from=20), hf_logits(default_hf, ids),
                 "default model (GGUF) prefill 20 then decode 20")


@pytest.mark.slow
def test_default_greedy_matches_transformers(default_gguf, default_hf):
    llm = LLM(model=str(default_gguf), dtype="float32", max_model_len=256, kv_cache_gib=0.05, **LAZY)
    tok = llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
               tok.encode("The quick brown fox jumps over the lazy dog. Once upon a time")]
    ours = kiln_greedy(llm, prompts, 32)
    for p, got in zip(prompts, ours):
        want = hf_greedy(default_hf, p, 32)
        assert got == want, f"default model, prompt {tok.decode(p)!r}: kiln {tok.decode(got)!r} != " \
                            f"transformers {tok.decode(want)!r}"


def test_sliding_window_models_may_exceed_their_window(tmp_path):
    """Sliding layers attend over their window only, so max_model_len is not capped at it (the tiny mistral
    and qwen2 variants above check the windowed logits and tokens past the window against transformers)."""
    folder = save_tiny_model(tmp_path, "mistral", sliding_window=8)
    loaded = load_model(str(folder), tmp_path)
    assert loaded.spec.sliding_window == 8
    assert build_config(loaded.spec, platform="cpu", max_model_len=64, num_blocks=32,
                        block_size=4).scheduler.max_model_len == 64
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        build_config(loaded.spec, platform="cpu", max_model_len=512, num_blocks=256, block_size=4)


def test_features_the_jax_layer_lacks_are_refused_by_name():
    import dataclasses

    from kiln.models.spec import ModelError, ModelSpec
    from kiln.models.tensors import expected_shapes
    spec = ModelSpec.from_hf_config({"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
                                     "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2})
    tensors = {n: np.zeros(s, np.float32) for n, s in expected_shapes(spec).items()}
    spec = dataclasses.replace(spec, layers=(dataclasses.replace(spec.layers[0], norms="post"),))
    with pytest.raises(ModelError, match="the jax backend does not implement post-norm layers yet"):
        M.params_from_hf(spec, tensors, jnp.float32)
