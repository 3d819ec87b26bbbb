"""The torch backend against Hugging Face transformers, the independent reference.

Logits: backends/torch/model.forward, driven through its paged cache the ways the runner drives it (one-shot
prefill, chunked prefill, token-by-token decode, several rows with padding), must match transformers in float32
within 1e-3 at the last position of every step. Block tables are scrambled so a wrong block lookup shows.
bfloat16 (the CPU default) must stay close to the float32 reference. The int4 copies are checked for being
exact where they claim to be, and the whole engine's greedy tokens must equal transformers' generate.
"""
from __future__ import annotations

import numpy as np
import pytest

import torch  # noqa: E402

from kiln import LLM  # noqa: E402
from kiln.backends.platform import resolve_backend  # noqa: E402
from kiln.backends.torch import model as TM  # noqa: E402
from kiln.backends.torch.weights import GROUP, Linear, load_weights, lossless_int4  # noqa: E402
from kiln.models.loader import load_model  # noqa: E402
from tests.backends.test_model_vs_hf import (BLOCK, LAZY, PROMPT_LENS, assert_close, hf_greedy, hf_logits,  # noqa: E402
                                             kiln_greedy, prompt)
from tests.tiny import VARIANTS, load_hf, save_tiny_model  # noqa: E402

NUM_BLOCKS = 24


