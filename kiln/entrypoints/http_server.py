"""The HTTP transport: the OpenAI-compatible API (FastAPI + uvicorn) over one ServingCore; no gRPC involved.

    POST /v1/completions, /v1/chat/completions:
        Bearer --api-key (401) ─> JSON body (400, 413) ─> `model` is the served name (404)
        ─> openai_protocol.parse_body (400, `param` = the field) ─> core.submit: validation (400), admission
           (429 past --max-queued, 503 warming up / draining / engine stopped)
        ─> one JSON body, or `stream: true`: SSE chunks `data: {...}` then `data: [DONE]`
           (stream_options.include_usage: a last chunk with usage and no choices)
        client disconnect ─> the core's stream is closed ─> abort ─> blocks freed
    GET /v1/models (auth), /health (200 serving, 503 warming up, draining or engine stopped), /metrics (no auth)

kiln errors -> HTTP status and body: openai_protocol.STATUS.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import functools
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.entrypoints import http_embeddings
from kiln.entrypoints import openai_protocol as O
from kiln.serving import errors as E
from kiln.serving import tokens as T
from kiln.serving.core import ServingCore
from kiln.serving.health import State
from kiln.serving.options import ServeOptions


class _SSEResponse(StreamingResponse):
    """An event stream that always runs `on_close` and closes its generator when the response ends (disconnect
    included), so the engine requests behind it are aborted and their slots freed at once."""
    media_type = "text/event-stream"

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self._on_close()


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the request body has been read already)."""
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


