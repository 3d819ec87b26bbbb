"""The decoder forward pass in PyTorch, eager, over a paged KV cache: one decoder layer (`decoder_layer`) run
for every layer, over weights that weights.load_weights built from the spec's LayerSpecs (which Linears have
biases); the torch twin of backends/jax/model.

The cache is K [L, NB, KVH, Dh, bs] (transposed within a block) and V [L, NB, KVH, bs, Dh] in the KV-cache
dtype (the compute dtype unless --kv-cache-dtype says otherwise; scores and softmax are float32 either way),
the layout the decode kernel (csrc/kernels.cpp) reads with contiguous vector loops; a token's slot is
block * block_size + offset, as the block manager hands them out. Every step, prefill chunk or decode, is the
same computation: write the new tokens' K/V to their slots, attend causally from each new token's position over
its row's context (decode: csrc/kernels.cpp; prefill: `_prefill_attention`, csrc/prefill_attention.cpp, or
gathered blocks and torch ops where it is not built). Rows whose first slot is 0 (the null block) are bucket
padding and are not computed. A mixed step (mixed.py `forward_mixed`) runs decode rows and prefill chunks in one forward:
linear layers over their real tokens concatenated, attention split by row kind.

In bfloat16 the matmul inputs and the weights are bf16 but the residual stream is float32: hidden values of the
default model reach ~25,000, where bf16's spacing is 128, and a bf16 residual (as transformers keeps it) loses
most of what each layer adds. Norm weights are float32 for the same reason.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from kiln.backends.torch import kernels
from kiln.backends.torch.weights import Layer, Weights
from kiln.models.spec import LayerSpec, ModelSpec, MoeSpec


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


def _attention(q, k_ctx, v_ctx, mask, scale, softcap=None):
    """q [B, T, H, Dh] over context k [B, KVH, Dh, S] and v [B, KVH, S, Dh] with additive mask [B, T, S]
    -> [B, T, H * Dh].
    Scores and probabilities stay float32: bf16 scores (~100 in magnitude for attention-sink heads) round by
    ~0.5 and change the greedy output."""
    B, T, H, Dh = q.shape
    KVH = k_ctx.shape[1]
    G = H // KVH
    qg = q.float().view(B, T, KVH, G, Dh).permute(0, 2, 3, 1, 4).reshape(B, KVH, G * T, Dh)  # [B, KVH, G*T, Dh]
    s = torch.matmul(qg, k_ctx.float()).view(B, KVH, G, T, -1) * scale                # [B, KVH, G, T, S]
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s + mask[:, None, None]
    p = torch.softmax(s, -1).view(B, KVH, G * T, -1)
    o = torch.matmul(p, v_ctx.float())                                                # [B, KVH, G*T, Dh]
    return o.view(B, KVH, G, T, Dh).permute(0, 3, 1, 2, 4).reshape(B, T, H * Dh).to(q.dtype)


@dataclasses.dataclass
class _Step:
    """What every layer of one step shares: shapes, rope rows, and the attention path's metadata."""
    B: int                                 # rows computed (padding rows dropped)
    T: int                                 # new tokens per row (padded)
    H: int
    KVH: int
    Dh: int
    block_size: int
    cos: list[torch.Tensor]                # per rope table: [N, Dh] float32, the rows of this step's positions
    sin: list[torch.Tensor]
    tables: torch.Tensor                   # [B, nbt] the blocks of each row's context
    kernel: object = None                  # decode: the csrc/ module; else the torch-ops path below
    ctx_lens: torch.Tensor | None = None   # decode: [B] context lengths, the new token included
    prefill: object = None                 # not decode: the csrc/ prefill module, or None (torch ops)
    starts: torch.Tensor | None = None     # prefill kernel: [B] position of each row's first new token
    q_lens: torch.Tensor | None = None     # prefill kernel: [B] real new tokens per row
    masks: dict | None = None              # torch-ops: window (None: global) -> [B, T, S] additive mask
    new_blocks: torch.Tensor | None = None # torch-ops: [N] block and offset of each new token's slot
    new_offsets: torch.Tensor | None = None
    cos_t: list[torch.Tensor] | None = None   # torch-ops: per rope table, [B, T, 1, Dh] in the compute dtype
    sin_t: list[torch.Tensor] | None = None


