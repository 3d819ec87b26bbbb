"""Where the time of one decode step and one prefill step goes, on the default model.

Times, each as the median of repeated runs of a separately jitted piece with the step's real shapes:
the whole step as the runner runs it (host side included), the forward pass, the layer matmuls alone,
paged attention alone (gather + softmax), the KV-cache write, the LM head and sampling (greedy and top-p).

    .venv/bin/python scripts/profile_step.py [--batch 64] [--context 160] [--prompt-len 512]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import timeit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=160, help="tokens already in each decode row's cache")
    ap.add_argument("--prompt-len", type=int, default=512, help="prefill: one row of this many tokens")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()

    from kiln.backends.jax import model as M
    from kiln.engine.llm import build_engine
    from kiln.engine.sampling_params import SamplingParams
    from kiln.engine.scheduler_output import ScheduledRow, SchedulerOutput
    from kiln.kernels.attention import paged_attention, write_kv
    from kiln.kernels.sampling import build_sampling_tensors, sample

    engine = build_engine(a.model, dtype=a.dtype, max_num_seqs=a.batch, max_model_len=1024, warmup=False)
    runner, spec, cfg = engine.runner, engine.spec, engine.config
    p, bs = runner.params, cfg.cache.block_size
    B, ctx = a.batch, a.context
    nb = -(-(ctx + 1) // bs)
    L, H, KVH, Dh, D = spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.hidden_size
    rows = [ScheduledRow(f"r{i}", [7], ctx, list(range(1 + i * nb, 1 + (i + 1) * nb)), True,
                         SamplingParams(temperature=0), 0, 0, ctx, [], spec.eos_token_ids) for i in range(B)]
    sched = SchedulerOutput("decode", rows)
    runner.execute(sched)
    res = {}
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        runner.execute(sched)
        ts.append(time.perf_counter() - t)
    res["decode step, as the runner runs it"] = statistics.median(ts) * 1000
    key = next(k for k in runner.executables if k.kind == "decode")
    nbt = key.size
    tables = jnp.asarray(np.array([r.block_table + [0] * (nbt - nb) for r in rows], np.int32))
    x = jnp.ones((B, 1, D), p["embed"].dtype)
    lw = {k: v[0] for k, v in p.items() if k not in ("embed", "final_norm", "head")}

    def matmuls(x):
        for _ in range(L):
            qkv = x @ lw["qkv"]
            o = qkv[..., :H * Dh] @ lw["o"]
            g, u = jnp.split(o @ lw["gate_up"], 2, axis=-1)
            x = x + (jax.nn.silu(g) * u) @ lw["down"]
        return x
    res["  30 layers of matmuls (qkv, o, gate|up, down)"] = timeit(jax.jit(matmuls), x)
    q = jnp.ones((B, 1, H, Dh), x.dtype)
    kv = jnp.ones((B, 1, KVH, Dh), x.dtype)
    lens = jnp.full((B,), ctx, jnp.int32)

    def attention(q, kc, vc):
        out = q
        for layer in range(L):
            out = out + paged_attention(out, kv, kv, kc, vc, jnp.int32(layer), tables, lens, jnp.ones_like(lens),
                                        Dh ** -0.5, prefix_always=True)
        return out
    res["  30 layers of paged attention (gather + softmax)"] = timeit(jax.jit(attention), q, runner.k_cache,
                                                                       runner.v_cache)
    slots = jnp.arange(B, dtype=jnp.int32) + bs
    new = jnp.ones((L, B, KVH, Dh), x.dtype)
    write, cache = jax.jit(lambda c: write_kv(c, slots, new), donate_argnums=0), jnp.zeros_like(runner.k_cache)
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        cache = jax.block_until_ready(write(cache))
        ts.append(time.perf_counter() - t)
    res["  KV-cache write (all layers, donated)"] = statistics.median(ts[1:]) * 1000
    h = jnp.ones((B, D), x.dtype)
    res["  LM head"] = timeit(jax.jit(lambda h: M.lm_head(p, h)), h)
    logits = jax.random.normal(jax.random.key(0), (B, spec.vocab_size))
    for name, sp in (("greedy", SamplingParams(temperature=0)), ("temperature", SamplingParams(temperature=0.8)),
                     ("top-p 0.9", SamplingParams(temperature=0.8, top_p=0.9))):
        st = build_sampling_tensors([sp] * B, [[]] * B, [1] * B, [spec.eos_token_ids] * B, [0] * B, list(range(B)),
                                    B, nbt * bs)
        res[f"  sampling, {name}"] = timeit(jax.jit(lambda l, st: sample(l, st).tokens), logits, st)

    prow = ScheduledRow("p", list(range(100, 100 + a.prompt_len)), 0, list(range(1, 1 + -(-a.prompt_len // bs))),
                        True, SamplingParams(temperature=0), 0, 0, a.prompt_len, [], spec.eos_token_ids)
    psched = SchedulerOutput("prefill", [prow])
    runner.execute(psched)
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        runner.execute(psched)
        ts.append(time.perf_counter() - t)
    res[f"prefill step, 1 x {a.prompt_len} tokens"] = statistics.median(ts) * 1000
    xp = jnp.ones((1, a.prompt_len, D), x.dtype)
    res[f"  30 layers of matmuls, 1 x {a.prompt_len}"] = timeit(jax.jit(matmuls), xp, reps=5)

    print(f"decode: batch {B}, context {ctx} (bucket {nbt} blocks); dtype {a.dtype}; {jax.devices()[0].device_kind}")
    for k, v in res.items():
        print(f"{k:<52} {v:8.2f} ms")


if __name__ == "__main__":
    main()
