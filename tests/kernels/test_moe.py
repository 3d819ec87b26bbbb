"""kernels/moe.py against a hand-written loop over tokens and their chosen experts (numpy, float64)."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import jax.numpy as jnp

from kiln.kernels.moe import dense_experts, route, routed_experts


@pytest.mark.parametrize("n_tokens", [1, 3, 9])   # 1: pairs gather their expert's weights; 9: grouped ragged_dot
@pytest.mark.parametrize("norm_topk", [True, False])
def test_routed_and_dense_experts_match_a_plain_loop(n_tokens, norm_topk):
    r = np.random.default_rng(n_tokens)
    E, k, D, F = 6, 2, 8, 5
    x, router = r.standard_normal((n_tokens, D)), r.standard_normal((D, E))
    gate_up, down = r.standard_normal((E, D, 2 * F)), r.standard_normal((E, F, D))
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    w, ids = route(f32(x), f32(router), k, norm_topk)
    want = np.zeros((n_tokens, D))
    for n in range(n_tokens):
        logits = x[n] @ router
        p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        top = np.argsort(-p)[:k]
        assert sorted(top.tolist()) == sorted(np.asarray(ids[n]).tolist())
        pw = p[top] / p[top].sum() if norm_topk else p[top]
        for e, we in zip(top, pw):
            h = x[n] @ gate_up[e]
            g, u = h[:F], h[F:]
            want[n] += we * ((g / (1 + np.exp(-g)) * u) @ down[e])
    for fn in (routed_experts, dense_experts):
        got = np.asarray(fn(f32(x), w, ids, f32(gate_up), f32(down), jax.nn.silu))
        assert np.abs(got - want).max() < 1e-4, fn.__name__