def _qk_norm(qkv: torch.Tensor, lw: Layer, H: int, KVH: int, Dh: int, eps: float) -> torch.Tensor:
    """qkv [N, (H+2KVH)*Dh] with the q and k heads RMS-normed over head_dim (Qwen3, Gemma 3)."""
    N = qkv.shape[0]
    q = F.rms_norm(qkv[:, :H * Dh].float().view(N, H, Dh), (Dh,), lw.q_norm, eps)
    k = F.rms_norm(qkv[:, H * Dh:(H + KVH) * Dh].float().view(N, KVH, Dh), (Dh,), lw.k_norm, eps)
    return torch.cat([q.view(N, -1).to(qkv.dtype), k.view(N, -1).to(qkv.dtype), qkv[:, (H + KVH) * Dh:]], -1)


def _attend(st, ls: LayerSpec, lw: Layer, qkv: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
            scale: float) -> torch.Tensor:
    """RoPE, the new tokens' K/V written to their slots, attention over each row's context (the layer's
    window of it, for a sliding layer): qkv [N, (H+2KVH)*Dh] -> [N, H*Dh]. A mixed step (mixed.py) runs its
    decode rows through the decode kernel and its prefill rows through `_prefill_rows`."""
    if not isinstance(st, _Step):                      # a mixed step (torch/mixed.py) splits it by row kind
        return st.attend(ls, lw, qkv, kc, vc, scale)
    if st.kernel is not None:
        at = ls.attention
        return st.kernel.decode_attention(qkv.contiguous(), st.cos[lw.rope], st.sin[lw.rope], kc, vc, st.tables,
                                          st.ctx_lens, st.H, st.block_size, scale, at.window or 0)
    return _prefill_rows(st, ls, lw, qkv, kc, vc, scale)


def _prefill_rows(st: _Step, ls: LayerSpec, lw: Layer, qkv: torch.Tensor, kc: torch.Tensor,
                  vc: torch.Tensor, scale: float) -> torch.Tensor:
    """The prefill rows: qkv [B*T, (H+2KVH)*Dh] of rows padded to T (st.B, st.T) -> [B*T, H*Dh]; RoPE, K/V of
    every position written to its slot (padding positions: the null block), then `_prefill_attention`."""
    B, T, H, KVH, Dh = st.B, st.T, st.H, st.KVH, st.Dh
    at, r = ls.attention, lw.rope
    N = B * T
    qk = _rope(qkv[:, :(H + KVH) * Dh].view(B, T, H + KVH, Dh), st.cos_t[r], st.sin_t[r])  # [B, T, H+KVH, Dh]
    kc[st.new_blocks, :, :, st.new_offsets] = qk[:, :, H:].reshape(N, KVH, Dh).to(kc.dtype)  # [NB, KVH, Dh, bs]
    vc[st.new_blocks, :, st.new_offsets] = qkv[:, (H + KVH) * Dh:].reshape(N, KVH, Dh).to(vc.dtype)
    return _prefill_attention(st, at, qk[:, :, :H], kc, vc, scale)


