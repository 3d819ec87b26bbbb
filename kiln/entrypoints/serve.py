"""`kiln serve`, the process: one ServingCore, the transports it was asked for, the engine, and the way out.

    gRPC (unless --no-grpc) and HTTP (with --http-port) listen at once, health NOT_SERVING
    engine built (in a worker thread) ─> AsyncEngine(on_death=core.engine_died) ─> warmup ─> SERVING, "ready"
    SIGTERM/SIGINT ─> drain: no new requests (UNAVAILABLE / 503), in-flight ones finish for up to
                      --drain-seconds ─> transports stop ─> exit 0
    engine thread dies ─> core STOPPED: every health endpoint NOT_SERVING / 503 at once ─> transports stop
                      ─> exit 1, so that a supervisor restarts the process
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from typing import Callable

from kiln.engine.async_engine import AsyncEngine, EngineDeadError
from kiln.serving.core import ServingCore
from kiln.serving.health import State
from kiln.serving.options import ServeOptions

log = logging.getLogger(__name__)

EXIT_ENGINE_STOPPED = 1


async def serve(opts: ServeOptions, engine_kwargs: dict | None = None, *, build: Callable | None = None,
                stop: asyncio.Event | None = None) -> int:
    """Serve until SIGTERM/SIGINT or `stop` is set (drains, returns 0) or until the engine stops (returns 1).
    `build()` makes the LLMEngine (default: kiln.engine.llm.build_engine(**engine_kwargs))."""
    engine_kwargs = engine_kwargs or {}
    if build is None:
        from kiln.engine.llm import build_engine
        build = lambda: build_engine(**engine_kwargs)   # noqa: E731
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    core = ServingCore(opts.serving())
    core.health.watch(lambda state: stop.set() if state is State.STOPPED else None)
    transports = []
    try:
        if opts.port is not None:
            from kiln.entrypoints.grpc_server import GrpcServer
            transports.append(GrpcServer(core, opts))
            port = await transports[-1].start()
            log.info("listening on %s:%d%s", opts.host, port, " (TLS)" if opts.tls_cert else "")
        if opts.http_port is not None:
            from kiln.entrypoints.http_server import HttpServer
            transports.append(HttpServer(core, opts))
            log.info("OpenAI-compatible HTTP API on http://%s:%d/v1", opts.host, await transports[-1].start())
        if opts.metrics_port is not None:
            log.info("metrics on http://%s:%d/metrics", opts.host,
                     core.metrics.start_http(opts.metrics_port, opts.host))
        t0 = time.perf_counter()
        built = await loop.run_in_executor(None, build)
        # an LLMEngine gets its engine thread; data-parallel replicas (serving/ray_replicas) are one already
        engine = built if hasattr(built, "generate") else AsyncEngine(built, on_death=core.engine_died)
        try:
            core.attach(engine, opts.served_model_name or engine_kwargs.get("model", ""))
            if not stop.is_set():
                with contextlib.suppress(EngineDeadError):   # then the core is STOPPED and `stop` is set
                    await core.warmup()
                    log.info("ready (engine built and warm in %.1fs)", time.perf_counter() - t0)
            await stop.wait()
            if core.health.state is State.STOPPED:
                log.error("the engine stopped (%s): exiting with status %d", core.health.reason, EXIT_ENGINE_STOPPED)
                return EXIT_ENGINE_STOPPED
            log.info("draining: refusing new requests, waiting up to %.0fs for %d in flight",
                     opts.drain_seconds, len(core.inflight))
            await core.drain(opts.drain_seconds)
            return 0
        finally:
            engine.shutdown()
    finally:
        for t in reversed(transports):
            await t.stop()
        core.metrics.stop_http()
        log.info("stopped")
