"""csrc/prefill_attention.cpp against independent references: a float64 numpy attention written out here and
kiln/kernels/attention.paged_attention (pure jnp, the semantics every backend matches).

One call holds several rows of different lengths (1, 7, 33, 100 new tokens) with cached prefixes that are and are
not block-aligned, over scrambled block tables of a cache laid out as the torch runner lays it out
(K [NB, KVH, Dh, bs], V [NB, KVH, bs, Dh]); GQA ratios 1, 2, 4, 8; global and sliding layers; Gemma 2's soft-cap;
float32 and bfloat16 caches and queries; the vector path (AVX2 here) and the scalar fallback.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.backends.platform import cpu_flags
from kiln.backends.torch import kernels

ROWS = [(0, 1), (5, 7), (19, 33), (16, 100), (15, 2)]   # (cached prefix = first position, new tokens) per row
KVH = 2


@pytest.fixture(scope="module")
def kern():
    k = kernels.load_prefill()
    assert k is not None, "the prefill-attention kernel did not build on this machine"
    return k


def make_case(G: int, Dh: int, bs: int, cache_dtype, q_dtype, seed: int = 0):
    """q [B, T, H, Dh] and a paged cache whose rows' blocks are scrambled; block 0 (null) in no table."""
    g = torch.Generator().manual_seed(seed)
    B, T, H = len(ROWS), max(n for _, n in ROWS), G * KVH
    nbt = max(-(-(s + n) // bs) for s, n in ROWS)
    NB = B * nbt + 1
    tables = (torch.randperm(NB - 1, generator=g)[:B * nbt] + 1).view(B, nbt).long()
    kc = torch.randn(NB, KVH, Dh, bs, generator=g).to(cache_dtype)
    vc = torch.randn(NB, KVH, bs, Dh, generator=g).to(cache_dtype)
    q = (torch.randn(B, T, H, Dh, generator=g) * 2).to(q_dtype)     # * 2: peakier softmax rows
    starts = torch.tensor([s for s, _ in ROWS])
    q_lens = torch.tensor([n for _, n in ROWS])
    return q, kc, vc, tables, starts, q_lens


def reference(q, kc, vc, tables, starts, q_lens, scale, window, softcap):
    """float64 numpy: for query t of row b at p = start + t, softmax over keys k <= p (and p - k < window)."""
    q, kc, vc = (x.double().numpy() for x in (q, kc, vc))
    B, T, H, Dh = q.shape
    G, bs = H // KVH, kc.shape[3]
    out = np.zeros_like(q)
    for b in range(B):
        S = int(starts[b] + q_lens[b])
        blk = tables[b].numpy()[np.arange(S) // bs]
        off = np.arange(S) % bs
        k = kc[blk, :, :, off]                                                  # [S, KVH, Dh]
        v = vc[blk, :, off, :]                                                  # [S, KVH, Dh]
        p = int(starts[b]) + np.arange(int(q_lens[b]))                          # [t] query positions
        seen = np.arange(S)[None, :] <= p[:, None]                              # [t, S]
        if window:
            seen &= p[:, None] - np.arange(S)[None, :] < window
        for hq in range(H):
            s = q[b, :len(p), hq] @ k[:, hq // G].T * scale                     # [t, S]
            if softcap:
                s = softcap * np.tanh(s / softcap)
            s = np.where(seen, s, -np.inf)
            e = np.exp(s - s.max(-1, keepdims=True))
            out[b, :len(p), hq] = (e / e.sum(-1, keepdims=True)) @ v[:, hq // G]
    return out


@pytest.mark.parametrize("portable", [False, True], ids=["simd", "scalar"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (12, 0.0), (0, 5.0), (20, 5.0)])
@pytest.mark.parametrize("G", [1, 2, 4, 8])
def test_matches_float64_reference(kern, G, window, softcap, cache_dtype, portable):
    if not portable and {"avx2", "fma"} <= cpu_flags():
        assert kern.simd(), "this machine has AVX2+FMA: the vector path must be built"
    Dh, bs = 64, 16
    args = make_case(G, Dh, bs, cache_dtype, torch.float32, seed=G)
    got = kern.prefill_attention(*args, Dh ** -0.5, window, softcap, portable)
    want = reference(*args, Dh ** -0.5, window, softcap)
    np.testing.assert_allclose(got.numpy(), want, atol=3e-5, rtol=0)
    pad = args[5][:, None] <= torch.arange(args[0].shape[1])[None, :]          # [B, T] padding tokens
    assert (got[pad] == 0).all(), "padding tokens must come out as zeros"


@pytest.mark.parametrize("Dh,bs", [(16, 16), (24, 32), (128, 16)])
def test_head_dims_and_block_sizes(kern, Dh, bs):
    """Head dims with a vector tail (24) or several register chunks (128); tiles inside 32-token blocks."""
    for portable in (False, True):
        args = make_case(4, Dh, bs, torch.float32, torch.float32, seed=Dh)
        got = kern.prefill_attention(*args, 0.3, 12, 0.0, portable)
        np.testing.assert_allclose(got.numpy(), reference(*args, 0.3, 12, 0.0), atol=3e-5, rtol=0)


def test_bf16_queries_give_bf16_output(kern):
    args = make_case(2, 64, 16, torch.bfloat16, torch.bfloat16, seed=5)
    got = kern.prefill_attention(*args, 0.125)
    assert got.dtype == torch.bfloat16
    want = reference(*args, 0.125, 0, 0.0)                              # from the same bf16 inputs
    np.testing.assert_allclose(got.float().numpy(), want, atol=2e-2, rtol=1e-2)   # bf16 output rounding


@pytest.mark.parametrize("window,softcap", [(None, None), (12, 5.0)])
def test_matches_jnp_paged_attention(kern, window, softcap):
    """kernels/attention.paged_attention reads the new tokens' K/V from k_new/v_new and the prefix from its
    [L, NB, KVH, bs, Dh] cache: the same numbers in its layout must give the same output."""
    import jax.numpy as jnp

    from kiln.kernels.attention import paged_attention
    q, kc, vc, tables, starts, q_lens = make_case(4, 32, 16, torch.float32, torch.float32, seed=9)
    B, T = q.shape[:2]
    bs = kc.shape[3]
    k_j = kc.permute(0, 1, 3, 2).numpy()[None]                                  # [1, NB, KVH, bs, Dh]
    v_j = vc.numpy()[None]
    pos = (starts[:, None] + torch.arange(T)[None, :]).clamp(max=tables.shape[1] * bs - 1)   # [B, T]
    blk = torch.gather(tables, 1, pos // bs).numpy()
    k_new = k_j[0][blk, :, (pos % bs).numpy()]                                  # [B, T, KVH, Dh]
    v_new = v_j[0][blk, :, (pos % bs).numpy()]
    want = paged_attention(jnp.asarray(q.numpy()), jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(k_j),
                           jnp.asarray(v_j), 0, jnp.asarray(tables.numpy()), jnp.asarray(starts.numpy()),
                           jnp.asarray(q_lens.numpy()), 0.2, window=window, softcap=softcap)
    got = kern.prefill_attention(q, kc, vc, tables, starts, q_lens, 0.2, window or 0, softcap or 0.0)
    real = (torch.arange(T)[None, :] < q_lens[:, None]).numpy()                # [B, T]
    np.testing.assert_allclose(got.numpy()[real], np.asarray(want)[real], atol=5e-5, rtol=0)


def test_threads_split_the_tasks_and_agree(kern):
    """The same call on 1 and 2 threads gives the same bits (each task owns its output rows)."""
    args = make_case(8, 64, 16, torch.float32, torch.float32, seed=3)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kern.prefill_attention(*args, 0.125, 0, 0.0)
        torch.set_num_threads(2)
        two = kern.prefill_attention(*args, 0.125, 0, 0.0)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)


def test_bad_shapes_are_refused(kern):
    q, kc, vc, tables, starts, q_lens = make_case(2, 64, 16, torch.float32, torch.float32)
    with pytest.raises(RuntimeError, match="block tables"):
        kern.prefill_attention(q, kc, vc, tables, starts + 64, q_lens, 0.125)
    with pytest.raises(RuntimeError, match="multiple of the cache's kv heads"):
        kern.prefill_attention(q[:, :, :3].contiguous(), kc, vc, tables, starts, q_lens, 0.125)