def _prefill_attention(st: _Step, at, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """Causal attention of q [B, T, H, Dh] (rotated; the new tokens' K/V already in the cache) over each row's
    context -> [N, H*Dh]: csrc/prefill_attention.cpp straight from the cache blocks, or (no kernel) the blocks
    gathered into contiguous copies and torch ops under the [B, T, S] masks."""
    B, T, H, KVH, Dh = st.B, st.T, st.H, st.KVH, st.Dh
    if st.prefill is not None:
        return st.prefill.prefill_attention(q.contiguous(), kc, vc, st.tables, st.starts, st.q_lens, scale,
                                            at.window or 0, at.logit_softcap or 0.0).view(B * T, H * Dh)
    k_ctx = kc[st.tables].permute(0, 2, 3, 1, 4).reshape(B, KVH, Dh, -1)             # [B, KVH, Dh, S]
    v_ctx = vc[st.tables].permute(0, 2, 1, 3, 4).reshape(B, KVH, -1, Dh)             # [B, KVH, S, Dh]
    return _attention(q, k_ctx, v_ctx, st.masks[at.window], scale, at.logit_softcap).view(B * T, H * Dh)


ACT = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _moe(mlp: MoeSpec, lw: Layer, h: torch.Tensor) -> torch.Tensor:
    """The routed experts of h [N, D] (+ the sigmoid-gated shared expert) -> [N, D] float32. The N * k
    (token, expert) pairs are sorted by expert; each selected expert runs once, on its own tokens only."""
    N, k, act = h.shape[0], mlp.top_k, ACT[mlp.act]
    probs = torch.softmax(F.linear(h.float(), lw.router), -1)                    # [N, E] float32
    w, ids = probs.topk(k, -1)                                                    # [N, k]
    if mlp.norm_topk:
        w = w / w.sum(-1, keepdim=True)
    flat = ids.view(-1)
    order = flat.argsort(stable=True)                                             # [N*k] pairs by expert
    tok, ws = order // k, w.view(-1)[order]
    out = torch.zeros(N, h.shape[1])
    start = 0
    for e, n in enumerate(torch.bincount(flat, minlength=mlp.num_experts).tolist()):
        if n:
            t = tok[start:start + n]
            gate_up, down = lw.experts[e]
            g, u = gate_up(h[t]).chunk(2, -1)
            out.index_add_(0, t, down(act(g) * u).float() * ws[start:start + n, None])
            start += n
    if lw.shared is not None:
        gate_up, down, gate = lw.shared
        g, u = gate_up(h).chunk(2, -1)
        out += torch.sigmoid(F.linear(h.float(), gate)) * down(act(g) * u).float()
    return out


def decoder_layer(ls: LayerSpec, lw: Layer, st: _Step, x: torch.Tensor, delta: torch.Tensor | None,
                  kc: torch.Tensor, vc: torch.Tensor, kern, spec: ModelSpec, dt: torch.dtype) -> torch.Tensor:
    """One layer (`pre` or `sandwich` norms). x [N, D] float32 first takes the previous layer's `delta` (in
    place, fused into this layer's first norm); returns this layer's own delta, the MLP output [N, D], for the
    next norm to add. Biases are in lw's Linears where the LayerSpec has them (weights.load_weights)."""
    eps, D = spec.norm.eps, x.shape[-1]
    sandwich = ls.norms == "sandwich"
    h = _add_norm(kern, x, delta, lw.attn_norm, eps, dt)
    qkv = lw.qkv(h)                                                               # [N, (H+2KVH)*Dh]
    if ls.attention.qk_norm:
        qkv = _qk_norm(qkv, lw, st.H, st.KVH, st.Dh, eps)
    scale = ls.attention.scale if ls.attention.scale is not None else st.Dh ** -0.5
    a = lw.o(_attend(st, ls, lw, qkv, kc, vc, scale))                             # [N, D]
    if sandwich:
        a = F.rms_norm(a.float(), (D,), lw.post_attn_norm, eps)
    h = _add_norm(kern, x, a, lw.mlp_norm, eps, dt)
    if isinstance(ls.mlp, MoeSpec):
        m = _moe(ls.mlp, lw, h)                                                   # [N, D] float32
    else:
        g, u = lw.gate_up(h).chunk(2, -1)                                         # [N, F] each
        m = lw.down(ACT[ls.mlp.act](g) * u)                                       # [N, D]
    return F.rms_norm(m.float(), (D,), lw.post_mlp_norm, eps) if sandwich else m


def _step(spec: ModelSpec, w: Weights, block_size: int, pos: torch.Tensor, lens: torch.Tensor,
          slots: np.ndarray, tables: np.ndarray, positions: np.ndarray, q_lens: np.ndarray) -> _Step:
    """The step's shared metadata for rows pos [B, T] with lens [B] real tokens."""
    B, T = pos.shape
    Dh = spec.head_dim
    nbt = -(-int((positions[:B, 0] + q_lens[:B]).max()) // block_size)         # blocks of the longest context
    flat = pos.view(-1)
    st = _Step(B, T, spec.num_heads, spec.num_kv_heads, Dh, block_size,
               [c[flat] for c, _ in w.ropes], [s[flat] for _, s in w.ropes],      # [N, Dh] float32
               torch.from_numpy(np.ascontiguousarray(tables[:B, :nbt])).long())   # [B, nbt]
    softcap = any(l.attention.logit_softcap is not None for l in spec.layers)
    st.kernel = kernels.decode_kernel(Dh, block_size) if T == 1 and not softcap else None   # decode: csrc/
    if st.kernel is not None:
        st.ctx_lens = pos[:, 0] + 1
        return st
    st.prefill = kernels.prefill_kernel(block_size)                               # prefill: csrc/ or torch ops
    if st.prefill is not None:
        st.starts, st.q_lens = pos[:, 0].contiguous(), lens.contiguous()
    else:
        j = torch.arange(nbt * block_size)                                        # [S] context positions
        last = pos[:, :1] + lens[:, None] - 1                                     # [B, 1] last real position
        q_pos = torch.minimum(pos, last)[:, :, None]                              # [B, T, 1]
        causal = j[None, None, :] <= q_pos                                        # [B, T, S]
        st.masks = {}
        for window in {l.attention.window for l in spec.layers}:
            seen = causal if window is None else causal & (q_pos - j[None, None, :] < window)
            st.masks[window] = torch.zeros(seen.shape).masked_fill_(~seen, float("-inf"))   # [B, T, S]
    new_slots = torch.from_numpy(slots[:B]).long().reshape(-1)                    # [N]
    st.new_blocks, st.new_offsets = new_slots // block_size, new_slots % block_size
    dt = w.embed.dtype
    st.cos_t = [c.to(dt).view(B, T, 1, Dh) for c in st.cos]
    st.sin_t = [s.to(dt).view(B, T, 1, Dh) for s in st.sin]
    return st


@torch.inference_mode()
def forward(spec: ModelSpec, w: Weights, k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int,
            tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray, tables: np.ndarray,
            q_lens: np.ndarray, all_positions: bool = False):
    """One step over rows of new tokens [B, T] (q_lens[b] of them real) at positions [B, T] writing slots
    [B, T], each row's context in the blocks of tables [B, NBt]. Returns logits [n, V] (float32) of the last
    real token of the first n rows, the rows that are not padding; with all_positions, (those logits, the
    final-normed hidden state [n, T, D] float32 of every position: prompt logprobs and embeddings)."""
    n = int((slots[:, 0] != 0).sum())
    tok = torch.from_numpy(tokens[:n]).long()                                     # [n, T]
    pos = torch.from_numpy(positions[:n]).long()                                  # [n, T]
    lens = torch.from_numpy(q_lens[:n]).long()                                    # [n]
    B, T = tok.shape
    st = _step(spec, w, block_size, pos, lens, slots, tables, positions, q_lens)
    dt, D = w.embed.dtype, w.embed.shape[1]
    eps, kern = spec.norm.eps, kernels.load()
    x = w.embed[tok.view(-1)].float()              # [N, D] the residual stream stays float32 (see module doc)
    if spec.embed_scale is not None:
        x *= spec.embed_scale
    delta = None                                   # what the previous layer adds to x, added by the next norm
    for ls, lw, kc, vc in zip(spec.layers, w.layers, k_cache, v_cache):
        delta = decoder_layer(ls, lw, st, x, delta, kc, vc, kern, spec, dt)
    x += delta
    if all_positions:
        h = _add_norm(kern, x, None, w.norm, eps, torch.float32).view(B, T, D)  # [n, T, D] float32
        return head(spec, w, h[torch.arange(B), lens - 1].contiguous()), h
    x = x.view(B, T, D)[torch.arange(B), lens - 1].contiguous()                   # [n, D] last real token
    x = _add_norm(kern, x, None, w.norm, eps, torch.float32)                      # [n, D] float32
    return head(spec, w, x)


def head(spec: ModelSpec, w: Weights, x: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden [N, D] float32 -> logits [N, V] float32 (top few rescored in float32, soft-capped)."""
    logits = w.head(x.to(w.embed.dtype)).float()                                  # [N, V]
    if w.head32 is not None:
        _rescore_top(logits, x, w.head32)
    if spec.final_logit_softcap is not None:
        cap = spec.final_logit_softcap
        logits = cap * torch.tanh(logits / cap)
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
