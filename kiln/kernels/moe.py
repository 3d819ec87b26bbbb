"""Mixture-of-experts MLP in pure jnp: softmax top-k routing and two ways to run the experts.

    route(x, router, top_k, norm_topk)        -> weights [N, k] (float32), expert ids [N, k]
    routed_experts(x, ...)                     the selected experts only: the N*k (token, expert) pairs sorted
                                               by expert, each expert's group through its own weights by one
                                               grouped matmul (`lax.ragged_dot`), scattered back weighted (few
                                               pairs: each gathers its expert's weights)
    dense_experts(x, ...)                      every expert on every token, weighted by a mostly-zero [N, E]
                                               gate matrix: the baseline scripts/bench_moe.py measures against

Expert weights are stacked: gate_up [E, D, 2F] (gate | up along the last axis) and down [E, F, D].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def route(x: jax.Array, router: jax.Array, top_k: int, norm_topk: bool) -> tuple[jax.Array, jax.Array]:
    """x [N, D], router [D, E] -> (weights [N, k] float32, ids [N, k] int32): softmax over all experts, the
    top k, renormalised to sum to 1 when `norm_topk` (Mixtral; Qwen-MoE's norm_topk_prob)."""
    probs = jax.nn.softmax(jnp.einsum("nd,de->ne", x, router, preferred_element_type=jnp.float32), axis=-1)
    w, ids = jax.lax.top_k(probs, top_k)                                  # [N, k]
    if norm_topk:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return w, ids.astype(jnp.int32)


def routed_experts(x, w, ids, gate_up, down, act) -> jax.Array:
    """x [N, D], routing (w, ids) [N, k], gate_up [E, D, 2F], down [E, F, D] -> [N, D].
    With no more pairs than experts (decode at small batch) each pair gathers its expert's weights instead:
    only the chosen experts' weights are read (XLA:CPU's ragged_dot touches every group)."""
    N, k = ids.shape
    E = gate_up.shape[0]
    if N * k <= E:
        gu = jnp.einsum("nd,nkdf->nkf", x, gate_up[ids])                  # [N, k, 2F]
        g, u = jnp.split(gu, 2, axis=-1)
        y = jnp.einsum("nkf,nkfd->nkd", (act(g) * u).astype(x.dtype), down[ids],
                       preferred_element_type=jnp.float32)                # [N, k, D]
        return jnp.einsum("nkd,nk->nd", y, w).astype(x.dtype)
    flat = ids.reshape(-1)                                                 # [N*k] expert of each pair
    order = jnp.argsort(flat, stable=True)                                 # pairs grouped by expert
    tok = order // k                                                       # [N*k] token of each sorted pair
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)                 # [E] pairs per expert
    xs = x[tok]                                                            # [N*k, D]
    gu = jax.lax.ragged_dot(xs, gate_up, sizes)                            # [N*k, 2F]
    g, u = jnp.split(gu, 2, axis=-1)
    y = jax.lax.ragged_dot((act(g) * u).astype(x.dtype), down, sizes)      # [N*k, D]
    y = y.astype(jnp.float32) * w.reshape(-1)[order][:, None]
    return jnp.zeros((N, x.shape[1]), jnp.float32).at[tok].add(y).astype(x.dtype)


def dense_experts(x, w, ids, gate_up, down, act) -> jax.Array:
    """The same result computing every expert for every token (E/k times the FLOPs)."""
    E = gate_up.shape[0]
    gates = jnp.zeros((x.shape[0], E), jnp.float32).at[jnp.arange(x.shape[0])[:, None], ids].set(w)   # [N, E]
    gu = jnp.einsum("nd,edf->enf", x, gate_up)                             # [E, N, 2F]
    g, u = jnp.split(gu, 2, axis=-1)
    y = jnp.einsum("enf,efd->end", act(g) * u, down, preferred_element_type=jnp.float32)   # [E, N, D]
    return jnp.einsum("end,ne->nd", y, gates).astype(x.dtype)
