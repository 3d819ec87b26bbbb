"""`kiln batch --ray`: the job as a Ray Dataset, its lines mapped through N engine actors (Ray Data's actor pool).

    this process: input ──> parse every line (a bad line's error record is written here; with --resume the
                  lines already answered are skipped and their custom_ids checked: batch.py's rules)
               ──> pending rows {lineno, line} ──> ray.data.from_items
    ──> map_batches(LineWorker, ActorPoolStrategy(size=N, 2 calls per actor), batch_size=B): each actor builds
        one engine and answers a block's lines together with batch.py's own request handling (_Job._serve),
        so a record is what the in-process job writes; two blocks per actor at once, so one block's tail
        overlaps the next
    ──> iter_rows, here: the one writer. A record whose line is already written is dropped: Ray Data restarts
        a dead actor and runs its task again whole (max_restarts / max_task_retries -1, its defaults), so a
        block's records can come twice; they never come zero times unless the job fails
    every pending line answered ──> fsync, rename <out>    (else BatchAborted: the partial file is kept and
                                                            --resume answers the rest)

Why both this and batch_ray.py (the actor path, `--data-parallel-size N` without `--ray`): the actor path
streams lines one by one to long-lived replicas (continuous batching never drains at a block's end; an actor's
death retries only its in-flight requests, not a block) and is the faster one on one machine. A Dataset is the
one for clusters: Ray Data schedules the actor pool over the cluster's nodes, bounds memory with backpressure,
and a dataset can come from a distributed store; the price is a block's tail (the engine drains before the
block's records return) and re-running a whole block when an actor dies. Numbers: BENCHMARKS.md.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kiln.engine.sampling_params import SamplingParams
from kiln.entrypoints import batch_format as F
from kiln.entrypoints.batch import FORMATS, BatchAborted, BatchStats, BatchUsageError, _Job, check_paths
from kiln.entrypoints.batch_files import (Writer, partial_path, publish, repair_torn_tail, scan_done,
                                         sniff_format)


class _Records:
    """The Writer an actor's _Job writes to: records kept by input line until their block returns them."""

    def __init__(self):
        self.by_line: dict[int, dict] = {}

    def write(self, record: dict) -> None:
        self.by_line[F.lineno_of(record)] = record


class LineWorker:
    """One engine in a Ray Data actor: a block of {lineno, line} rows -> {lineno, record (JSON text)}."""

    def __init__(self, engine_kwargs: dict, factory: str | None, job: str, fmt: str, text_params: SamplingParams):
        from kiln.engine.async_engine import AsyncEngine
        from kiln.serving.ray_replicas import _build
        self.fmt, self.text_params = fmt, text_params
        self.loop = asyncio.new_event_loop()                   # the engine's loop, for every block
        threading.Thread(target=self.loop.run_forever, daemon=True, name="kiln-batch-loop").start()
        engine = AsyncEngine(_build(factory, engine_kwargs))
        self.records = _Records()

        async def make():
            j = _Job(engine, None, self.records, BatchStats(output=Path(os.devnull)), done={}, fmt=fmt,
                     text_params=text_params, max_in_flight=1 << 30, total=None, progress=False)
            j.job = job                                        # the driver's: record ids as one job's
            return j
        self.job = asyncio.run_coroutine_threadsafe(make(), self.loop).result()

    def _request(self, lineno: int, line: str) -> F.BatchRequest:
        if self.fmt == "jsonl":
            return F.parse_jsonl_line(line, lineno)
        return F.parse_text_line(line.rstrip("\r\n"), lineno, self.text_params)

    def __call__(self, batch: dict) -> dict:
        lines = [int(n) for n in batch["lineno"]]
        reqs = [self._request(n, str(x)) for n, x in zip(lines, batch["line"])]

        async def serve():
            await asyncio.gather(*(self.job._serve(r) for r in reqs))
        asyncio.run_coroutine_threadsafe(serve(), self.loop).result()
        if self.job.fatal is not None:      # the engine stopped: fail the job (kept for --resume), no retries
            raise RuntimeError(f"the engine stopped: {self.job.fatal}")
        recs = [self.records.by_line.pop(n) for n in lines]
        return {"lineno": lines, "record": [json.dumps(r, ensure_ascii=False) for r in recs]}


def pending_rows(src, done: dict[int, str | None], fmt: str, text_params: SamplingParams,
                 error) -> tuple[list[dict], str]:
    """The input's lines still to answer as rows {lineno, line}, and the format; `error(lineno, custom_id,
    code, message)` records a line that does not parse. Resume rules as batch.py's: an answered line is
    skipped, and its custom_id must still be the input's."""
    rows, seen = [], set()
    for lineno, raw in enumerate(src, 1):
        if not raw.strip():
            continue
        if fmt == "auto":
            fmt = sniff_format(raw)
        try:
            if fmt == "jsonl":
                cid = F.parse_jsonl_line(raw, lineno, seen).custom_id
            else:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise F.LineError("invalid_prompt", f"line {lineno} is not UTF-8: {e}", f"line-{lineno}")
                cid = F.parse_text_line(text.rstrip("\r\n"), lineno, text_params).custom_id
            item = None
        except F.LineError as e:
            cid, item = e.custom_id, e
        if lineno in done:
            if done.pop(lineno) != cid:
                raise BatchUsageError(f"cannot resume: the output answers line {lineno} with another custom_id "
                                      f"than the input's {cid!r}; was the input changed?")
            continue
        if item is not None:
            error(lineno, cid, item.code, item.message)
        else:
            rows.append({"lineno": lineno, "line": raw.decode("utf-8")})
    if done:
        raise BatchUsageError(f"the output holds records for {len(done)} line(s) that the input lacks "
                              f"(e.g. line {min(done)}); was the input changed?")
    return rows, fmt


