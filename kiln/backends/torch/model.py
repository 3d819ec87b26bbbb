"""The Llama-family forward pass in PyTorch, eager, over a paged KV cache: the torch twin of backends/jax/model.

The cache is K [L, NB, KVH, Dh, bs] (transposed within a block) and V [L, NB, KVH, bs, Dh], float32
(attention runs in float32; see _attention), the layout the decode kernel (csrc/decode_attention.cpp) reads
with contiguous vector loops; a token's slot is block * block_size + offset, as the block manager hands them
out. Every step,
prefill chunk or decode, is the same computation: write the new tokens' K/V to their slots, gather each row's
context block by block, attend causally from each new token's position.

In bfloat16 the matmul inputs and the weights are bf16 but the residual stream is float32: hidden values of the
default model reach ~25,000, where bf16's spacing is 128, and a bf16 residual (as transformers keeps it) loses
most of what each layer adds. Norm weights are float32 for the same reason. Rows whose first slot is 0 (the null block) are bucket padding and are not computed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kiln.backends.torch import kernels
from kiln.backends.torch.weights import Weights
from kiln.models.spec import ModelSpec


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, N, Dh] rotated (HF rotate_half layout) by cos/sin [B, T, 1, Dh] of weights.rope_tables."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


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
    H, KVH, Dh = spec.num_heads, spec.num_kv_heads, spec.head_dim
    nbt = -(-int((positions[:n, 0] + q_lens[:n]).max()) // block_size)         # blocks of the longest context
    tab = torch.from_numpy(np.ascontiguousarray(tables[:n, :nbt])).long()        # [n, nbt]
    kernel = kernels.decode_kernel(Dh, block_size) if T == 1 else None           # decode: csrc/ kernel
    j = torch.arange(nbt * block_size)                                            # [S] context positions
    last = pos[:, :1] + lens[:, None] - 1                                         # [n, 1] last real position
    causal = j[None, None, :] <= torch.minimum(pos, last)[:, :, None]            # [n, T, S]
    mask = torch.zeros(causal.shape).masked_fill_(~causal, float("-inf"))        # [n, T, S]
    new_slots = torch.from_numpy(slots[:n]).long().reshape(-1)                    # [n*T]
    new_blocks, new_offsets = new_slots // block_size, new_slots % block_size
    cos, sin = w.cos[pos][:, :, None], w.sin[pos][:, :, None]                     # [n, T, 1, Dh]
    scale = Dh ** -0.5

    dt, D = w.embed.dtype, w.embed.shape[1]
    x = w.embed[tok].float()                       # [n, T, D] the residual stream stays float32 (see module doc)
    for layer, (kc, vc) in enumerate(zip(k_cache, v_cache)):
        lw = w.layers[layer]
        h = F.rms_norm(x, (D,), lw.ln1, spec.rms_norm_eps).to(dt)
        qkv = lw.qkv(h)                                                           # [n, T, (H+2KVH)*Dh]
        qk = _rope(qkv[..., :(H + KVH) * Dh].view(B, T, H + KVH, Dh), cos, sin)  # [n, T, H+KVH, Dh]
        v = qkv[..., (H + KVH) * Dh:].reshape(B * T, KVH, Dh)
        kc[new_blocks, :, :, new_offsets] = qk[:, :, H:].reshape(B * T, KVH, Dh).to(kc.dtype)  # [NB, KVH, Dh, bs]
        vc[new_blocks, :, new_offsets] = v.to(vc.dtype)                                      # [NB, KVH, bs, Dh]
        if kernel is not None:
            a = kernel.decode_attention(qk[:, 0, :H].float().contiguous(), kc, vc, tab, pos[:, 0] + 1,
                                        block_size, scale).view(B, 1, H * Dh).to(dt)   # [n, 1, H*Dh]
        else:
            k_ctx = kc[tab].permute(0, 2, 3, 1, 4).reshape(B, KVH, Dh, -1)           # [n, KVH, Dh, S]
            v_ctx = vc[tab].permute(0, 2, 1, 3, 4).reshape(B, KVH, -1, Dh)           # [n, KVH, S, Dh]
            a = _attention(qk[:, :, :H], k_ctx, v_ctx, mask, scale)               # [n, T, H*Dh]
        x += lw.o(a)
        h = F.rms_norm(x, (D,), lw.ln2, spec.rms_norm_eps).to(dt)
        g, u = lw.gate_up(h).chunk(2, -1)                                         # [n, T, F] each
        x += lw.down(F.silu(g) * u)
    x = x[torch.arange(B), lens - 1]                                              # [n, D] last real token
    x = F.rms_norm(x, (D,), w.norm, spec.rms_norm_eps)                            # [n, D] float32
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
