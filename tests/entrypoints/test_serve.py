"""`kiln serve`'s process lifecycle (entrypoints/serve.py) in-process on the mock engine: HTTP only
(--no-grpc), gRPC only (no --http-port), a drain that returns 0, and an engine death that returns 1 (the
exit status of `kiln serve`, for a supervisor to restart it); the transports do not import each other."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from kiln.entrypoints.client import KilnClient
from kiln.entrypoints.serve import serve
from kiln.serving.options import ServeOptions
from tests.entrypoints.serving import server_loop
from tests.serving.engines import kill_engine, mock_llm_engine

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serving:
    """serve(opts) running on the test loop with a mock engine; `stop()` drains it; `result(t)` its status."""

    def __init__(self, opts: ServeOptions):
        self.engines = []

        def build():
            self.engines.append(mock_llm_engine())
            return self.engines[-1]

        async def start():
            self.stop_event = asyncio.Event()
            return asyncio.ensure_future(serve(opts, {"model": "mock"}, build=build, stop=self.stop_event))
        loop = server_loop()
        self.task = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        self.loop = loop

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)

    def result(self, timeout: float) -> int:
        async def wait():
            return await asyncio.wait_for(asyncio.shield(self.task), timeout)
        return asyncio.run_coroutine_threadsafe(wait(), self.loop).result(timeout + 5)


def http_get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def wait_for(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, grpc.RpcError):
            pass
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_http_only_then_drain_exits_zero():
    port = free_port()
    s = Serving(ServeOptions(port=None, http_port=port))
    wait_for(lambda: http_get(port, "/health") == 200)
    import openai
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
    assert c.completions.create(model="mock", prompt="hi", max_tokens=3).usage.completion_tokens == 3
    s.stop()
    assert s.result(30) == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)


def test_grpc_only_then_drain_exits_zero():
    port = free_port()
    s = Serving(ServeOptions(port=port, http_port=None))
    target = f"127.0.0.1:{port}"

    def ready():
        with KilnClient(target) as c:
            return c.generate_unary("hi", max_tokens=3, timeout=5).usage.completion_tokens == 3
    wait_for(ready)
    s.stop()
    assert s.result(30) == 0


def test_engine_death_exits_one():
    port, hport = free_port(), free_port()
    s = Serving(ServeOptions(port=port, http_port=hport))
    wait_for(lambda: http_get(hport, "/health") == 200)
    kill_engine(s.engines[0])
    with KilnClient(f"127.0.0.1:{port}") as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate_unary("hi", max_tokens=3, timeout=10)
        assert e.value.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
    assert s.result(30) == 1


@pytest.mark.parametrize("module, forbidden", [
    ("kiln.entrypoints.http_server", ("kiln.entrypoints.grpc_server", "grpc")),
    ("kiln.entrypoints.grpc_server", ("kiln.entrypoints.http_server", "fastapi", "uvicorn")),
    ("kiln.entrypoints.cli", ("kiln.entrypoints.serve", "kiln.entrypoints.grpc_server",
                              "kiln.entrypoints.http_server")),
])
def test_transports_do_not_import_each_other(module, forbidden):
    code = (f"import sys, {module}; bad = [m for m in {forbidden!r} if m in sys.modules]; "
            f"sys.exit(f'imported {{bad}}' if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_kiln_serve_command_exits_one_when_the_engine_dies(monkeypatch):
    """`kiln serve` itself (cli.main, signal handlers and all, on the main thread): once the engine dies, the
    command returns 1 (its exit status) instead of serving a dead engine forever."""
    import threading

    import kiln.engine.llm
    from kiln.entrypoints.cli import main

    def fault(step):
        if any(not r.request_id.startswith("warmup") for r in step.rows):
            raise EngineKilledHere("injected")
    engine = mock_llm_engine()
    engine.runner.fault = fault
    monkeypatch.setattr(kiln.engine.llm, "build_engine", lambda **kw: engine)
    port = free_port()
    errors = []

    def poke():
        try:
            def ready():
                with KilnClient(f"127.0.0.1:{port}") as c:
                    try:
                        c.generate_unary("hi", max_tokens=3, timeout=5)
                    except grpc.RpcError as e:
                        return e.code() in (grpc.StatusCode.INTERNAL,)
            wait_for(ready)
        except BaseException as e:   # noqa: BLE001 - reported by the test thread
            errors.append(e)
    t = threading.Thread(target=poke, daemon=True)
    t.start()
    # Bounded: should the command keep serving the dead engine, SIGTERM ends it after 60s (with 0: a failure).
    watchdog = threading.Timer(60, lambda: os.kill(os.getpid(), signal.SIGTERM))
    watchdog.start()
    try:
        assert main(["--log-level", "WARNING", "serve", "--port", str(port), "--model", "mock"]) == 1
    finally:
        watchdog.cancel()
    t.join(30)
    assert not errors


class EngineKilledHere(BaseException):
    pass
