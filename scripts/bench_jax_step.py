"""The jax step's options side by side on the default model: each variant a runner of its own over the same
weights, timed in interleaved rounds (min and median ms of `JaxRunner.execute`, host side included), so load
from other jobs on the machine hits every variant alike.

    .venv/bin/python scripts/bench_jax_step.py [--batches 64,1] [--context 160] [--rounds 4]
        [--what fused,flags,dtype]

fused: the plain-greedy sampler inside the decode graph (one executable) vs the separate sampler graph.
flags: XLA:CPU debug options (compiler_options) on the decode graph, each against none.
dtype: the matmul probe of backends/jax/tuning.py (float32 vs bf16-in/f32-accumulate per row count), and the
       decode step with bf16 matmul weights vs float32.
"""
from __future__ import annotations

import argparse
import statistics
import time

FLAGS = [{"xla_cpu_use_onednn": True},
         {"xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
         {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
         {"xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
         {"xla_cpu_prefer_vector_width": 512}]


def decode_rows(B: int, ctx: int, bs: int, eos):
    from kiln.engine.sampling_params import SamplingParams
    from kiln.engine.scheduler_output import ScheduledRow, SchedulerOutput
    nb = -(-(ctx + 1) // bs)
    rows = [ScheduledRow(f"r{i}", [7 + i], ctx, list(range(1 + i * nb, 1 + (i + 1) * nb)), True,
                         SamplingParams(temperature=0), 0, 0, ctx, [], eos) for i in range(B)]
    return SchedulerOutput("decode", rows)


def race(variants: dict, step, rounds: int, reps: int = 3) -> dict:
    """name -> (min ms, median ms) of runner.execute(step), variants interleaved round by round."""
    times = {n: [] for n in variants}
    for r in variants.values():
        r.execute(step)                                                    # compile (lazy) + first run
    for _ in range(rounds):
        for name, r in variants.items():
            for _ in range(reps):
                t = time.perf_counter()
                r.execute(step)
                times[name].append((time.perf_counter() - t) * 1000)
    return {n: (round(min(t), 1), round(statistics.median(t), 1)) for n, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", default="64,1")
    ap.add_argument("--context", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--what", default="fused,flags,dtype")
    a = ap.parse_args()
    from kiln.backends.jax import tuning as T
    from kiln.engine.llm import build_engine
    engine = build_engine(a.model, dtype="float32", max_num_seqs=64, max_model_len=512, warmup=False, kv_cache_gib=0.6,
                          allow_lazy_compile=True, graph_cache=False)
    base = engine.runner
    spec, bs = base.spec, base.config.cache.block_size

    def variant(**attrs):
        r = base.with_config(config=base.config)
        for k, v in attrs.items():
            setattr(r, k, v)
        if r.tuning.uses_bf16:
            r.params_bf16 = T.bf16_params(r.params)
        return r

    what = a.what.split(",")
    if "dtype" in what:
        t = T.probe(spec)
        print("matmul probe (rows, float32 ms, bf16 ms):", t.measured, "->", dict(t.matmul), flush=True)
    for B in map(int, a.batches.split(",")):
        step = decode_rows(B, a.context, bs, spec.eos_token_ids)
        if "fused" in what:
            print(f"batch {B} fused sampler:", race({"fused": variant(fused_greedy=True),
                                                     "separate": variant(fused_greedy=False)}, step, a.rounds),
                  flush=True)
        if "flags" in what:
            vs = {"none": variant()}
            for f in FLAGS:
                vs[",".join(f"{k}={v}" for k, v in f.items())] = variant(compiler_options=f)
            print(f"batch {B} flags:", race(vs, step, a.rounds), flush=True)
        if "dtype" in what:
            bf = variant(tuning=T.StepTuning(((1, "bfloat16"),)))
            print(f"batch {B} matmul dtype:", race({"float32": variant(), "bfloat16": bf}, step, a.rounds),
                  flush=True)


if __name__ == "__main__":
    main()
