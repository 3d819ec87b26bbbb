"""Routed vs dense-all-experts MoE: decode tokens/s of a small random Mixtral-shaped model at batch 1 and 64.

    PYTHONPATH=. python scripts/bench_moe.py [--experts 8 --top-k 2 --hidden 512 --ffn 1024 --layers 4]

Both backends: jax (kernels/moe.routed_experts, a sorted grouped `lax.ragged_dot`, against dense_experts, every
expert on every token) and torch (backends/torch/model._moe, each selected expert on its own tokens, against
every expert on every token). One decode step of B rows (one token each, 64 tokens of context) is timed;
tokens/s = B / step time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def spec_and_tensors(a):
    from kiln.models.spec import ModelSpec
    from kiln.models.tensors import expected_shapes
    spec = ModelSpec.from_hf_config({
        "architectures": ["MixtralForCausalLM"], "vocab_size": 1024, "hidden_size": a.hidden,
        "intermediate_size": a.ffn, "num_hidden_layers": a.layers, "num_attention_heads": 8,
        "num_key_value_heads": 2, "num_local_experts": a.experts, "num_experts_per_tok": a.top_k})
    rng = np.random.default_rng(0)
    return spec, {n: (rng.standard_normal(s) * s[-1] ** -0.5).astype(np.float32)
                  for n, s in expected_shapes(spec).items()}


def step_arrays(B: int, ctx: int, bs: int = 16):
    nbt = -(-(ctx + 1) // bs)
    tables = (1 + np.arange(B * nbt, dtype=np.int32)).reshape(B, nbt)
    positions = np.full((B, 1), ctx, np.int32)
    slots = tables[:, ctx // bs:ctx // bs + 1] * bs + ctx % bs
    return np.zeros((B, 1), np.int32), positions, slots.astype(np.int32), tables, np.full(B, ctx, np.int32)


def bench_jax(spec, tensors, B, routed, ctx=64, bs=16):
    import jax
    import jax.numpy as jnp
    from kiln.backends.jax import model as M
    from kiln.kernels import moe
    M.EXPERTS = moe.routed_experts if routed else moe.dense_experts
    params = M.params_from_hf(spec, tensors, jnp.float32)
    tok, pos, slots, tables, starts = step_arrays(B, ctx, bs)
    shape = (spec.num_layers, B * tables.shape[1] + 1, spec.num_kv_heads, bs, spec.head_dim)
    kc = vc = jnp.zeros(shape, jnp.float32)

    @jax.jit
    def step(params, kc, vc):
        attend = M.attend_fn(tables, starts, jnp.ones_like(starts), spec.head_dim ** -0.5, decode=True)
        h, kc, vc = M.forward(spec, params, kc, vc, tok, pos, slots, attend)
        return M.lm_head(params, h[:, 0])
    return B / _median_s(lambda: jax.block_until_ready(step(params, kc, vc)))


def bench_torch(spec, tensors, B, routed, ctx=64, bs=16):
    import torch
    from kiln.backends.torch import model as TM
    from kiln.backends.torch.weights import load_weights
    w = load_weights(spec, tensors, torch.float32, False, 256)
    TM._moe = _ROUTED_TORCH.setdefault("fn", TM._moe)
    if not routed:
        def dense(mlp, lw, h):   # every expert on every token, weighted by a mostly-zero [N, E] gate matrix
            probs = torch.softmax(torch.nn.functional.linear(h.float(), lw.router), -1)
            top, ids = probs.topk(mlp.top_k, -1)
            gates = torch.zeros_like(probs).scatter_(1, ids, top / top.sum(-1, keepdim=True))
            out = torch.zeros(h.shape[0], h.shape[1])
            for e, (gate_up, down) in enumerate(lw.experts):
                g, u = gate_up(h).chunk(2, -1)
                out += down(torch.nn.functional.silu(g) * u).float() * gates[:, e:e + 1]
            return out
        TM._moe = dense
    tok, pos, slots, tables, _ = step_arrays(B, ctx, bs)
    L, NB = spec.num_layers, B * tables.shape[1] + 1
    kc = torch.zeros(L, NB, spec.num_kv_heads, spec.head_dim, bs)
    vc = torch.zeros(L, NB, spec.num_kv_heads, bs, spec.head_dim)
    lens = np.ones(B, np.int32)
    return B / _median_s(lambda: TM.forward(spec, w, kc, vc, bs, tok, pos, slots, tables, lens))


_ROUTED_TORCH: dict = {}


def _median_s(fn, reps: int = 10) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--backends", default="jax,torch")
    a = ap.parse_args()
    spec, tensors = spec_and_tensors(a)
    print(f"Mixtral-shaped: {a.layers} layers, hidden {a.hidden}, {a.experts} experts of {a.ffn}, top-{a.top_k}")
    for backend in a.backends.split(","):
        fn = bench_jax if backend == "jax" else bench_torch
        for B in map(int, a.batches.split(",")):
            r, d = fn(spec, tensors, B, True), fn(spec, tensors, B, False)
            print(f"{backend:5s} batch {B:3d}: routed {r:9.1f} tok/s   dense {d:9.1f} tok/s   ({r / d:.2f}x)")


if __name__ == "__main__":
    main()
