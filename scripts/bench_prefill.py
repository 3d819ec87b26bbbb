"""One prompt's prefill on the torch backend, side by side: attention by torch ops (the [B, T, S] masks, the
context blocks gathered into contiguous copies, batched matmuls) vs csrc/prefill_attention.cpp, on the
weights and KV cache of `LLM(model, backend="torch", dtype=...)`.

    .venv/bin/python scripts/bench_prefill.py [--lens 512,2048] [--dtypes float32,bfloat16] [--reps 3]

Per length and dtype: the forward pass of one T-token prompt (ms, median of reps, random token ids at
positions 0..T-1 into fresh blocks), and within it the attention calls of all layers (`_prefill_attention`)
and the step's shared setup (`_step`: masks, rope rows, slots) summed by wrapping those two functions.
The path is chosen here by replacing kernels.prefill_kernel; there is no user setting for it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from kiln import LLM
from kiln.backends.torch import kernels
from kiln.backends.torch import model as TM
from kiln.models.fetch import DEFAULT_MODEL

BS = 16


class Timed:
    """Wraps model.<name> to sum the wall time of its calls."""

    def __init__(self, name: str):
        self.name, self.fn, self.total = name, getattr(TM, name), 0.0

    def __enter__(self):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return self.fn(*a, **k)
            finally:
                self.total += time.perf_counter() - t
        setattr(TM, self.name, timed)
        return self

    def __exit__(self, *exc):
        setattr(TM, self.name, self.fn)


def prefill_arrays(T: int, vocab: int, seed: int):
    """tokens, positions, slots [1, T], tables [1, nbt] (blocks 1..nbt), lens [1]."""
    nbt = -(-T // BS)
    tokens = np.random.default_rng(seed).integers(0, vocab, (1, T)).astype(np.int32)
    positions = np.arange(T, dtype=np.int32)[None]
    slots = (BS + positions).astype(np.int32)                                     # block 1 onward
    tables = np.arange(1, nbt + 1, dtype=np.int32)[None]
    return tokens, positions, slots, tables, np.array([T], np.int32)


def run(llm, T: int, reps: int, use_kernel: bool) -> dict:
    r = llm.engine.runner
    orig = kernels.prefill_kernel
    if not use_kernel:
        kernels.prefill_kernel = lambda block_size: None
    try:
        times, attn, setup = [], [], []
        for i in range(reps + 1):                                                 # the first is a warm-up
            x = prefill_arrays(T, r.spec.vocab_size, seed=i)
            with Timed("_prefill_attention") as a, Timed("_step") as s:
                t = time.perf_counter()
                TM.forward(r.spec, r.params, r.k_cache, r.v_cache, BS, *x)
                dt = time.perf_counter() - t
            if i:
                times.append(dt), attn.append(a.total), setup.append(s.total)
    finally:
        kernels.prefill_kernel = orig
    ms = lambda v: round(statistics.median(v) * 1e3, 1)
    return {"total_ms": ms(times), "attention_ms": ms(attn), "setup_ms": ms(setup)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--lens", default="512,2048")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    lens = [int(x) for x in a.lens.split(",")]
    assert kernels.load_prefill() is not None, "the prefill kernel did not build"
    print(f"torch threads {torch.get_num_threads()}; prefill kernel vector path: {kernels.load_prefill().simd()}")
    print(f"{'dtype':<9} {'T':>5} | {'torch-ops total':>15} {'attn':>7} {'setup':>6} | {'kernel total':>12} "
          f"{'attn':>7} {'setup':>6} | {'total x':>7} {'attn x':>6}")
    for dtype in a.dtypes.split(","):
        llm = LLM(model=a.model, backend="torch", dtype=dtype, max_model_len=max(lens) + BS,
                  kv_cache_gib=0.05 + max(lens) / 2048 * 0.2, max_num_seqs=1)   # >= the longest prompt's blocks
        assert llm.engine.runner.k_cache.shape[1] > -(-max(lens) // BS), "KV cache too small"
        for T in lens:
            ops, ker = run(llm, T, a.reps, False), run(llm, T, a.reps, True)
            print(f"{dtype:<9} {T:>5} | {ops['total_ms']:>15} {ops['attention_ms']:>7} {ops['setup_ms']:>6} | "
                  f"{ker['total_ms']:>12} {ker['attention_ms']:>7} {ker['setup_ms']:>6} | "
                  f"{ops['total_ms'] / ker['total_ms']:>7.2f} {ops['attention_ms'] / ker['attention_ms']:>6.1f}",
                  flush=True)
        del llm


if __name__ == "__main__":
    main()
