"""How the jax backend should run a mixed step (decodes + a prefill chunk), measured on the default model.

    (a) one prefill-bucket graph: the decode rows are rows of q_len 1 in the [B, T] bucket of the chunk
        (16 decodes + one 128-token chunk: 17 rows -> the [32, 128] bucket, 4096 padded positions)
    (b) the decode graph over the decode rows, then the prefill graph over the chunk, back to back in one
        execute() (what JaxRunner._execute_mixed does)
Median wall milliseconds of the whole step as the runner runs it (inputs, graphs, sampling), compile excluded.

    .venv/bin/python scripts/bench_mixed_jax.py [--decodes 16] [--chunk 128] [--context 256] [--reps 5]
"""
from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--decodes", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--context", type=int, default=256, help="tokens already in each decode row's cache")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()

    from kiln.engine.llm import build_engine
    from kiln.engine.sampling_params import SamplingParams
    from kiln.engine.scheduler_output import ScheduledRow, SchedulerOutput

    engine = build_engine(a.model, backend="jax", dtype="float32", max_model_len=1024, warmup=False,
                          allow_lazy_compile=True, graph_cache=False)
    runner, spec, bs = engine.runner, engine.spec, engine.config.cache.block_size
    nb = -(-(a.context + 1) // bs)
    greedy = SamplingParams(temperature=0)
    dec = [ScheduledRow(f"d{i}", [7], a.context, list(range(1 + i * nb, 1 + (i + 1) * nb)), True, greedy, 0, 0,
                        a.context, [], spec.eos_token_ids) for i in range(a.decodes)]
    first = 1 + a.decodes * nb
    chunk = ScheduledRow("p", [9] * a.chunk, 0, list(range(first, first + -(-a.chunk // bs))), True, greedy, 0, 0,
                         a.chunk, [], spec.eos_token_ids)
    ways = {"(a) one prefill bucket": SchedulerOutput("prefill", dec + [chunk]),
            "(b) decode graph + prefill graph": SchedulerOutput("mixed", dec + [chunk])}
    for name, step in ways.items():
        runner.execute(step)                                        # compiles this way's graphs
        ts = []
        for _ in range(a.reps):
            t = time.perf_counter()
            runner.execute(step)
            ts.append(time.perf_counter() - t)
        print(f"{name:34s} {statistics.median(ts) * 1000:8.1f} ms")
    print("graphs:", ", ".join(str(k) for k, _ in runner.compile_log))


if __name__ == "__main__":
    main()
