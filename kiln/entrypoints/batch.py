"""`kiln batch`: run a file of requests through one engine, offline, resumable, one output line per input line.

    input (file or stdin) ── read in chunks ──> line -> BatchRequest | LineError (batch_format)
        LineError ─────────────────────────────────────────────────┐
        BatchRequest ── at most --max-in-flight at once ──> ServingCore.submit (validation: InvalidRequest
                        is the line's 400 record) ──> the engine (continuous batching)
                                                      finished ──> record ──> append to <out>.partial
    all lines answered ──> fsync ──> rename <out>.partial -> <out>      (the files: batch_files.py)

Files. Results go to `<out>.partial` (same folder) as each request finishes, one `os.write` per record, and
are fsync'ed about once a second; the finished file is renamed to `<out>` only when every input line has its
record. Without --resume an existing `<out>.partial` or `<out>` is an error (exit 2) unless --overwrite.
With --resume, `<out>.partial` is continued (a torn last line, from a kill mid-write, is cut off first);
if only a finished `<out>` exists it is continued the same way (new input lines get answered). Records
name their input line (`id` = `batch_req_<job>_<line>`), so a resumed job skips exactly the lines already
answered and checks that their custom_ids still match the input. Resume needs the same input, in the
same order.

Order. Records are written in completion order, not input order; `custom_id` is the key.
Blank lines are skipped and get no record. Exit status: 0 when every record is a success, 1 when any line
failed (or the engine stopped: rerun with --resume), 2 for usage errors.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import secrets
import sys
import time
from pathlib import Path
from typing import IO, Any

from kiln.engine.async_engine import AsyncEngine
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sampling_params import SamplingParams
from kiln.entrypoints import batch_format as F
from kiln.entrypoints import embeddings_format as EF
from kiln.entrypoints import openai_protocol as O
from kiln.entrypoints.batch_files import (BatchUsageError, Writer, check_paths, count_lines, partial_path, publish,
                                          read_lines, repair_torn_tail, scan_done, sniff_format)
from kiln.serving import errors as E
from kiln.serving.core import ServingCore
from kiln.serving.options import ServingOptions

__all__ = ["BatchAborted", "BatchStats", "BatchUsageError", "check_paths", "main", "partial_path",
           "repair_torn_tail", "run_batch", "run_batch_async", "sniff_format"]

FORMATS = ("auto", "jsonl", "text")


class BatchAborted(RuntimeError):
    """The engine stopped mid-job; what was written is kept in the partial file for --resume."""


@dataclasses.dataclass
class BatchStats:
    output: Path
    total: int = 0                # records in the output (= non-blank input lines when complete)
    resumed: int = 0              # of which were already there when the job started
    ok: int = 0                   # successes, all records
    failed: int = 0               # failures, all records
    prompt_tokens: int = 0        # this run's successful requests
    completion_tokens: int = 0
    wall_s: float = 0.0

    @property
    def new(self) -> int:
        return self.total - self.resumed

    def summary(self) -> str:
        w = max(self.wall_s, 1e-9)
        return (f"kiln batch: {self.total} records in {self.output} ({self.ok} ok, {self.failed} failed"
                f"{f'; {self.resumed} from before the resume' if self.resumed else ''}); this run: "
                f"{self.new} requests, {self.prompt_tokens} tokens in, {self.completion_tokens} tokens out, "
                f"{self.wall_s:.1f}s wall, {self.new / w:.2f} req/s, {self.completion_tokens / w:.1f} output tok/s")


# -- the job --------------------------------------------------------------------------------------
class _Job:
    def __init__(self, engine: AsyncEngine, src: IO[bytes], writer: Writer, stats: BatchStats, *,
                 done: dict[int, str | None], fmt: str, text_params: SamplingParams, max_in_flight: int,
                 total: int | None, progress: bool):
        self.engine, self.src, self.writer, self.stats, self.done = engine, src, writer, stats, done
        self.core = ServingCore(ServingOptions(max_queued=None))   # no admission limit: max_in_flight bounds it
        self.core.attach(engine, engine.engine.config.model.model)
        self.core.start_serving()
        self.fmt, self.text_params, self.max_in_flight = fmt, text_params, max_in_flight
        self.job = secrets.token_hex(4)
        self.created = int(time.time())
        self.model = engine.engine.config.model.model
        self.decode = functools.lru_cache(maxsize=65536)(
            lambda t: engine.tokenizer.decode([t], skip_special_tokens=False))
        self.fatal: BaseException | None = None
        self.t0 = time.perf_counter()
        self.bar = None
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=len(done), desc="kiln batch", unit="req", file=sys.stderr,
                            dynamic_ncols=True, smoothing=0.05)
        self._last_postfix = 0.0

    # records
    def _rid(self, lineno: int) -> str:
        return f"kiln-batch-{self.job}-{lineno}"

    def _emit(self, record: dict, ok: bool) -> None:
        self.writer.write(record)
        self.stats.total += 1
        if ok:
            self.stats.ok += 1
        else:
            self.stats.failed += 1
        if self.bar is not None:
            self.bar.update(1)
            now = time.perf_counter()
            if now - self._last_postfix > 0.5:
                self._last_postfix = now
                self.bar.set_postfix(failed=self.stats.failed,
                                     tok_s=f"{self.stats.completion_tokens / max(now - self.t0, 1e-9):.1f}",
                                     refresh=False)

    def _error(self, lineno: int, custom_id: str | None, code: str, message: str, status: int = 400) -> None:
        self._emit(F.error_record(F.record_id(self.job, lineno), custom_id, self._rid(lineno), code, message,
                                  status), ok=False)

    # one request
    async def _serve(self, req: F.BatchRequest) -> None:
        rid = self._rid(req.lineno)
        if req.model is not None and req.model != self.model:
            self._error(req.lineno, req.custom_id, "model_not_found",
                        f"The model `{req.model[:200]}` does not exist; this job serves `{self.model}`", 404)
            return
        try:
            if req.url == F.EMBEDDINGS_URL:
                return await self._embed(req, rid)
            prompts, tools = [req.prompt], None
            if req.tools:
                prompts, tools = O.parse_tools(req.tools, prompts, req.params, self.engine.tokenizer.chat_template)
            final = (await self.core.submit(prompts, req.params, request_id=rid).finals())[0]
            body = F.response_body(req, final, model=self.model, created=self.created, decode=self.decode,
                                   body_id=("chatcmpl-" if req.url == F.CHAT_URL else "cmpl-") + rid[11:])
            if tools is not None:
                O.tool_choices(body["choices"], tools)
            self.stats.prompt_tokens += body["usage"]["prompt_tokens"]
            self.stats.completion_tokens += body["usage"]["completion_tokens"]
            self._emit(F.ok_record(F.record_id(self.job, req.lineno), req.custom_id, rid, body), ok=True)
        except E.InvalidRequest as e:      # prompt too long, token ids out of range, bad chat role, ...
            self._error(req.lineno, req.custom_id, "invalid_request", e.message)
        except (E.Internal, E.Unavailable) as e:   # the engine stopped: keep what is written, for --resume
            self.fatal = self.fatal or e
        except asyncio.CancelledError:
            raise
        except Exception as e:            # a bug of ours: answer the line, keep the job going
            self._error(req.lineno, req.custom_id, "internal_error", f"{type(e).__name__}: {e}", 500)

    async def _embed(self, req: F.BatchRequest, rid: str) -> None:
        """An embeddings line (embeddings_format; its errors are _serve's)."""
        EF.check_dimensions(req.dimensions, self.core.ready().engine.spec.hidden_size)
        outs = await self.core.embed(req.prompt, req.params, request_id=rid)
        body = EF.response(outs, model=self.model, encoding_format=req.encoding_format,
                           request_id="embd-" + rid[11:], created=self.created)
        self.stats.prompt_tokens += body["usage"]["prompt_tokens"]
        self._emit(F.ok_record(F.record_id(self.job, req.lineno), req.custom_id, rid, body), ok=True)

    def _parse(self, lineno: int, raw: bytes, seen: set[str]) -> F.BatchRequest | F.LineError:
        try:
            if self.fmt == "jsonl":
                return F.parse_jsonl_line(raw, lineno, seen)
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise F.LineError("invalid_prompt", f"line {lineno} is not UTF-8: {e}", f"line-{lineno}")
            return F.parse_text_line(text, lineno, self.text_params)
        except F.LineError as e:
            return e

    async def run(self) -> None:
        sem = asyncio.Semaphore(self.max_in_flight)
        tasks: set[asyncio.Task] = set()
        seen: set[str] = set()

        def finished(t: asyncio.Task) -> None:
            tasks.discard(t)
            sem.release()

        try:
            async for lineno, raw in read_lines(self.src):
                if not raw.strip():
                    continue
                if self.fmt == "auto":
                    self.fmt = sniff_format(raw)
                item = self._parse(lineno, raw, seen)
                cid = item.custom_id
                if lineno in self.done:
                    before = self.done.pop(lineno)
                    if before != cid:
                        raise BatchUsageError(f"cannot resume: the output answers line {lineno} as custom_id "
                                              f"{before!r} but the input has {cid!r} there; was the input changed?")
                    continue
                if isinstance(item, F.LineError):
                    self._error(lineno, cid, item.code, item.message)
                    continue
                await sem.acquire()
                if self.fatal is not None:
                    sem.release()
                    break
                t = asyncio.create_task(self._serve(item))
                tasks.add(t)
                t.add_done_callback(finished)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for t in list(tasks):
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self.stats.wall_s = time.perf_counter() - self.t0
            if self.bar is not None:
                self.bar.close()
        if self.fatal is not None:
            raise BatchAborted(f"the engine stopped ({self.fatal}); {self.stats.total} records are kept in the "
                               f"partial output: rerun with --resume")
        if self.done:
            raise BatchUsageError(f"the output holds records for {len(self.done)} line(s) that the input lacks "
                                  f"(e.g. line {min(self.done)}); was the input changed?")


async def run_batch_async(engine: AsyncEngine, input_path: str, output_path: str | os.PathLike, *,
                          fmt: str = "auto", resume: bool = False, overwrite: bool = False,
                          max_in_flight: int | None = None, text_params: SamplingParams | None = None,
                          progress: bool = True, fsync_s: float = 1.0) -> BatchStats:
    """The job on a running AsyncEngine (see the module docstring for files, resume and order)."""
    if fmt not in FORMATS:
        raise BatchUsageError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    check_paths(input_path, output_path, resume=resume, overwrite=overwrite)
    out, part = Path(output_path), partial_path(output_path)
    stats = BatchStats(output=out)
    if resume and not part.exists() and out.exists():
        os.replace(out, part)             # a finished job: continue it like a partial one
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | (0 if resume else os.O_TRUNC)
    fd = os.open(part, flags, 0o644)
    try:
        done: dict[int, str | None] = {}
        if resume:
            repair_torn_tail(fd)
            done = scan_done(part, stats)
        max_in_flight = max_in_flight or 2 * engine.engine.config.scheduler.max_num_seqs
        if max_in_flight < 1:
            raise BatchUsageError(f"max_in_flight must be at least 1, got {max_in_flight}")
        writer = Writer(fd, fsync_s)
    except BaseException:
        os.close(fd)
        raise
    src = sys.stdin.buffer if input_path == "-" else open(input_path, "rb")
    try:
        job = _Job(engine, src, writer, stats, done=done, fmt=fmt,
                   text_params=text_params or SamplingParams(temperature=0.0, max_tokens=256),
                   max_in_flight=max_in_flight, total=count_lines(input_path) if progress else None,
                   progress=progress)
        await job.run()
    finally:
        if src is not sys.stdin.buffer:
            src.close()
        writer.close()
    publish(part, out)
    return stats


def run_batch(engine: LLMEngine | AsyncEngine, input_path: str, output_path: str | os.PathLike,
              **kwargs: Any) -> BatchStats:
    """Run a batch job to the end (blocking). Given an LLMEngine, drives it with an AsyncEngine of its own
    and stops that when done, so the LLMEngine may be used again afterwards. Keywords: `run_batch_async`'s."""
    owned = isinstance(engine, LLMEngine)
    aengine = AsyncEngine(engine) if owned else engine
    try:
        return asyncio.run(run_batch_async(aengine, input_path, output_path, **kwargs))
    finally:
        if owned:
            aengine.shutdown()


def main(args: Any, engine_kwargs: dict, text_params: SamplingParams) -> int:
    """`kiln batch` (its flags live in args.py): check the paths, load the model, run, summarise."""
    if getattr(args, "data_parallel_size", 1) > 1 or getattr(args, "ray", False) or getattr(args, "ray_address", None):
        from kiln.entrypoints import batch_ray      # N engine replicas on Ray
        return batch_ray.main(args, engine_kwargs, text_params)
    check_paths(args.input, args.output, resume=args.resume, overwrite=args.overwrite)
    if args.format not in FORMATS:
        raise BatchUsageError(f"format must be one of {', '.join(FORMATS)}")
    from kiln.engine.llm import build_engine
    engine = build_engine(**engine_kwargs)
    try:
        stats = run_batch(engine, args.input, args.output, fmt=args.format, resume=args.resume,
                          overwrite=args.overwrite, max_in_flight=args.max_in_flight, text_params=text_params,
                          progress=not args.no_progress)
    except BatchAborted as e:
        print(f"kiln batch: {e}", file=sys.stderr)
        return 1
    print(stats.summary(), file=sys.stderr)
    return 0 if stats.failed == 0 else 1
