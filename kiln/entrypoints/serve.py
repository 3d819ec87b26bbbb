"""`kiln serve`, the process: flags -> options, gRPC (and HTTP) listening at once with health NOT_SERVING,
the engine built and warmed, `ready`, then on SIGTERM/SIGINT a drain (no new requests, in-flight ones finish
for up to --drain-seconds) and exit 0. The servers themselves are grpc_server.py and http_server.py.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

from kiln.engine.async_engine import AsyncEngine
from kiln.entrypoints.grpc_server import KilnServer, ServeOptions

log = logging.getLogger(__name__)


def options_from_args(a) -> ServeOptions:
    key = a.api_key
    if a.api_key_file:
        key = Path(a.api_key_file).read_text().strip()
        if not key:
            raise ValueError(f"--api-key-file {a.api_key_file} is empty")
    return ServeOptions(host=a.host, max_queued=a.max_queued, drain_seconds=a.drain_seconds,
                        api_key=key or None, tls_cert=a.tls_cert, tls_key=a.tls_key, metrics_port=a.metrics_port,
                        max_message_bytes=int(a.max_message_mb * 2**20),
                        port=None if a.no_grpc else a.port, http_port=a.http_port,
                        served_model_name=a.served_model_name)


async def serve(opts: ServeOptions, engine_kwargs: dict) -> int:
    from kiln.engine.llm import build_engine

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = KilnServer(opts)
    port = await server.start()
    if port is not None:
        log.info("listening on %s:%d%s", opts.host, port, " (TLS)" if opts.tls_cert else "")
    http = None
    if opts.http_port is not None:
        from kiln.entrypoints.http_server import HttpServer
        http = HttpServer(server)
        log.info("OpenAI-compatible HTTP API on http://%s:%d/v1", opts.host, await http.start())
    if server.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", opts.host, server.metrics_port)
    t0 = time.perf_counter()
    engine = AsyncEngine(await loop.run_in_executor(None, lambda: build_engine(**engine_kwargs)))
    try:
        server.attach(engine, opts.served_model_name or engine_kwargs.get("model", ""))
        if not stop.is_set():
            await server.warmup()
            log.info("ready (engine built and warm in %.1fs)", time.perf_counter() - t0)
        await stop.wait()
        log.info("draining: refusing new requests, waiting up to %.0fs for %d in flight",
                 opts.drain_seconds, len(server.servicer.requests))
        await server.drain(opts.drain_seconds)
        if http is not None:
            await http.stop()
        await server.stop()
        log.info("stopped")
    finally:
        engine.shutdown()
    return 0


def add_serve_args(p) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    g.add_argument("--port", type=int, default=50051, help="gRPC port (default: %(default)s; 0 = any free port)")
    g.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                        "/v1/models, /health, /metrics) on this port, same host (0 = any free port)")
    g.add_argument("--no-grpc", action="store_true", help="serve only the HTTP API (needs --http-port)")
    g.add_argument("--served-model-name", default=None,
                   help="model name reported by GetModelInfo and /v1/models and expected in HTTP requests' "
                        "`model` (default: the --model value)")
    g.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    g.add_argument("--max-queued", type=int, default=64,
                   help="requests allowed to wait beyond the running batch; more get RESOURCE_EXHAUSTED (HTTP 429) "
                        "(default: %(default)s)")
    g.add_argument("--drain-seconds", type=float, default=30.0,
                   help="on SIGTERM, how long in-flight requests may take to finish (default: %(default)s)")
    g.add_argument("--api-key", default=None, help="require 'authorization: Bearer <key>' (gRPC metadata and "
                                                    "HTTP header of /v1/* calls)")
    g.add_argument("--api-key-file", default=None, help="read the API key from this file")
    g.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key: serve TLS)")
    g.add_argument("--tls-key", default=None, help="PEM private key")
    g.add_argument("--max-message-mb", type=float, default=16.0, help="largest request/response (default: 16)")


def cmd_serve(a) -> int:
    from kiln.entrypoints.cli import engine_kwargs
    return asyncio.run(serve(options_from_args(a), engine_kwargs(a)))
