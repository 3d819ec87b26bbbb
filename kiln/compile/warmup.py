"""Warmup: build every planned graph before serving, from the graph cache where possible, then arm the guard.

`warmup(runner)` asks the runner (`runner.warmup(...)`, the ModelRunner contract): an eager backend builds its
kernels and compiles nothing; a compiling backend (jax) calls `build_graphs(runner)` here, which drives it through
the planner's buckets:

    required buckets (hold every admissible step)  ─┐   (+ the sampler graphs of every batch size)
    other buckets in strategy order, while the      ├─> runner.load_or_compile, `compile_workers` at once
      prefill / decode graph budgets last          ─┘     [Warmup][Prompt][3/24] batch_size:4 seq_len:512 ...
    with --warmup-scoring: a score graph (prompt logprobs + pooled hidden states) for every prefill graph built
    ─> summary (graphs, hits, compile seconds, graph memory, KV memory) ─> guard.arm()
"""
from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from kiln.compile.graph_key import GraphKey
from kiln.compile.planner import host_free_bytes, order_buckets

log = logging.getLogger(__name__)


@dataclasses.dataclass
class WarmupReport:
    planned: int = 0                 # buckets in the plan
    captured: int = 0                # graphs available after warmup
    hits: int = 0                    # loaded from the graph cache
    compiled: int = 0
    skipped: int = 0                 # over the graph budget
    seconds: float = 0.0
    graph_bytes: int = 0
    kv_bytes: int = 0
    rows: list[dict] = dataclasses.field(default_factory=list)   # one per graph: kind, batch, size, source, s, bytes


def _family(runner, kind: str, buckets: list[tuple[int, int]], required: list[tuple[int, int]], strategy: str,
            budget: int, report: WarmupReport, check_only: bool, progress) -> None:
    """Warm one graph family: required buckets first, then the rest in strategy order while the budget lasts.

    Graphs are built `compile_workers` at a time; memory is accounted in plan order after each group, so the
    last group may overshoot the budget by at most a group's worth.
    """
    ordered = [b for b in required if b in buckets] + [b for b in order_buckets(buckets, strategy) if b not in required]
    keys = [GraphKey(kind, b, s) for b, s in ordered]
    n_required = sum(b in buckets for b in required)
    label, size_name = {"prefill": ("Prompt", "seq_len"), "decode": ("Decode", "num_blocks"),
                        "sample": ("Sampler", "general"), "score": ("Score", "seq_len")}[kind]
    report.planned += len(keys)
    workers = max(1, runner.config.compile.compile_workers)

    def build(key):
        t0 = time.perf_counter()
        if check_only:
            return key, "cached" if runner.is_cached(key) else "missing", 0.0
        return key, runner.load_or_compile(key), time.perf_counter() - t0

    used, i = 0, 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while i < len(keys):
            if i >= n_required and used >= budget and not check_only:
                report.skipped += len(keys) - i
                progress.update(len(keys) - i)
                break
            group = keys[i:i + workers] if i >= n_required else keys[i:min(i + workers, n_required)]
            for key, source, dt in pool.map(build, group):
                i += 1
                nbytes = runner.graph_memory.get(key, 0)
                used += nbytes
                report.captured += source != "missing"
                report.hits += source in ("hit", "cached")
                report.compiled += source == "compiled"
                report.graph_bytes += nbytes
                report.rows.append({"kind": kind, "batch": key.batch, "size": key.size, "source": source,
                                    "seconds": round(dt, 2), "bytes": nbytes})
                log.info("[Warmup][%s][%d/%d] batch_size:%d %s:%d free_mem:%.2f GiB (%s, %.2fs)", label, i,
                         len(keys), key.batch, size_name, key.size, host_free_bytes() / 2**30, source, dt)
                progress.update(1)


def warmup(runner, check_only: bool = False, show_progress: bool = True) -> WarmupReport:
    """Make `runner` ready to serve without compiling (or, with check_only, report what it would still build)."""
    return runner.warmup(check_only=check_only, show_progress=show_progress)


def build_graphs(runner, check_only: bool = False, show_progress: bool = True) -> WarmupReport:
    """Build (or, with check_only, only look up) every planned graph of a compiling runner; then forbid compiling.

    The runner provides `config`, `compiled_kinds`, `is_cached(key)`, `load_or_compile(key)`, `graph_memory`
    and `guard` (compile/guard.CompileGuard)."""
    from tqdm import tqdm
    cfg = runner.config
    plan, comp, mem = cfg.buckets, cfg.compile, cfg.memory
    prefill, decode = plan.prefill_buckets(), plan.decode_buckets()
    req_prefill, req_decode = plan.required_buckets()
    log.info("Generated %d prompt buckets: %s", len(prefill), prefill)
    log.info("Generated %d decode buckets: %s", len(decode), decode)
    samplers = [(b, general) for b in sorted(set(plan.prompt_bs) | set(plan.decode_bs)) for general in (0, 1)]
    report = WarmupReport(kv_bytes=mem.kv_bytes)
    t0 = time.perf_counter()
    if "prefill" not in runner.compiled_kinds:
        prefill, decode = [], []
    if "sample" not in runner.compiled_kinds:
        samplers = []
    scoring = getattr(comp, "warmup_scoring", False) and "score" in runner.compiled_kinds and bool(prefill)
    with tqdm(total=len(prefill) + len(decode) + len(samplers), desc="warmup", unit="graph",
              disable=not show_progress) as bar:
        _family(runner, "prefill", prefill, req_prefill, comp.prefill_strategy, mem.prompt_graph_bytes, report,
                check_only, bar)
        _family(runner, "decode", decode, req_decode, comp.decode_strategy, mem.decode_graph_bytes, report,
                check_only, bar)
        _family(runner, "sample", samplers, samplers, "max_bs", 0, report, check_only, bar)   # small, all required
        if scoring:     # a score graph beside every prefill graph built, so every prefill step can be scored
            scored = [(r["batch"], r["size"]) for r in report.rows if r["kind"] == "prefill" and r["source"] != "missing"]
            bar.total += len(scored)
            _family(runner, "score", scored, scored, comp.prefill_strategy, 0, report, check_only, bar)
            runner.scoring_warmed = not check_only
    report.seconds = time.perf_counter() - t0
    if not check_only:
        log.info("Warmup done in %.1fs: captured %d/%d graphs (%.0f%%; %d from cache, %d compiled, %d over budget), "
                 "graph memory %.1f MiB, KV cache %.2f GiB", report.seconds, report.captured, report.planned,
                 100 * report.captured / max(report.planned, 1), report.hits, report.compiled, report.skipped,
                 report.graph_bytes / 2**20, report.kv_bytes / 2**30)
        runner.guard.arm()
    return report