def _count(stats: BatchStats, record: dict) -> None:
    stats.total += 1
    if record.get("error") is None and record["response"]["status_code"] == 200:
        stats.ok += 1
        usage = record["response"]["body"]["usage"]
        stats.prompt_tokens += usage["prompt_tokens"]
        stats.completion_tokens += usage["completion_tokens"]
    else:
        stats.failed += 1


def run_dataset(input_path: str, output_path: str, engine_kwargs: dict, *, n: int, fmt: str = "auto",
                resume: bool = False, overwrite: bool = False, max_in_flight: int | None = None,
                text_params: SamplingParams | None = None, factory: str | None = None, address: str | None = None,
                num_cpus_per_actor: float = 1) -> BatchStats:
    """The whole job on Ray Data (see the module docstring); returns its stats."""
    from kiln.serving.ray_replicas import require_ray
    if fmt not in FORMATS:
        raise BatchUsageError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    check_paths(input_path, output_path, resume=resume, overwrite=overwrite)
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    text_params = text_params or SamplingParams(temperature=0.0, max_tokens=256)
    out, part = Path(output_path), partial_path(output_path)
    stats = BatchStats(output=out)
    if resume and not part.exists() and out.exists():
        os.replace(out, part)
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_APPEND | (0 if resume else os.O_TRUNC), 0o644)
    done: dict[int, str | None] = {}
    if resume:
        repair_torn_tail(fd)
        done = scan_done(part, stats)
    writer, job, t0 = Writer(fd, 1.0), secrets.token_hex(4), time.perf_counter()
    written: set[int] = set()

    def emit(record: dict) -> None:
        writer.write(record)
        written.add(F.lineno_of(record))
        _count(stats, record)

    def error(lineno, cid, code, message):
        emit(F.error_record(F.record_id(job, lineno), cid, f"kiln-batch-{job}-{lineno}", code, message, 400))
    try:
        src = sys.stdin.buffer if input_path == "-" else open(input_path, "rb")
        try:
            rows, fmt = pending_rows(src, done, fmt, text_params, error)
        finally:
            if src is not sys.stdin.buffer:
                src.close()
        if rows:
            # two blocks in flight per actor: --max-in-flight over them all, else max_num_seqs per block
            bs = -(-max_in_flight // (2 * n)) if max_in_flight else engine_kwargs.get("max_num_seqs") or 64
            ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // bs)))
            ds = ds.map_batches(LineWorker, fn_constructor_kwargs=dict(
                engine_kwargs=engine_kwargs, factory=factory, job=job, fmt=fmt, text_params=text_params),
                compute=ray.data.ActorPoolStrategy(size=n, max_concurrent_calls_per_actor=2,
                                                   enable_true_multi_threading=True),
                batch_size=bs, num_cpus=num_cpus_per_actor)
            try:
                for row in ds.iter_rows():
                    if int(row["lineno"]) not in written:          # a re-run block's record comes again
                        emit(json.loads(row["record"]))
            except Exception as e:   # noqa: BLE001 - the dataset failed: what is written is kept for --resume
                raise BatchAborted(f"the Ray Data job failed ({type(e).__name__}: {str(e)[:300]}); "
                                   f"{stats.total} records are kept in the partial output: rerun with --resume")
            missing = {r["lineno"] for r in rows} - written
            if missing:
                raise BatchAborted(f"{len(missing)} lines got no record (e.g. line {min(missing)}); rerun with "
                                   f"--resume")
    finally:
        stats.wall_s = time.perf_counter() - t0
        writer.close()
    publish(part, out)
    return stats


def main(args: Any, engine_kwargs: dict, text_params: SamplingParams, *, factory: str | None = None) -> int:
    """`kiln batch --ray`: run the job on Ray Data over N = --data-parallel-size engine actors."""
    from kiln.config import Env
    n = max(args.data_parallel_size, 1)
    try:
        stats = run_dataset(args.input, args.output, engine_kwargs, n=n, fmt=args.format, resume=args.resume,
                            overwrite=args.overwrite, max_in_flight=args.max_in_flight, text_params=text_params,
                            factory=factory, address=args.ray_address or Env.read().ray_address)
    except BatchAborted as e:
        print(f"kiln batch: {e}", file=sys.stderr)
        return 1
    print(f"{stats.summary()} [Ray Data over {n} engine actors]", file=sys.stderr)
    return 0 if stats.failed == 0 else 1
