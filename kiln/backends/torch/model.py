"""The Llama-family forward pass in PyTorch, eager, over a paged KV cache: the torch twin of backends/jax/model.

The cache is K [L, NB, KVH, Dh, bs] (transposed within a block) and V [L, NB, KVH, bs, Dh] in the KV-cache
dtype (the compute dtype unless --kv-cache-dtype says otherwise; scores and softmax are float32 either way),
the layout the decode kernel (csrc/kernels.cpp) reads with contiguous vector loops; a token's slot is
block * block_size + offset, as the block manager hands them out. Every step, prefill chunk or decode, is the
same computation: write the new tokens' K/V to their slots, attend causally from each new token's position over
its row's context (decode: csrc/ kernel; prefill: gathered blocks and torch ops). Rows whose first slot is 0
(the null block) are bucket padding and are not computed.

In bfloat16 the matmul inputs and the weights are bf16 but the residual stream is float32: hidden values of the
default model reach ~25,000, where bf16's spacing is 128, and a bf16 residual (as transformers keeps it) loses
most of what each layer adds. Norm weights are float32 for the same reason.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kiln.backends.torch import kernels
from kiln.backends.torch.weights import Weights
from kiln.models.spec import ModelSpec


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, N, Dh] rotated (HF rotate_half layout) by cos/sin [B, T, 1, Dh] of weights.rope_tables
    (sin's first half negated, so rotate_half(x) * sin == roll(x, Dh/2) * sin)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def _add_norm(kern, x, delta, weight, eps, dtype):
    """x [N, D] float32 += delta (in place, when given); returns rms_norm(x) * weight in dtype."""
    if kern is not None:
        return kern.add_rms_norm(x, delta, weight, eps, dtype == torch.bfloat16)
    if delta is not None:
        x += delta
    return F.rms_norm(x, (x.shape[-1],), weight, eps).to(dtype)


def _attention(q, k_ctx, v_ctx, mask, scale):
    """q [B, T, H, Dh] over context k [B, KVH, Dh, S] and v [B, KVH, S, Dh] with additive mask [B, T, S]
    -> [B, T, H * Dh].
    Scores and probabilities stay float32: bf16 scores (~100 in magnitude for attention-sink heads) round by
    ~0.5 and change the greedy output."""
    B, T, H, Dh = q.shape
    KVH = k_ctx.shape[1]
    G = H // KVH
    qg = q.float().view(B, T, KVH, G, Dh).permute(0, 2, 3, 1, 4).reshape(B, KVH, G * T, Dh)  # [B, KVH, G*T, Dh]
    s = torch.matmul(qg, k_ctx.float())                                               # [B, KVH, G*T, S]
    s = s.view(B, KVH, G, T, -1) * scale + mask[:, None, None]                       # [B, KVH, G, T, S]
    p = torch.softmax(s, -1).view(B, KVH, G * T, -1)
    o = torch.matmul(p, v_ctx.float())                                                # [B, KVH, G*T, Dh]
    return o.view(B, KVH, G, T, Dh).permute(0, 3, 1, 2, 4).reshape(B, T, H * Dh).to(q.dtype)


@torch.inference_mode()
def forward(spec: ModelSpec, w: Weights, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int,
            tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray, tables: np.ndarray,
            q_lens: np.ndarray) -> torch.Tensor:
    """One step over rows of new tokens [B, T] (q_lens[b] of them real) at positions [B, T] writing slots
    [B, T], each row's context in the blocks of tables [B, NBt]. Returns logits [n, V] (float32) of the last
    real token of the first n rows, the rows that are not padding."""
    n = int((slots[:, 0] != 0).sum())
    tok = torch.from_numpy(tokens[:n]).long()                                     # [n, T]
    pos = torch.from_numpy(positions[:n]).long()                                  # [n, T]
    lens = torch.from_numpy(q_lens[:n]).long()                                    # [n]
    B, T = tok.shape
    N = B * T                                                                     # activations are [N, ...]
    H, KVH, Dh = spec.num_heads, spec.num_kv_heads, spec.head_dim
    nbt = -(-int((positions[:n, 0] + q_lens[:n]).max()) // block_size)         # blocks of the longest context
    tab = torch.from_numpy(np.ascontiguousarray(tables[:n, :nbt])).long()        # [n, nbt]
    cos, sin = w.cos[pos.view(-1)], w.sin[pos.view(-1)]                           # [N, Dh] float32
    scale = Dh ** -0.5
    dt, D = w.embed.dtype, w.embed.shape[1]
    kernel = kernels.decode_kernel(Dh, block_size) if T == 1 else None           # decode: csrc/ kernel
    if kernel is not None:
        ctx_lens = pos[:, 0] + 1                                                  # [n] the new token included
    else:
        j = torch.arange(nbt * block_size)                                        # [S] context positions
        last = pos[:, :1] + lens[:, None] - 1                                     # [n, 1] last real position
        causal = j[None, None, :] <= torch.minimum(pos, last)[:, :, None]        # [n, T, S]
        mask = torch.zeros(causal.shape).masked_fill_(~causal, float("-inf"))    # [n, T, S]
        new_slots = torch.from_numpy(slots[:n]).long().reshape(-1)                # [N]
        new_blocks, new_offsets = new_slots // block_size, new_slots % block_size
        cos_t, sin_t = cos.to(dt).view(B, T, 1, Dh), sin.to(dt).view(B, T, 1, Dh)

    eps, kern = spec.rms_norm_eps, kernels.load()
    x = w.embed[tok.view(-1)].float()              # [N, D] the residual stream stays float32 (see module doc)
    delta = None                                   # what the previous layer adds to x, added by the next norm
    for layer, (kc, vc) in enumerate(zip(k_cache, v_cache)):
        lw = w.layers[layer]
        h = _add_norm(kern, x, delta, lw.ln1, eps, dt)
        qkv = lw.qkv(h)                                                           # [N, (H+2KVH)*Dh]
        if kernel is not None:                                                    # rope, cache write, attention
            a = kernel.decode_attention(qkv, cos, sin, kc, vc, tab, ctx_lens, H, block_size, scale)  # [N, H*Dh]
        else:
            qk = _rope(qkv[:, :(H + KVH) * Dh].view(B, T, H + KVH, Dh), cos_t, sin_t)  # [n, T, H+KVH, Dh]
            kc[new_blocks, :, :, new_offsets] = qk[:, :, H:].reshape(N, KVH, Dh).to(kc.dtype)  # [NB, KVH, Dh, bs]
            vc[new_blocks, :, new_offsets] = qkv[:, (H + KVH) * Dh:].reshape(N, KVH, Dh).to(vc.dtype)
            k_ctx = kc[tab].permute(0, 2, 3, 1, 4).reshape(B, KVH, Dh, -1)           # [n, KVH, Dh, S]
            v_ctx = vc[tab].permute(0, 2, 1, 3, 4).reshape(B, KVH, -1, Dh)           # [n, KVH, S, Dh]
            a = _attention(qk[:, :, :H], k_ctx, v_ctx, mask, scale).view(N, H * Dh)
        h = _add_norm(kern, x, lw.o(a), lw.ln2, eps, dt)
        g, u = lw.gate_up(h).chunk(2, -1)                                         # [N, F] each
        delta = lw.down(F.silu(g) * u)
    x += delta
    x = x.view(B, T, D)[torch.arange(B), lens - 1].contiguous()                   # [n, D] last real token
    x = _add_norm(kern, x, None, w.norm, eps, torch.float32)                      # [n, D] float32
    logits = w.head(x.to(dt)).float()                                             # [n, V]
    if w.head32 is not None:
        _rescore_top(logits, x, w.head32)
    return logits


RESCORE_TOP = 8


def _rescore_top(logits: torch.Tensor, x: torch.Tensor, head32: torch.Tensor) -> None:
    """Recompute the top RESCORE_TOP logits of each row in float32, in place.

    A bf16 matmul rounds its output to bf16: logits near 25 land on a 0.125 grid, so two candidates a few
    hundredths apart in float32 tie or swap, and greedy decoding picks the wrong one. The winners are among
    the top few of the rounded logits; their exact float32 values cost RESCORE_TOP dot products per row."""
    top = logits.topk(RESCORE_TOP, -1).indices                                     # [n, K]
    exact = torch.einsum("nd,nkd->nk", x, head32[top])                            # [n, K]
    logits.scatter_(1, top, exact)