class TorchForward:
    """The torch model over a paged cache laid out as the runner lays it out, with a scrambled block table."""

    def __init__(self, spec, tensors, dtype=torch.float32, int4=False):
        self.spec = spec
        self.w = load_weights(spec, tensors, dtype, int4, 256)
        L, KVH, Dh = spec.num_layers, spec.num_kv_heads, spec.head_dim
        self.k = torch.zeros(L, NUM_BLOCKS, KVH, Dh, BLOCK)            # the runner's layout (TorchRunner._new_cache)
        self.v = torch.zeros(L, NUM_BLOCKS, KVH, BLOCK, Dh)
        perm = np.random.default_rng(1).permutation(np.arange(1, NUM_BLOCKS)).astype(np.int32)
        self.tables = [perm[:8], perm[8:16]]                         # two rows' blocks, 0 (null) in neither

    def step(self, rows: list[tuple[list[int], int]], pad_rows: int = 0, pad_to: int | None = None) -> np.ndarray:
        """rows: (new token ids, start position) per row, row i using table i. Returns last logits [n, V]."""
        T = pad_to or max(len(ids) for ids, _ in rows)
        B = len(rows) + pad_rows
        tokens, positions, slots = (np.zeros((B, T), np.int32) for _ in range(3))
        tables = np.zeros((B, 8), np.int32)
        lens = np.zeros(B, np.int32)
        for i, (ids, start) in enumerate(rows):
            pos = np.arange(start, start + len(ids))
            tokens[i, :len(ids)], positions[i, :len(ids)] = ids, pos
            slots[i, :len(ids)] = self.tables[i][pos // BLOCK] * BLOCK + pos % BLOCK
            tables[i], lens[i] = self.tables[i], len(ids)
        return TM.forward(self.spec, self.w, self.k, self.v, BLOCK, tokens, positions, slots, tables,
                          lens).numpy()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, folder, load_hf(folder), load_model(str(folder), tmp_path_factory.getbasetemp())


@pytest.fixture(params=["kernel", "torch-ops"])
def decode_path(request, monkeypatch):
    """Decode and prefill attention by the csrc/ kernels, or by the torch-ops fallback used where they cannot be
    built."""
    from kiln.backends.torch import kernels
    if request.param == "kernel":
        assert kernels.load() is not None, "the decode-attention kernel did not build on this machine"
        assert kernels.prefill_kernel(BLOCK) is not None, "the prefill-attention kernel did not build"
    else:
        monkeypatch.setattr(kernels, "load", lambda: None)
        monkeypatch.setattr(kernels, "prefill_kernel", lambda block_size: None)
    return request.param


def test_tiny_logits_match_transformers(tiny, decode_path):
    from kiln.backends.torch import kernels
    name, _, hf, loaded = tiny
    spec, V = loaded.spec, loaded.spec.vocab_size
    assert (kernels.decode_kernel(spec.head_dim, BLOCK) is not None) == (decode_path == "kernel")
    for n in PROMPT_LENS:
        ids = prompt(n, V)
        ref = hf_logits(hf, ids)
        fwd = TorchForward(spec, loaded.tensors)
        assert_close(fwd.step([(ids, 0)], pad_rows=2, pad_to=64)[0], ref[-1], f"{name} prefill T={n}")
    ids = prompt(50, V)
    ref = hf_logits(hf, ids)
    for chunk in (BLOCK, 20):
        fwd = TorchForward(spec, loaded.tensors)
        for s in range(0, 50, chunk):
            part = ids[s:s + chunk]
            assert_close(fwd.step([(part, s)])[0], ref[s + len(part) - 1], f"{name} chunk of {chunk} at {s}")
    fwd = TorchForward(spec, loaded.tensors)
    other = prompt(9, V, seed=3)
    got = fwd.step([(ids[:13], 0), (other, 0)])                       # two rows of different lengths
    assert_close(got[0], ref[12], f"{name} prefill 13 beside a 9-token row")
    assert_close(got[1], hf_logits(hf, other)[-1], f"{name} the 9-token row")
    for s in range(13, 50):                                            # decode beside the other row
        got = fwd.step([(ids[s:s + 1], s), (other[:1], 9)], pad_rows=1)
        assert_close(got[0], ref[s], f"{name} decode at position {s}")


def test_tiny_bf16_close_to_float32_reference(tiny):
    name, _, hf, loaded = tiny
    ids = prompt(33, loaded.spec.vocab_size)
    ref = hf_logits(hf, ids)[-1]
    got = TorchForward(loaded.spec, loaded.tensors, torch.bfloat16).step([(ids, 0)])[0]
    err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert err < 0.05, f"{name}: bf16 logits off the float32 reference by {err:.3f} of their range"
    assert got.argmax() == ref.argmax()


def test_tiny_greedy_matches_transformers(tiny):
    name, folder, hf, loaded = tiny
    llm = LLM(model=str(folder), backend="torch", dtype="float32", max_model_len=128, kv_cache_gib=0.01,
              max_num_seqs=4, **LAZY)
    assert llm.engine.config.backend == "torch"
    prompts = [prompt(n, loaded.spec.vocab_size, seed=7) for n in (1, 7, 33)]
    for p, got in zip(prompts, kiln_greedy(llm, prompts, 32)):
        want = hf_greedy(hf, p, 32)
        assert got == want, f"{name} prompt of {len(p)} tokens: kiln {got} != transformers {want}"


def _q4_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A [n, k] float32 weight as a GGUF Q4_1 tensor dequantises: per 32 inputs, min + q * step, where the
    quantiser maps each group's min to q = 0 and its max to q = 15."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // GROUP, GROUP), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    step = torch.rand(n, k // GROUP, 1, generator=g) * 0.01 + 1e-3
    lo = torch.randn(n, k // GROUP, 1, generator=g) * 0.05
    return (lo + q * step).reshape(n, k)


def test_int4_copy_is_exact_for_4bit_weights_only():
    w = _q4_weight(64, 128)
    packed = lossless_int4(w)
    assert packed is not None
    assert lossless_int4(w + torch.randn_like(w) * 1e-3) is None      # 17+ levels per group: not 4-bit
    lin = Linear.of(w.bfloat16(), None, packed)
    assert hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"), \
        "oneDNN weight packing (torch.ops.mkldnn private ops) is gone from this torch"
    # bf16 packing needs AVX-512 (or AVX-NE-CONVERT); float32 packs on any x86 CPU; unpacked weights use F.linear
    assert lin.packed == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert Linear.of(w).packed
    x = torch.randn(3, 128).bfloat16()
    ref = x.float() @ w.T
    dense = torch.nn.functional.linear(x, w.bfloat16()).float()
    got = lin(x).float()                                               # 3 tokens: the int4 kernel
    assert torch.allclose(Linear.of(w.bfloat16())(x.repeat(8, 1)).float()[:3], dense, atol=2e-2)  # 24: oneDNN
    scale = ref.abs().max()
    assert (got - ref).abs().max() / scale < 2e-2
    assert (got - ref).abs().max() <= 2 * (dense - ref).abs().max() + 1e-2 * scale   # as close as bf16


@pytest.mark.slow
def test_default_model_bf16_int4_answers_like_transformers(default_gguf, default_hf_dir):
    """The CPU default (bf16 + the GGUF's 4-bit weights kept 4-bit) on the default model: the greedy answer to
    a chat prompt equals transformers' in float32 on the same weights."""
    llm = LLM(model=str(default_gguf), backend="torch", max_model_len=256, kv_cache_gib=0.05, **LAZY)
    runner = llm.engine.runner
    assert llm.engine.config.dtype == "bfloat16" and runner.params.num_int4 == 4 * llm.engine.spec.num_layers
    tok = llm.tokenizer
    p = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    got = kiln_greedy(llm, [p], 8)[0]
    assert got == hf_greedy(load_hf(default_hf_dir), p, 8), tok.decode(got)


def test_resolve_backend():
    assert resolve_backend("jax", "cpu") == "jax"
    assert resolve_backend("torch", "cpu") == "torch"
    assert resolve_backend("auto", "gpu") == "jax"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("tpu-native", "cpu")
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend("torch", "gpu")


@pytest.mark.parametrize("window", [0, 20])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 24, 64, 128])
def test_decode_kernel_matches_plain_attention(head_dim, cache_dtype, window):
    """The csrc/ decode kernel (rope, cache write, attention over scrambled blocks, GQA 9:3) against the same
    math written plainly in torch, for each head_dim code path and cache dtype; window 20: a sliding layer
    (the 64-token row sees its last 20 positions, starting inside a block)."""
    from kiln.backends.torch import kernels
    kern = kernels.decode_kernel(head_dim, BLOCK)
    assert kern is not None
    g = torch.Generator().manual_seed(head_dim)
    B, H, KVH, Dh, NB = 3, 9, 3, head_dim, 20
    kc = torch.randn(NB, KVH, Dh, BLOCK, generator=g).to(cache_dtype)
    vc = torch.randn(NB, KVH, BLOCK, Dh, generator=g).to(cache_dtype)
    tables = torch.randperm(NB - 1, generator=g)[:B * 4].view(B, 4).long() + 1
    ctx = torch.tensor([1, 17, 64])                                    # one token, a block edge, full blocks
    qkv = torch.randn(B, (H + 2 * KVH) * Dh, generator=g)
    f = torch.rand(B, Dh // 2, generator=g) * 3
    cos, sin = torch.cat([f.cos(), f.cos()], -1), torch.cat([-f.sin(), f.sin()], -1)
    k_ref, v_ref = kc.clone(), vc.clone()
    out = kern.decode_attention(qkv, cos, sin, kc, vc, tables, ctx, H, BLOCK, Dh ** -0.5, window)

    rope = lambda x: x * cos[:, None] + x.roll(Dh // 2, -1) * sin[:, None]      # [B, N, Dh]
    q = rope(qkv[:, :H * Dh].view(B, H, Dh))
    k_new, v_new = rope(qkv[:, H * Dh:(H + KVH) * Dh].view(B, KVH, Dh)), qkv[:, (H + KVH) * Dh:].view(B, KVH, Dh)
    for b in range(B):
        p = int(ctx[b]) - 1
        blk, off = tables[b, p // BLOCK], p % BLOCK
        k_ref[blk, :, :, off], v_ref[blk, :, off] = k_new[b].to(cache_dtype), v_new[b].to(cache_dtype)
    tol = 1e-5 if cache_dtype == torch.float32 else 1e-2            # rope rounds differently (fused multiply-add)
    assert torch.allclose(kc.float(), k_ref.float(), rtol=tol, atol=tol), "the new token's K is wrong or misplaced"
    assert torch.equal(vc, v_ref), "the new token's V landed in the wrong slot"
    for b in range(B):
        S = int(ctx[b])
        t0 = max(0, S - window) if window else 0
        keys = k_ref[tables[b]].permute(0, 3, 1, 2).reshape(-1, KVH, Dh)[t0:S].float()   # [S - t0, KVH, Dh]
        vals = v_ref[tables[b]].permute(0, 2, 1, 3).reshape(-1, KVH, Dh)[t0:S].float()
        kk, vv = keys.repeat_interleave(H // KVH, 1), vals.repeat_interleave(H // KVH, 1)   # [S, H, Dh]
        w = torch.softmax(torch.einsum("hd,shd->hs", q[b], kk) * Dh ** -0.5, -1)
        want = torch.einsum("hs,shd->hd", w, vv).reshape(-1)
        assert torch.allclose(out[b], want, atol=1e-5), f"row {b}: {(out[b] - want).abs().max()}"


def test_add_rms_norm_kernel_matches_torch():
    from kiln.backends.torch import kernels
    kern = kernels.load()
    x, delta, w = torch.randn(5, 96) * 30, torch.randn(5, 96).bfloat16(), torch.rand(96) + 0.5
    x_ref = x + delta.float()
    want = torch.nn.functional.rms_norm(x_ref, (96,), w, 1e-5)
    got = kern.add_rms_norm(x, delta, w, 1e-5, False)
    assert torch.allclose(x, x_ref) and torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert kern.add_rms_norm(x, None, w, 1e-5, True).dtype == torch.bfloat16


def test_backend_dtype_and_kv_cache_dtype_resolution(tiny):
    from kiln.engine.build import build_config
    spec = tiny[3].spec
    make = lambda **kw: build_config(spec, platform="cpu", max_model_len=64, num_blocks=8, **kw)
    torch_cfg = make(backend="torch")
    assert (torch_cfg.backend, torch_cfg.dtype, torch_cfg.kv_dtype) == ("torch", "bfloat16", "bfloat16")
    assert make(backend="torch", kv_cache_dtype="float32").kv_dtype == "float32"
    jax_cfg = make(backend="jax")
    assert (jax_cfg.dtype, jax_cfg.kv_dtype) == ("float32", "float32")
    with pytest.raises(ValueError, match="kv_cache_dtype=bfloat16 needs backend torch"):
        make(backend="jax", kv_cache_dtype="bfloat16")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        make(backend="torch", kv_cache_dtype="fp8")


def test_kernel_build_recovers_from_a_stale_lock():
    """A build killed half-way leaves torch's lock file; the next start must not wait on it forever.

    The lock goes into this session's built kernels (so ninja has nothing to rebuild): kept, torch's builder
    would wait on it without end."""
    import os
    import time as _time
    from pathlib import Path

    from kiln.backends.torch import kernels
    built = kernels.load()
    assert built is not None
    lock = Path(built.__file__).parent / "lock"
    lock.write_text("")
    old = _time.time() - kernels.STALE_LOCK_S - 10
    os.utime(lock, (old, old))
    kernels.load.cache_clear()
    try:   # load() keeps what it loads here: the session's build, as later tests expect
        assert kernels.load() is not None and not lock.exists()
    finally:
        lock.unlink(missing_ok=True)


def test_features_the_torch_layer_lacks_are_refused_by_name():
    import dataclasses

    from kiln.models.spec import ModelError, ModelSpec
    from kiln.models.tensors import expected_shapes
    spec = ModelSpec.from_hf_config({"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
                                     "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2})
    tensors = {n: np.zeros(s, np.float32) for n, s in expected_shapes(spec).items()}
    spec = dataclasses.replace(spec, layers=(dataclasses.replace(spec.layers[0], norms="post"),))
    with pytest.raises(ModelError, match="the torch backend does not implement post-norm layers yet"):
        load_weights(spec, tensors, torch.float32, False, 16)
