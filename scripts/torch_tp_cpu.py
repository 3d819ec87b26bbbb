"""Can tensor parallelism pay for the torch backend on this CPU? One decode step of the default model's shape
(SmolLM2-135M: 30 layers, D 576, 9 heads / 3 KV heads of 64, MLP 1536, vocabulary 49152), float32, as the
Megatron split does it, timed two ways on the same cores:

    tp1   one process, torch.set_num_threads(T): per layer qkv [D, 960], o [576, D], gate_up [D, 3072],
          down [1536, D]; then the head [D, V]
    tp2   two processes (torch.distributed, gloo over loopback), one thread each (T / 2): each half of every
          column-parallel matrix and of every row-parallel one, an all-reduce of [B, D] after o and after down
          (two a layer), the head split by vocabulary and its logits all-gathered

Attention over the cache is left out (its work splits by head exactly and needs no collective), so this is the
most favourable case for tp2: the matmuls halve, the collectives are all it adds.

    python scripts/torch_tp_cpu.py [--batch 1 8 32] [--threads 2] [--steps 20]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

L, D, H, KVH, DH, F, V = 30, 576, 9, 3, 64, 1536, 49152
QKV = (H + 2 * KVH) * DH


def weights(tp: int, rank: int, gen: torch.Generator):
    """One rank's slices (tp 1: whole): per layer (qkv, o, gate_up, down) [in, out], and the head."""
    r = lambda *s: torch.randn(*s, generator=gen) * 0.02
    layers = [(r(D, QKV // tp), r(D // tp if tp > 1 else D, D), r(D, 2 * F // tp), r(F // tp, D)) for _ in range(L)]
    return layers, r(D, V // tp)


def step(x, layers, head, tp: int):
    """One decode step of x [B, D] (no attention): the matmuls and, split, the collectives."""
    for qkv, o, gu, down in layers:
        a = (x @ qkv)[:, :o.shape[0]]                               # [B, D/tp] stands in for attention's out
        y = a @ o                                                  # [B, D] partial sums
        if tp > 1:
            dist.all_reduce(y)
        x = x + y
        g = x @ gu                                                 # [B, 2F/tp]
        h = torch.nn.functional.silu(g[:, :g.shape[1] // 2]) * g[:, g.shape[1] // 2:]
        y = h @ down                                               # [B, D] partial sums
        if tp > 1:
            dist.all_reduce(y)
        x = x + y
    logits = x @ head                                              # [B, V/tp]
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits)
        logits = torch.cat(parts, -1)
    return logits


def timed(fn, steps: int) -> float:
    fn()
    fn()                                                           # warm (oneDNN primitives, gloo pairs)
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def one_process(batches, threads: int, steps: int) -> dict:
    torch.set_num_threads(threads)
    layers, head = weights(1, 0, torch.Generator().manual_seed(0))
    return {b: timed(lambda: step(torch.randn(b, D), layers, head, 1), steps) for b in batches}


def _rank(rank: int, tp: int, batches, threads: int, steps: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    layers, head = weights(tp, rank, torch.Generator().manual_seed(rank))
    res = {}
    for b in batches:
        x = torch.randn(b, D)
        def fn():
            dist.barrier()
            step(x, layers, head, tp)
        res[b] = timed(fn, steps)
        y = torch.randn(b, D)
        res[f"allreduce_{b}"] = timed(lambda: dist.all_reduce(y), steps * 10)
    if rank == 0:
        out.put(res)
    dist.destroy_process_group()


def two_processes(batches, threads: int, steps: int, tp: int = 2) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_rank, args=(r, tp, batches, threads, steps, port, out)) for r in range(tp)]
    for p in procs:
        p.start()
    res = out.get(timeout=600)
    for p in procs:
        p.join()
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--threads", type=int, default=2, help="cores in all (tp2: half each)")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    one = one_process(a.batch, a.threads, a.steps)
    single = one_process(a.batch, 1, a.steps)
    two = two_processes(a.batch, max(a.threads // 2, 1), a.steps)
    print(f"decode step, default model shape, float32, no attention; median of {a.steps} (ms)")
    print(f"{'batch':>5} {'tp1 (1 proc, 1 thr)':>20} {'tp1 (1 proc, %d thr)' % a.threads:>20} "
          f"{'tp2 (2 proc x %d thr)' % max(a.threads // 2, 1):>22} {'speedup':>8} {'gloo all-reduce [B, D]':>23} "
          f"{'x 60 a step':>12}")
    for b in a.batch:
        ar = two[f"allreduce_{b}"]
        print(f"{b:>5} {single[b]:>20.2f} {one[b]:>20.2f} {two[b]:>22.2f} {one[b] / two[b]:>8.2f} {ar:>23.3f} "
              f"{60 * ar:>12.2f}")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
