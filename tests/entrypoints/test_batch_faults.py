"""Batch jobs under faults, on the mock engine in a subprocess: SIGKILL at ten random moments with a resume after
each, a disk that fills up (a 48 KiB tmpfs) and an output folder that cannot be written. Pass: in the end exactly
one valid record per input line (each line answered once, with the mock's hand-computable text), a clear error
naming the cause, and a partial output that --resume continues."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from kiln.backends.mock import next_token
from kiln.entrypoints import batch_format as F
from tests.mock_engine import tiny_tokenizer
from tests.tiny import VOCAB

REPO = Path(__file__).resolve().parents[2]
N_LINES = 240
MAX_TOKENS = 6


def _input(path: Path) -> Path:
    rows = [json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": F.COMPLETIONS_URL,
                        "body": {"model": "mock", "prompt": f"line {i} " * (1 + i % 7), "max_tokens": MAX_TOKENS,
                                 "temperature": 0, "ignore_eos": True}}) for i in range(N_LINES)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _cmd(inp: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tests.entrypoints.batch_worker", str(inp), str(out), *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def _expected_text(i: int) -> str:
    tok = tiny_tokenizer()
    ids = tok.encode(f"line {i} " * (1 + i % 7))
    for _ in range(MAX_TOKENS):
        ids.append(next_token(ids[-1], len(ids) - 1, VOCAB))
    return tok.decode(ids[-MAX_TOKENS:])


def _check_complete(out: Path) -> None:
    records = [json.loads(x) for x in out.read_text().splitlines()]
    lines = sorted(F.lineno_of(r) for r in records)
    assert lines == list(range(1, N_LINES + 1)), "not exactly one record per input line"
    for r in records:
        i = F.lineno_of(r) - 1
        assert r["custom_id"] == f"req-{i}" and r["error"] is None, r
        assert r["response"]["body"]["choices"][0]["text"] == _expected_text(i)


def _records(path: Path) -> int:
    """Whole records in a (partial) output."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_at_ten_random_moments_then_resume(tmp_path):
    inp, out = _input(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    part = out.with_name(out.name + ".partial")
    rng = random.Random(7)
    kills = 0
    for attempt in range(10):
        before = _records(part)
        proc = subprocess.Popen(_cmd(inp, out, "--step-seconds", "0.01", *(["--resume"] if attempt else [])),
                                cwd=REPO, env=_env(), stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while _records(part) <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)                              # the job has written something new
        time.sleep(rng.uniform(0.0, 0.3))
        assert proc.poll() is None and not out.exists(), "the job ended before its kill"
        os.kill(proc.pid, signal.SIGKILL)
        kills += 1
        proc.wait(timeout=30)
        assert 0 < _records(part) < N_LINES
    with part.open("ab") as f:                            # a record torn by the kill, as a crash mid-write leaves
        f.write(b'{"id": "batch_req_x_1", "custom_')
    r = subprocess.run(_cmd(inp, out, "--resume"), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    _check_complete(out)


def test_full_disk_gives_a_clear_error_and_a_resumable_partial(tmp_path):
    inp = _input(tmp_path / "in.jsonl")
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)], check=True)
    try:
        out = disk / "out.jsonl"
        r = subprocess.run(_cmd(inp, out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "No space left on device" in r.stderr, r.stderr[-2000:]
        part = out.with_name(out.name + ".partial")
        assert not out.exists() and part.exists()
        kept = part.read_bytes()
        assert 0 < kept.count(b"\n") < N_LINES
        shutil.copy(part, tmp_path / "out.jsonl.partial")       # room again: the same partial resumes elsewhere
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    out = tmp_path / "out.jsonl"
    r = subprocess.run(_cmd(inp, out, "--resume"), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    _check_complete(out)


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    inp = _input(tmp_path / "in.jsonl")
    locked = tmp_path / "locked"
    locked.mkdir()
    subprocess.run(["chattr", "+i", str(locked)], check=True)   # immutable: even root cannot create files there
    try:
        r = subprocess.run(_cmd(inp, locked / "out.jsonl"), cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=120)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert r.returncode == 2 and "Operation not permitted" in r.stderr and "out.jsonl.partial" in r.stderr, r.stderr
    assert list(locked.iterdir()) == []