class _ClientGone(Exception):
    pass


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: `kiln serve` owns SIGTERM/SIGINT and drains every transport."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    def __init__(self, core: ServingCore, opts: ServeOptions):
        self.core, self.opts = core, opts
        self.app = self._app()
        self.port: int | None = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task | None = None
        self._created = int(time.time())

    # -- lifecycle ------------------------------------------------------------------------------
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

    # -- app ------------------------------------------------------------------------------------
    def _app(self) -> FastAPI:
        app = FastAPI(title="kiln", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, exc: StarletteHTTPException):
            return JSONResponse(O.plain_error_body(exc.status_code, f"{request.method} {request.url.path}: "
                                                                    f"{exc.detail}"), status_code=exc.status_code)

        @app.get("/health")
        async def health():
            with contextlib.suppress(E.ServingError):
                self.core.ready()           # notices a dead engine even before on_death has run
            state = self.core.health.state
            return JSONResponse({"status": state.value}, status_code=200 if state is State.SERVING else 503)

        @app.get("/metrics")
        async def metrics():
            return Response(generate_latest(self.core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models(request: Request):
            try:
                self.core.authenticate(request.headers.get("authorization"))
                engine = self.core.ready()
            except E.ServingError as e:
                return self._error(e)
            return {"object": "list", "data": [self._model_card(engine)]}

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str, request: Request):
            try:
                self.core.authenticate(request.headers.get("authorization"))
                engine = self.core.ready()
                if model_id != self.core.model_name:
                    raise E.NotFound(f"The model `{model_id}` does not exist", "model")
            except E.ServingError as e:
                return self._error(e)
            return self._model_card(engine)

        @app.get("/version")
        async def version():
            try:
                v = importlib.metadata.version("kiln")
            except importlib.metadata.PackageNotFoundError:
                v = "unknown"
            return {"version": v}

        @app.post("/tokenize")
        async def tokenize(request: Request):
            return await self._simple(request, lambda eng, body: T.tokenize(eng, body, self.core.opts.limits))

        @app.post("/detokenize")
        async def detokenize(request: Request):
            return await self._simple(request, T.detokenize)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._generate(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self._generate(request, chat=True)

        http_embeddings.register(app, self)
        return app

    def _model_card(self, engine) -> dict:
        name = self.core.model_name
        return {"id": name, "object": "model", "created": self._created, "owned_by": "kiln", "root": name,
                "parent": None, "max_model_len": engine.engine.config.scheduler.max_model_len}

    async def _simple(self, request: Request, fn) -> JSONResponse:
        """A non-generating call: authenticate, read the body, check its model, fn(engine, body) -> JSON."""
        try:
            self.core.authenticate(request.headers.get("authorization"))
            engine = self.core.ready()
            body = self._check_model(await self._body(request))
            result = fn(engine, body)
        except E.ServingError as e:
            self.core.count(request.url.path, str(O.http_status(e)))
            return self._error(e)
        self.core.count(request.url.path, "200")
        return JSONResponse(result)

    @staticmethod
    def _error(e: E.ServingError) -> JSONResponse:
        return JSONResponse(O.error_body(e), status_code=O.http_status(e))

    def _check_model(self, body: dict) -> dict:
        """The body, if its `model` (optional) is the served one; else 404 model_not_found."""
        model = body.get("model")
        if model is not None and model != self.core.model_name:
            raise E.NotFound(f"The model `{model}` does not exist; this server serves "
                             f"`{self.core.model_name}` (GET /v1/models)", "model")
        return body

    async def _body(self, request: Request) -> dict:
        raw = await request.body()
        if len(raw) > self.opts.max_message_bytes:
            raise E.InvalidRequest(f"request body is {len(raw)} bytes; the limit is {self.opts.max_message_bytes} "
                                   f"(--max-message-mb)")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise E.InvalidRequest(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise E.InvalidRequest(f"request body must be a JSON object, got a {type(body).__name__}")
        return body

    # -- generation -----------------------------------------------------------------------------
    async def _generate(self, request: Request, chat: bool):
        path = request.url.path
        try:
            self.core.authenticate(request.headers.get("authorization"))
            engine = self.core.ready()
            body = self._check_model(await self._body(request))
            prompts, params = O.parse_body(body, chat)
            tools = None
            if chat:
                prompts, tools = O.parse_tools(body, prompts, params, engine.tokenizer.chat_template,
                                               self.core.opts.tool_call_parser)
            req = self.core.submit(prompts, params, id_prefix="chatcmpl" if chat else "cmpl")
        except E.ServingError as e:
            e = O.chat_field(e, chat)
            self.core.count(path, str(O.http_status(e)))
            return self._error(e)
        head = {"id": req.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.core.model_name}
        decode = functools.lru_cache(maxsize=4096)(lambda t: engine.tokenizer.decode([t], skip_special_tokens=False))
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return _SSEResponse(self._events(path, req, O.Chunks(chat, params, head, decode, tools), usage), req.close,
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            finals = await self._collect(request, req)
        except _ClientGone:
            self.core.count(path, "499")
            return Response(status_code=499)
        except E.ServingError as e:
            self.core.count(path, str(O.http_status(e)))
            return self._error(O.chat_field(e, chat))
        self.core.count(path, "200")
        return JSONResponse(O.response(chat, prompts, params, finals, head=head, decode=decode,
                                       tools=tools, body=body))

    async def _collect(self, request: Request, req) -> dict:
        """Run to the end; if the client disconnects first, close the request (abort) and raise _ClientGone."""
        task = asyncio.create_task(req.finals())
        watch = asyncio.create_task(_disconnected(request))
        try:
            try:
                await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:      # this handler was cancelled (server shutting down)
                task.cancel()
                raise
            finally:
                watch.cancel()
            if not task.done():        # the client went away first
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise _ClientGone()
            return task.result()
        finally:
            req.close()                # if the task never started, its slots are still held

    async def _events(self, path: str, req, chunks: O.Chunks, include_usage: bool) -> AsyncIterator[bytes]:
        status, finals = "499", {}
        try:
            async with contextlib.aclosing(req.outputs()) as s:
                async for i, out in s:
                    finals[i] = out
                    for c in chunks(i, out):
                        yield O.sse(c)
            if include_usage:
                yield O.sse(chunks.usage_chunk(finals))
            yield b"data: [DONE]\n\n"
            status = "200"
        except E.ServingError as e:
            status = str(O.http_status(e))
            yield O.sse(O.error_body(O.chat_field(e, chunks.chat)))
        finally:
            self.core.count(path, status)
