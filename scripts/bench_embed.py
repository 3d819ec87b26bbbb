"""Embedding throughput against plain prefill on the same prompts (how much the score graph / all-position
hidden states cost), per backend.

    python scripts/bench_embed.py [--backend jax|torch] [--prompts 32] [--len 128] [--dtype float32]

Prints prompt tokens/s for LLM.generate(max_tokens=1) (a prefill and one sampled token) and for LLM.embed (last
and mean pooling), the second of two runs of each (the first compiles on jax).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from kiln import LLM, PoolingParams, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--backend", default="jax")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--len", type=int, default=128)
    a = p.parse_args()
    llm = LLM(model=a.model, backend=a.backend, dtype=a.dtype, max_model_len=512, max_num_seqs=8,
              max_num_batched_tokens=512, warmup=False, allow_lazy_compile=True,
              enable_prefix_caching=False)          # the timed second runs must not hit the cache
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(100, 20000, a.len)] for _ in range(a.prompts)]
    n = a.prompts * a.len
    runs = {"prefill (generate max_tokens=1)": lambda: llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0)),
            "embed last": lambda: llm.embed(prompts, PoolingParams("last")),
            "embed mean": lambda: llm.embed(prompts, PoolingParams("mean"))}
    for name, fn in runs.items():
        fn()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        print(f"{a.backend} {a.dtype} {name}: {n} prompt tokens in {dt:.2f}s = {n / dt:.0f} tok/s")


if __name__ == "__main__":
    main()
