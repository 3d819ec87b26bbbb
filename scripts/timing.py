"""The one timing helper the micro-benchmarks share: median milliseconds of a jitted call."""
from __future__ import annotations

import statistics
import time

import jax


def timeit(fn, *args, reps: int = 20) -> float:
    """Median wall milliseconds of fn(*args) over `reps` runs, after one warm-up run (compile excluded)."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000
