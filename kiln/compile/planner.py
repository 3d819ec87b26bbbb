"""Warmup planner: split usable memory between compiled graphs and the KV cache, and order the buckets.

    usable     = memory_utilization x free memory (after weights are loaded and a profiling step ran)
    graphs     = graph_reserved_fraction x usable;  prompt graphs get graph_prompt_ratio of it, decode the rest
    kv cache   = usable - graphs  ->  num_blocks = kv // bytes per block

On CPU free memory is host memory, and the KV budget may be given directly (`--kv-cache-gib`), which skips the
split. With tensor parallelism every number here is one device's: the KV cache is split by KV head over the
mesh, so a block takes 1/tp of its bytes on each device (kv_block_bytes_per_device) and the same budget holds tp
times the blocks; with fewer KV heads than devices (GQA) the cache is replicated and a block costs its full bytes
on every device.

Buckets are compiled in strategy order until their budget is spent; the largest bucket of each family is
always compiled, so every admissible shape has a graph.
"""
from __future__ import annotations

import os

from kiln.config import DECODE_STRATEGIES, PREFILL_STRATEGIES, MemoryPlan

__all__ = ["DECODE_STRATEGIES", "PREFILL_STRATEGIES", "MemoryPlan", "PlanError", "host_free_bytes", "plan_memory",
           "kv_block_bytes_per_device", "stable_block_count", "order_buckets", "must_compile"]


class PlanError(ValueError):
    """The settings cannot fit: the message names the knob to turn."""


def host_free_bytes() -> int:
    """MemAvailable from /proc/meminfo (what a new allocation can get without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def kv_block_bytes_per_device(bytes_per_block: int, *, num_kv_heads: int, tp: int) -> tuple[int, int]:
    """(bytes one block takes on each device of a `tp`-way mesh, KV shards): the cache is split by KV head when
    tp divides the KV heads (backends/jax/mesh.py's rule), else replicated (shards 1, the full bytes)."""
    shards = tp if num_kv_heads % tp == 0 else 1
    return bytes_per_block // shards, shards


def plan_memory(*, free_bytes: int, memory_utilization: float, graph_reserved_fraction: float,
                graph_prompt_ratio: float, bytes_per_block: int, block_size: int, max_model_len: int,
                kv_bytes: int | None = None, kv_shards: int = 1) -> MemoryPlan:
    """The budget split, on one device. `kv_bytes` given: the KV cache gets exactly that and graphs the rest of
    usable. `bytes_per_block` is one device's (kv_block_bytes_per_device), recorded with `kv_shards`."""
    for name, v in (("memory_utilization", memory_utilization), ("graph_reserved_fraction", graph_reserved_fraction),
                    ("graph_prompt_ratio", graph_prompt_ratio)):
        if not 0.0 <= v <= 1.0:
            raise PlanError(f"{name} must be in [0, 1], got {v}")
    usable = int(memory_utilization * free_bytes)
    if kv_bytes is None:
        graphs = int(graph_reserved_fraction * usable)
        kv = usable - graphs
    else:
        kv = kv_bytes
        if kv > usable:
            raise PlanError(f"the KV cache ({kv / 2**30:.2f} GiB) does not fit the usable memory "
                            f"({usable / 2**30:.2f} GiB = memory_utilization {memory_utilization} x "
                            f"{free_bytes / 2**30:.2f} GiB free): lower --kv-cache-gib")
        graphs = usable - kv
    prompt = int(graph_prompt_ratio * graphs)
    # an automatic size is rounded so jitter in free memory keeps the graphs' cache shape; a given one is exact
    num_blocks = kv // bytes_per_block if kv_bytes is not None else stable_block_count(kv // bytes_per_block)
    needed = -(-max_model_len // block_size) + 1            # one max-length sequence plus the null block
    if num_blocks < needed:
        raise PlanError(
            f"the KV cache gets {num_blocks} blocks ({kv / 2**30:.2f} GiB), fewer than the {needed} one "
            f"max_model_len={max_model_len} sequence needs: raise --memory-utilization or --kv-cache-gib, lower "
            f"--graph-reserved-fraction, or lower --max-model-len")
    return MemoryPlan(free_bytes, usable, prompt, graphs - prompt, kv, num_blocks, bytes_per_block, kv_shards)


def stable_block_count(n: int) -> int:
    """Round down to 4 significant bits, so that run-to-run jitter in free memory keeps the same KV-cache
    shape, and with it the same compiled graphs (the cache is a graph argument with a static shape)."""
    if n < 16:
        return n
    step = 1 << (n.bit_length() - 4)
    return n // step * step


def order_buckets(buckets: list[tuple[int, int]], strategy: str) -> list[tuple[int, int]]:
    """min_tokens: smallest batch x size first; max_bs: largest batch first, then smallest size."""
    if strategy == "min_tokens":
        return sorted(buckets, key=lambda b: (b[0] * b[1], b[0]))
    if strategy == "max_bs":
        return sorted(buckets, key=lambda b: (-b[0], b[1]))
    raise PlanError(f"unknown warmup strategy {strategy!r}; choose from min_tokens, max_bs")


def must_compile(buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket that holds every other: largest batch and largest size."""
    return max(b for b, _ in buckets), max(s for _, s in buckets)
