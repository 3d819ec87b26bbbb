"""Benchmark `kiln batch` on a W1-style job: prompts from the shared workload, greedy, EOS ignored.

    python scripts/bench_batch.py                                   # W1: 64 requests x 128 tokens
    python scripts/bench_batch.py --lines 100000 --max-tokens 1     # bounded memory on a long input
    python scripts/bench_batch.py --lines 8 --max-tokens 4 --max-num-seqs 4 --skip-warmup   # a quick check

Writes the JSONL (/v1/completions lines, custom_id w1-N) to a temporary folder, builds the engine once (same
flags as `kiln batch`), runs the job in-process through `run_batch`, then prints one RESULT line of JSON:
requests/s and output tokens/s of the job (model load and warmup excluded), the peak RSS of the process
(getrusage) and the peak RSS during the job above the RSS once the engine was ready: the number that must
stay flat as --lines grows.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "shared" / "peers"))

from kiln.entrypoints.cli import _engine_args, engine_kwargs  # noqa: E402


def write_w1(path: Path, lines: int, max_tokens: int) -> None:
    try:
        import workload
        prompts = workload.prompts(lines)
    except ImportError:     # the shared peers folder is not there: the same prompts, spelled out
        prompts = [f"Write a short story number {i} about a robot who learns to paint." for i in range(lines)]
    with open(path, "w") as f:
        for i, prompt in enumerate(prompts):
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            f.write(json.dumps({"custom_id": f"w1-{i}", "method": "POST", "url": "/v1/completions",
                                "body": body}) + "\n")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=64, help="requests in the job (default: 64, as W1)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default: 128, as W1)")
    p.add_argument("--max-in-flight", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=None, help="keep the input and output here")
    p.add_argument("--progress", action="store_true", help="show the progress bar")
    _engine_args(p)
    a = p.parse_args(argv)

    from kiln.engine.llm import build_engine
    from kiln.entrypoints.batch import run_batch

    tmp = None
    if a.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="kiln-bench-batch-")
        a.workdir = Path(tmp.name)
    a.workdir.mkdir(parents=True, exist_ok=True)
    inp, out = a.workdir / "w1.jsonl", a.workdir / "w1-results.jsonl"
    write_w1(inp, a.lines, a.max_tokens)

    t0 = time.perf_counter()
    engine = build_engine(**engine_kwargs(a))
    init_s = time.perf_counter() - t0
    base = rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], rss_bytes())

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        stats = run_batch(engine, str(inp), out, overwrite=True, max_in_flight=a.max_in_flight,
                          progress=a.progress)
    finally:
        stop.set()
        th.join()
    print(stats.summary(), file=sys.stderr)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # KiB on Linux
    print("RESULT " + json.dumps({
        "engine": "kiln-batch", "lines": a.lines, "max_tokens": a.max_tokens, "ok": stats.ok,
        "failed": stats.failed, "gen_tokens": stats.completion_tokens, "time_s": round(stats.wall_s, 2),
        "req_per_s": round(stats.new / stats.wall_s, 2), "tok_per_s": round(stats.completion_tokens / stats.wall_s, 1),
        "init_s": round(init_s, 1), "peak_rss_mib": round(maxrss / 2**20, 1),
        "job_rss_growth_mib": round((peak[0] - base) / 2**20, 1)}))
    if tmp is not None:
        tmp.cleanup()
    return 0 if stats.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
