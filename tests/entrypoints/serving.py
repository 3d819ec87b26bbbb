"""Helpers of the server tests: one event loop for in-process servers, waiting for an engine to go idle, and a
`kiln serve` subprocess."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import subprocess
import sys
import threading
import time

from kiln import config as C
from kiln.engine.async_engine import AsyncEngine


@functools.cache
def server_loop() -> asyncio.AbstractEventLoop:
    """One event loop on a daemon thread for every in-process server of the session (grpc.aio wants one loop)."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="server-test-loop", daemon=True).start()
    return loop


def wait_idle(engine: AsyncEngine, timeout: float = 30) -> dict:
    """The engine's stats once it is idle; fails the test if it is not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = engine.stats()
        if engine.num_pending == 0 and st["blocks_used"] == 0:
            return st
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {engine.num_pending} pending, stats {engine.stats()}")


@contextlib.contextmanager
def serve_process(args: list[str], port_pattern: str):
    """Run `kiln serve ARGS` (lazy compiles), wait until it logs `ready`; yields (process, port, log lines).
    `port_pattern` is a regex whose group 1 is the port in its log. The process is killed on the way out."""
    cmd = [sys.executable, "-m", "kiln.entrypoints.cli", "serve", "--skip-warmup", *args]
    env = dict(os.environ, KILN_MODELS_DIR=str(C.models_dir()))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    ready, port = threading.Event(), []

    def pump():
        for line in proc.stderr:
            lines.append(line)
            m = re.search(port_pattern, line)
            if m:
                port.append(int(m.group(1)))
            if re.search(r"\bready\b", line):
                ready.set()
    threading.Thread(target=pump, daemon=True).start()
    try:
        assert ready.wait(240), "".join(lines)
        yield proc, port[0], lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
