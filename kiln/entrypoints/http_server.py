"""The HTTP transport: the OpenAI-compatible API (FastAPI + uvicorn) over one ServingCore; no gRPC involved.

    http_generate   POST /v1/completions, /v1/chat/completions (JSON bodies or SSE streams)
    http_info       GET /health, /metrics, /v1/models, /v1/models/{id}, /version; POST /tokenize, /detokenize
    http_common     what the routes share: HttpContext (core, options, body and model checks), error responses

A route module exposes `router(ctx: HttpContext) -> fastapi.APIRouter`; the app includes every factory of
ROUTERS, in order. A new endpoint is one module and one line in ROUTERS.

kiln errors -> HTTP status and body: openai_protocol.STATUS.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Callable

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.entrypoints import http_embeddings, http_generate, http_info
from kiln.entrypoints import openai_protocol as O
from kiln.entrypoints.http_common import HttpContext
from kiln.serving.core import ServingCore
from kiln.serving.options import ServeOptions

# The routers of the app: each factory gets the server's HttpContext. Add new endpoint modules here.
ROUTERS: list[Callable[[HttpContext], APIRouter]] = [
    http_info.router,
    http_generate.router,
    http_embeddings.router,
]


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: `kiln serve` owns SIGTERM/SIGINT and drains every transport."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def build_app(ctx: HttpContext, routers: list[Callable[[HttpContext], APIRouter]] | None = None) -> FastAPI:
    """The FastAPI app: HTTP-layer errors (unknown path, wrong method) in OpenAI's error shape, then the routers."""
    app = FastAPI(title="kiln", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(O.plain_error_body(exc.status_code, f"{request.method} {request.url.path}: "
                                                                f"{exc.detail}"), status_code=exc.status_code)

    for make in ROUTERS if routers is None else routers:
        app.include_router(make(ctx))
    return app


class HttpServer:
    def __init__(self, core: ServingCore, opts: ServeOptions):
        self.core, self.opts = core, opts
        self.ctx = HttpContext(core, opts)
        self.app = build_app(self.ctx)
        self.port: int | None = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind opts.host:opts.http_port (0: a free port) and serve in the running loop; returns the port."""
        host, port = self.opts.host, self.opts.http_port or 0
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            sock.close()
            raise OSError(f"cannot bind HTTP {host}:{port}: {e}") from None
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, host=host, port=self.port, log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=5, timeout_keep_alive=5,
                                ssl_certfile=self.opts.tls_cert, ssl_keyfile=self.opts.tls_key,
                                ssl_ca_certs=self.opts.tls_client_ca,
                                ssl_cert_reqs=ssl.CERT_REQUIRED if self.opts.tls_client_ca else ssl.CERT_NONE)
        self._server = _Uvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="kiln-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise OSError(f"HTTP server on {host}:{self.port} stopped during startup")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
