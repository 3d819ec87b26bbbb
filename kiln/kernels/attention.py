"""Paged attention in pure jnp: the reference kernels every backend variant must match.

The KV cache is one array per K and V, `[L, NB, bs, KVH, D]` (layers, blocks, block size, kv heads, head dim).
A step computes K/V for its new tokens, attends over the cached prefix plus those new tokens, and
writes them to the cache after the last layer. A sequence's tokens live in the blocks its block table lists, in order, so token position p sits in block
`table[p // bs]` at offset `p % bs`. Block 0 is the null block: padding rows and padding tokens write there
and their reads are masked, so its contents never matter.

Queries are grouped by kv head (`[.., KVH, G, D]`, G = heads per kv head), which is GQA without repeating K/V.
Masked scores use a large finite negative value, so fully padded rows give finite garbage, never NaN.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30


def write_kv(cache: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """Scatter every layer's new K or V [L, N, KVH, D] into cache [L, NB, bs, KVH, D] at flat slots [N].

    One scatter after all layers, outside any loop, so a donated cache is updated in place (a cache carried
    through the layer loop is copied by XLA:CPU when a step writes a single slot).
    """
    L, NB, bs, KVH, D = cache.shape
    flat = cache.reshape(L, NB * bs, KVH, D)                              # [L, NB*bs, KVH, D]
    return flat.at[:, slots].set(new.astype(cache.dtype)).reshape(cache.shape)


def gather_kv(cache: jax.Array, layer: jax.Array, block_tables: jax.Array) -> jax.Array:
    """The context of every row: [B, NBt * bs, KVH, D] from block tables [B, NBt]."""
    _, _, bs, KVH, D = cache.shape
    B, NBt = block_tables.shape
    blocks = cache[layer, block_tables]                                    # [B, NBt, bs, KVH, D]
    return blocks.reshape(B, NBt * bs, KVH, D)


def _scores(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
    # q [B, T, KVH, G, D], k [B, S, KVH, D] -> [B, KVH, G, T, S]
    return jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale


def _partial(q, k, v, mask, scale):
    """Unnormalised attention over one key set: (out [B,T,KVH,G,D] f32, row max m, row sum l [B,KVH,G,T])."""
    s = jnp.where(mask[:, None, None], _scores(q, k, scale), MASK_VALUE)  # [B, KVH, G, T, S]
    m = jnp.max(s, axis=-1)                                                # [B, KVH, G, T]
    p = jnp.exp(s - m[..., None])                                          # [B, KVH, G, T, S]
    l = jnp.sum(p, axis=-1)                                                # [B, KVH, G, T]
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out, m, l


def _group(q: jax.Array, num_kv_heads: int) -> jax.Array:
    B, T, H, D = q.shape
    return q.reshape(B, T, num_kv_heads, H // num_kv_heads, D)             # [B, T, KVH, G, D]


def paged_attention(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_cache: jax.Array,
                    v_cache: jax.Array, layer: jax.Array, block_tables: jax.Array, prefix_lens: jax.Array,
                    q_lens: jax.Array, scale: float, *, prefix_always: bool = False) -> jax.Array:
    """Causal attention of new tokens over a cached prefix plus themselves; prefill and decode alike.

    q [B, T, H, D], k_new/v_new [B, T, KVH, D]: the new tokens at positions prefix_lens[b] + t, t < q_lens[b].
    The prefix (positions < prefix_lens[b]: a prefix-cache hit, earlier chunks, or for decode the whole
    context) is read from the cache through block_tables [B, NBt]. Unless `prefix_always` (decode), that
    gather runs only when some row has a prefix. The two parts merge by their log-sum-exp. -> [B, T, H, D]
    """
    B, T, H, D = q.shape
    KVH = k_new.shape[2]
    qg = _group(q, KVH)                                                    # [B, T, KVH, G, D]
    t = jnp.arange(T)
    local_mask = (t[None, :] <= t[:, None])[None] & (t[None, None, :] < q_lens[:, None, None])  # [B, T, T]
    out, m, l = _partial(qg, k_new, v_new, local_mask, scale)

    def with_prefix(args):
        out, m, l = args
        k = gather_kv(k_cache, layer, block_tables)                        # [B, S, KVH, D]
        v = gather_kv(v_cache, layer, block_tables)
        pmask = jnp.broadcast_to((jnp.arange(k.shape[1])[None, :] < prefix_lens[:, None])[:, None, :],
                                 (B, T, k.shape[1]))                       # [B, T, S]
        out2, m2, l2 = _partial(qg, k, v, pmask, scale)
        m_new = jnp.maximum(m, m2)                                         # [B, KVH, G, T]
        a, a2 = jnp.exp(m - m_new), jnp.exp(m2 - m_new)
        to_btkg = lambda x: x.transpose(0, 3, 1, 2)[..., None]            # [B, T, KVH, G, 1]
        return out * to_btkg(a) + out2 * to_btkg(a2), m_new, l * a + l2 * a2

    if prefix_always:
        out, m, l = with_prefix((out, m, l))
    else:
        out, m, l = jax.lax.cond(jnp.any(prefix_lens > 0), with_prefix, lambda args: args, (out, m, l))
    out = out / jnp.maximum(l, 1e-30).transpose(0, 3, 1, 2)[..., None]    # [B, T, KVH, G, D]
    return out.reshape(B, T, H, D).astype(q.dtype)
