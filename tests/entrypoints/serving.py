"""Helpers of the server tests: one event loop for in-process servers, a ServingCore with its transports on it,
waiting for an engine to go idle, and a `kiln serve` subprocess."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import threading
import time

import urllib.error
import urllib.request

from kiln import config as C
from kiln.engine.async_engine import AsyncEngine
from kiln.serving.core import ServingCore
from kiln.serving.options import ServeOptions


@functools.cache
def server_loop() -> asyncio.AbstractEventLoop:
    """One event loop on a daemon thread for every in-process server of the session (grpc.aio wants one loop)."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="server-test-loop", daemon=True).start()
    return loop


def call(coro, timeout: float = 120):
    """Run a coroutine on the server loop and wait for its result."""
    return asyncio.run_coroutine_threadsafe(coro, server_loop()).result(timeout)


class Servers:
    """A ServingCore and the transports asked for (gRPC unless grpc=False, HTTP if http=True) on the server loop.

    `attach(engine)` serves an AsyncEngine (warm: through the core's warmup, so health turns SERVING); build the
    AsyncEngine with `on_death=servers.core.engine_died` to see engine death."""

    def __init__(self, engine: AsyncEngine | None = None, *, grpc: bool = True, http: bool = False,
                 warm: bool = True, model_name: str = "", **opts):
        from kiln.entrypoints.grpc_server import GrpcServer
        from kiln.entrypoints.http_server import HttpServer
        self.opts = ServeOptions(port=0 if grpc else None, http_port=0 if http else None, **opts)
        self.core = ServingCore(self.opts.serving())
        self.model_name = model_name
        self.grpc = GrpcServer(self.core, self.opts) if grpc else None
        self.http = HttpServer(self.core, self.opts) if http else None
        self.port = call(self.grpc.start()) if grpc else None
        self.target = f"127.0.0.1:{self.port}"
        self.http_port = call(self.http.start()) if http else None
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.metrics_port = None
        if self.opts.metrics_port is not None:
            self.metrics_port = self.core.metrics.start_http(self.opts.metrics_port, self.opts.host)
        if engine is not None:
            self.attach(engine, warm)

    def attach(self, engine: AsyncEngine, warm: bool = True) -> None:
        async def attach():
            self.core.attach(engine, self.model_name)
            if warm:
                await self.core.warmup()
        call(attach())

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def close(self) -> None:
        if self.http is not None:
            call(self.http.stop())
        if self.grpc is not None:
            call(self.grpc.stop(0.5))
        self.core.metrics.stop_http()


def post_json(url: str, body: dict, timeout: float = 30) -> tuple[int, dict]:
    """POST `body` as JSON to `url`: (status, the JSON answer), error statuses included."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def mock_servers(*, grpc: bool, http: bool, model_name: str, **engine_kwargs):
    """A module fixture's body: Servers over an AsyncEngine on the mock engine (`engine_kwargs` are
    build_config's), the engine as `.engine_`; closed and shut down after the yield."""
    from tests.mock_engine import mock_engine
    ae = AsyncEngine(mock_engine(**engine_kwargs))
    s = Servers(ae, grpc=grpc, http=http, model_name=model_name)
    s.engine_ = ae
    try:
        yield s
    finally:
        s.close()
        ae.shutdown()


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
