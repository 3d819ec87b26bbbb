"""Paged attention in pure jnp: the reference kernels every backend variant must match.

The KV cache is one array per K and V, `[L, NB, KVH, bs, D]` (layers, blocks, kv heads, block size, head
dim). Heads come before the token offset so that the blocks a row gathers transpose, in the same pass, into
`[B, KVH, S, D]`, the layout whose batched matmuls XLA:CPU runs fastest (7x the `[.., S, KVH, D]` layout's
attention time on this machine; see BENCHMARKS.md).

A step computes K/V for its new tokens, attends over the cached prefix plus those new tokens, and writes
them to the cache after the last layer. A sequence's tokens live in the blocks its block table lists, in
order, so token position p sits in block `table[p // bs]` at offset `p % bs`. Block 0 is the null block:
padding rows and padding tokens write there and their reads are masked, so its contents never matter.

Queries are grouped by kv head (`[B, KVH, G, T, D]`, G = heads per kv head): GQA without repeating K/V.
Masked scores use a large finite negative value, so fully padded rows give finite garbage, never NaN.

Sliding-window layers pass `window`: a query at position p sees keys at positions p - window < k <= p (itself
included; transformers' `sliding_window_overlay`). Gemma 2 caps scores with `softcap`: cap * tanh(s / cap).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30


def write_kv(cache: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """Scatter every layer's new K or V [L, N, KVH, D] into cache [L, NB, KVH, bs, D] at flat slots [N].

    One scatter after all layers, outside any loop, so a donated cache is updated in place (a cache carried
    through the layer loop is copied by XLA:CPU when a step writes a single slot).
    """
    bs = cache.shape[3]
    blocks, offsets = slots // bs, slots % bs                              # [N], [N]
    # advanced indices split by a slice put the index dim first: the update is [N, L, KVH, D]
    return cache.at[:, blocks, :, offsets].set(new.transpose(1, 0, 2, 3).astype(cache.dtype))


def gather_kv(cache: jax.Array, layer: jax.Array, block_tables: jax.Array) -> jax.Array:
    """The context of every row: [B, KVH, NBt * bs, D] from block tables [B, NBt]."""
    _, _, KVH, bs, D = cache.shape
    B, NBt = block_tables.shape
    blocks = cache[layer, block_tables]                                    # [B, NBt, KVH, bs, D]
    return blocks.transpose(0, 2, 1, 3, 4).reshape(B, KVH, NBt * bs, D)


def _partial(q, k, v, mask, scale, softcap=None):
    """Unnormalised attention over one key set.

    q [B, KVH, G, T, D], k/v [B, KVH, S, D], mask [B, T, S] -> (out [B, KVH, G, T, D] f32, max m and sum l
    of the exponentiated scores [B, KVH, G, T]).
    """
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(mask[:, None, None], s, MASK_VALUE)                     # [B, KVH, G, T, S]
    m = jnp.max(s, axis=-1)                                                # [B, KVH, G, T]
    p = jnp.exp(s - m[..., None])                                          # [B, KVH, G, T, S]
    l = jnp.sum(p, axis=-1)                                                # [B, KVH, G, T]
    out = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out, m, l


def paged_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_cache: jax.Array,
                    v_cache: jax.Array, layer: jax.Array, block_tables: jax.Array, prefix_lens: jax.Array,
                    q_lens: jax.Array, scale: float, *, prefix_always: bool = False, window=None,
                    softcap: float | None = None) -> jax.Array:
    """Causal attention of new tokens over a cached prefix plus themselves; prefill and decode alike.

    q [B, T, H, D], k_new/v_new [B, T, KVH, D]: the new tokens at positions prefix_lens[b] + t, t < q_lens[b].
    The prefix (positions < prefix_lens[b]: a prefix-cache hit, earlier chunks, or for decode the whole
    context) is read from the cache through block_tables [B, NBt]. Unless `prefix_always` (decode), that
    gather runs only when some row has a prefix. The two parts merge by their log-sum-exp. `window` (None, or
    a scalar: a traced per-layer value under the layer scan) limits each query to its last `window` positions.
    -> [B, T, H, D]
    """
    B, T, H, D = q.shape
    KVH = k_new.shape[2]
    qg = q.reshape(B, T, KVH, H // KVH, D).transpose(0, 2, 3, 1, 4)        # [B, KVH, G, T, D]
    t = jnp.arange(T)
    causal = t[None, :] <= t[:, None]                                      # [T(q), T(k)]
    if window is not None:
        causal = causal & (t[:, None] - t[None, :] < window)
    local_mask = causal[None] & (t[None, None, :] < q_lens[:, None, None])  # [B, T, T]
    out, m, l = _partial(qg, k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3), local_mask, scale,
                         softcap)

    def with_prefix(args):
        out, m, l = args
        k = gather_kv(k_cache, layer, block_tables)                        # [B, KVH, S, D]
        v = gather_kv(v_cache, layer, block_tables)
        S = k.shape[2]
        j = jnp.arange(S)
        pmask = jnp.broadcast_to((j[None, :] < prefix_lens[:, None])[:, None, :], (B, T, S))   # [B, T, S]
        if window is not None:                                             # query position - key position
            pmask = pmask & ((prefix_lens[:, None, None] + t[None, :, None]) - j[None, None, :] < window)
        out2, m2, l2 = _partial(qg, k, v, pmask, scale, softcap)
        m_new = jnp.maximum(m, m2)                                         # [B, KVH, G, T]
        a, a2 = jnp.exp(m - m_new), jnp.exp(m2 - m_new)
        return out * a[..., None] + out2 * a2[..., None], m_new, l * a + l2 * a2

    if prefix_always:
        out, m, l = with_prefix((out, m, l))
    else:
        out, m, l = jax.lax.cond(jnp.any(prefix_lens > 0), with_prefix, lambda args: args, (out, m, l))
    out = out / jnp.maximum(l, 1e-30)[..., None]                          # [B, KVH, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q.dtype)
