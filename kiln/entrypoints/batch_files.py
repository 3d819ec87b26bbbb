"""The files of a `kiln batch` job: the paths' checks, the `<out>.partial` output (appended one record per write,
fsync'ed about once a second, a torn last line cut off on resume, the records already there read back), and the
input read in chunks on a worker thread."""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import IO

from kiln.entrypoints import batch_format as F

READ_CHUNK = 1 << 16              # bytes of input read per hop to the reader thread


class BatchUsageError(ValueError):
    """The job cannot start or go on as asked (missing input, existing output, mismatched resume)."""


def partial_path(output: str | os.PathLike) -> Path:
    out = Path(output)
    return out.with_name(out.name + ".partial")


def publish(part: Path, out: Path) -> None:
    """Move the finished partial file to the output path atomically, and make the rename durable."""
    os.replace(part, out)
    dfd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def check_paths(input_path: str, output_path: str | os.PathLike, *, resume: bool = False,
                overwrite: bool = False) -> None:
    """Usage errors that need no model: raise BatchUsageError before anything is loaded."""
    if resume and overwrite:
        raise BatchUsageError("--resume and --overwrite contradict each other; pick one")
    if input_path != "-" and not Path(input_path).is_file():
        raise BatchUsageError(f"input file not found: {input_path}")
    out, part = Path(output_path), partial_path(output_path)
    if not out.parent.is_dir():
        raise BatchUsageError(f"output folder does not exist: {out.parent}")
    if out.is_dir():
        raise BatchUsageError(f"output path is a folder: {out}")
    if not resume and not overwrite:
        if part.exists():
            raise BatchUsageError(f"{part} is left from an interrupted job: pass --resume to continue it "
                                  f"or --overwrite to start over")
        if out.exists():
            raise BatchUsageError(f"{out} exists: pass --overwrite to replace it (or --resume to answer only "
                                  f"input lines it lacks)")


# -- the output file ------------------------------------------------------------------------------
def repair_torn_tail(fd: int) -> int:
    """Cut the file after its last newline (a record torn by a kill mid-write); returns bytes removed."""
    size = os.fstat(fd).st_size
    pos = size
    while pos > 0:
        step = min(pos, READ_CHUNK)
        buf = os.pread(fd, step, pos - step)
        i = buf.rfind(b"\n")
        if i >= 0:
            pos = pos - step + i + 1
            break
        pos -= step
    if pos != size:
        os.ftruncate(fd, pos)
    return size - pos


def scan_done(path: Path, stats) -> dict[int, str | None]:
    """Input line -> custom_id of every record already in a partial output; counts them into stats."""
    done: dict[int, str | None] = {}
    with open(path, "rb") as f:
        for k, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except ValueError:
                raise BatchUsageError(f"cannot resume: line {k} of {path} is not JSON") from None
            n = F.lineno_of(rec)
            if n is None or n in done:
                raise BatchUsageError(f"cannot resume: line {k} of {path} is not a kiln batch record "
                                      f"(or answers line {n} twice)")
            done[n] = rec.get("custom_id")
            if rec.get("error") is None:
                stats.ok += 1
            else:
                stats.failed += 1
    stats.total = stats.resumed = len(done)
    return done


class Writer:
    """Appends whole records with one write each; fsyncs at most every `fsync_s` seconds and at close."""

    def __init__(self, fd: int, fsync_s: float):
        self.fd, self.fsync_s, self.last_sync = fd, fsync_s, time.monotonic()

    def write(self, record: dict) -> None:
        data = memoryview(F.dumps(record))
        while data:
            data = data[os.write(self.fd, data):]
        now = time.monotonic()
        if now - self.last_sync >= self.fsync_s:
            os.fsync(self.fd)
            self.last_sync = now

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)


# -- the input ------------------------------------------------------------------------------------
def count_lines(path: str) -> int | None:
    """Non-blank lines of a file (the progress total); None for stdin."""
    if path == "-":
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


async def read_lines(f: IO[bytes]):
    """(line number, raw line) of a binary stream, read in chunks on a worker thread (stdin may block)."""
    loop = asyncio.get_running_loop()
    n = 0
    while True:
        chunk = await loop.run_in_executor(None, f.readlines, READ_CHUNK)
        if not chunk:
            return
        for line in chunk:
            n += 1
            yield n, line


def sniff_format(first_line: bytes) -> str:
    """auto: JSONL when the first non-blank line starts with `{`, plain prompts otherwise."""
    return "jsonl" if first_line.lstrip().startswith(b"{") else "text"
