"""The OpenAI-compatible HTTP API (FastAPI + uvicorn), beside the gRPC service, over the same AsyncEngine.

    `kiln serve --http-port N`: HttpServer(kiln_server).start() binds in the gRPC server's asyncio loop and shares
    its state: readiness (warmup), draining (SIGTERM), the admission rule (--max-queued), the API key, the
    in-flight request set (drain waits for HTTP requests too) and the Prometheus registry.

    POST /v1/completions, /v1/chat/completions:
        Bearer --api-key (401) ─> body ─> `model` is the served name (404) ─> SamplingParams by batch_format's
        parsers (400, `param` = the field the message names) ─> engine validation per prompt (400)
        ─> admission (429 past --max-queued, 503 warming up / draining) ─> AsyncEngine.generate per prompt
        ─> one JSON body (batch_format.response_body), or `stream: true`: SSE chunks `data: {...}` then
           `data: [DONE]` (stream_options.include_usage: a last chunk with usage and no choices)
        client disconnect ─> the engine streams are closed ─> abort ─> blocks freed
    GET /v1/models (auth), /health (200 serving, 503 warming up or draining), /metrics (no auth)

A completions `prompt` may be a list of prompts: each is its own engine request, and choice `index` is
prompt_index * n + sample_index, as in vLLM and the OpenAI API.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.engine.async_engine import EngineDeadError
from kiln.engine.outputs import DeltaTracker, RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.entrypoints import batch_format as F
from kiln.entrypoints.metrics import RequestObserver

log = logging.getLogger(__name__)

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
_FIELDS = ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
           "min_p", "n", "seed", "stop", "stop_token_ids", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "logit_bias", "logprobs", "top_logprobs", "ignore_eos", "min_tokens", "best_of",
           "include_stop_str_in_output", "skip_special_tokens", "response_format", "tools", "functions", "suffix",
           "echo", "stream", "stream_options", "use_beam_search", "prompt_logprobs")


class HttpError(Exception):
    """An OpenAI-shaped error: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def param_of(message: str, chat: bool = False) -> str | None:
    """The request field an error message is about: its first word, when that names a field."""
    word = message.split(" ", 1)[0].split("[", 1)[0].split(".", 1)[0].rstrip(":,")
    if word == "prompt_token_ids":
        word = "prompt"
    if chat and word == "prompt":
        return "messages"
    if chat and word == "logprobs" and "must be in" in message:
        return "top_logprobs"
    return word if word in _FIELDS else None


def _bad(message: str, chat: bool) -> HttpError:
    return HttpError(400, message, param_of(message, chat))


# -- request bodies ---------------------------------------------------------------------------------
def completion_prompts(body: dict) -> list[str | list[int]]:
    """A completions `prompt`: a string, token ids, or a list of either (one engine request each)."""
    p = body.get("prompt")

    def ids(x) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
    if isinstance(p, str) or ids(p):
        return [p]
    if isinstance(p, list) and p and (all(isinstance(x, str) for x in p) or all(ids(x) for x in p)):
        return list(p)
    raise HttpError(400, "prompt must be a string, a list of token ids, or a non-empty list of strings or of "
                         f"token id lists; got {json.dumps(p)[:80]}", "prompt")


def parse_body(body: dict, chat: bool) -> tuple[list, SamplingParams]:
    """(prompts, SamplingParams) of a request body, by the batch runner's parsers; HttpError 400 on bad input."""
    if body.get("echo"):
        raise HttpError(400, "echo is not supported", "echo")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise HttpError(400, f"stream_options must be an object, got {opts!r}", "stream_options")
    if not isinstance(body.get("stream", False), bool):
        raise HttpError(400, f"stream must be true or false, got {body['stream']!r}", "stream")
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}   # batch jobs refuse stream
    try:
        if chat:
            return [F.chat_messages(plain)], F.chat_params(plain)
        return completion_prompts(plain), F.completion_params(plain)
    except F.LineError as e:
        raise _bad(e.message, chat) from None
    except ValueError as e:          # SamplingParams' own validation: the message names the field
        raise _bad(str(e), chat) from None


# -- responses --------------------------------------------------------------------------------------
def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode() + b"\n\n"


def _usage(finals: dict[int, RequestOutput]) -> dict:
    n_in = sum(len(o.prompt_token_ids) for o in finals.values())
    n_out = sum(len(c.token_ids) for o in finals.values() for c in o.outputs)
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


class _Chunks:
    """Cumulative RequestOutputs -> OpenAI stream chunks (what is new for each choice since the last chunk)."""

    def __init__(self, chat: bool, params: SamplingParams, head: dict, decode):
        self.chat, self.params, self.head, self.decode = chat, params, head, decode
        self.tracker = DeltaTracker()

    def __call__(self, i: int, out: RequestOutput) -> list[dict]:
        chunks, k = [], self.params.logprobs
        for c in out.outputs:
            idx = i * self.params.n + c.index
            d = self.tracker.delta(idx, c)
            if not (d.text or d.token_ids or d.finishing or (d.first and self.chat)):
                continue
            lp = None
            if k is not None and d.logprobs is not None and d.token_ids:
                lp = F.chat_logprobs(d.token_ids, d.logprobs, k, self.decode) if self.chat else \
                    F.completion_logprobs(d.token_ids, d.logprobs, k, self.decode, offset=d.text_offset)
            choice: dict[str, Any] = {"index": idx}
            if self.chat:
                choice["delta"] = ({"role": "assistant", "content": d.text} if d.first else {"content": d.text})
            else:
                choice["text"] = d.text
            choice.update(logprobs=lp, finish_reason=c.finish_reason if d.finishing else None,
                          stop_reason=c.stop_reason if d.finishing else None)
            chunks.append(dict(self.head, choices=[choice]))
        return chunks


class _SSEResponse(StreamingResponse):
    """An event stream whose generator is always closed when the response ends (disconnect included), so that
    the engine requests behind it are aborted at once rather than when the generator is garbage-collected."""
    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the request body has been read already)."""
    while True:
        if (await request.receive())["type"] == "http.disconnect":
            return


class _ClientGone(Exception):
    pass


# -- the server -------------------------------------------------------------------------------------
class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: `kiln serve` owns SIGTERM/SIGINT and drains both APIs."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """The OpenAI-compatible API of one KilnServer (its options, servicer state and metrics)."""

    def __init__(self, kiln):
        self.kiln, self.opts, self.servicer, self.metrics = kiln, kiln.opts, kiln.servicer, kiln.metrics
        self.app = self._app()
        self.port: int | None = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task | None = None
        self._created = int(time.time())
        self._expected = f"Bearer {self.opts.api_key}".encode() if self.opts.api_key else None

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
                                ssl_certfile=self.opts.tls_cert, ssl_keyfile=self.opts.tls_key)
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

    @property
    def model_name(self) -> str:
        eng = self.servicer.engine
        return self.servicer.model_name or (eng.engine.config.model.model if eng else "")

    # -- app ------------------------------------------------------------------------------------
    def _app(self) -> FastAPI:
        app = FastAPI(title="kiln", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, exc: StarletteHTTPException):
            return HttpError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").response()

        @app.get("/health")
        async def health():
            s = self.servicer
            if s.draining:
                return JSONResponse({"status": "draining"}, status_code=503)
            if s.engine is None or not s.ready:
                return JSONResponse({"status": "warming up"}, status_code=503)
            if s.engine._error is not None:
                return JSONResponse({"status": "engine stopped"}, status_code=503)
            return JSONResponse({"status": "ok"})

        @app.get("/metrics")
        async def metrics():
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models(request: Request):
            try:
                self._auth(request)
                engine = self._engine()
            except HttpError as e:
                return e.response()
            name = self.model_name
            return {"object": "list", "data": [{
                "id": name, "object": "model", "created": self._created, "owned_by": "kiln", "root": name,
                "parent": None, "max_model_len": engine.engine.config.scheduler.max_model_len}]}

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._generate(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self._generate(request, chat=True)

        return app

    # -- checks ---------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if self._expected is None:
            return
        got = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(got, self._expected):
            msg = "missing Authorization header" if not got else "invalid API key"
            raise HttpError(401, f"{msg}: send 'Authorization: Bearer <key>'", None, "invalid_api_key")

    def _engine(self):
        s = self.servicer
        if s.engine is None or not s.ready:
            raise HttpError(503, "the engine is still warming up")
        return s.engine

    async def _body(self, request: Request) -> dict:
        raw = await request.body()
        if len(raw) > self.opts.max_message_bytes:
            raise HttpError(413, f"request body is {len(raw)} bytes; the limit is {self.opts.max_message_bytes} "
                                 f"(--max-message-mb)")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HttpError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise HttpError(400, f"request body must be a JSON object, got a {type(body).__name__}")
        return body

    def _admit(self) -> None:
        err = self.servicer.admission_error()
        if err is not None:
            code, msg = err
            raise HttpError(429 if code.name == "RESOURCE_EXHAUSTED" else 503, msg)

    # -- generation -----------------------------------------------------------------------------
    async def _generate(self, request: Request, chat: bool):
        path = request.url.path
        try:
            self._auth(request)
            engine = self._engine()
            body = await self._body(request)
            model = body.get("model")
            if model is not None and model != self.model_name:
                raise HttpError(404, f"The model `{model}` does not exist; this server serves "
                                     f"`{self.model_name}` (GET /v1/models)", "model", "model_not_found")
            prompts, params = parse_body(body, chat)
            ids = []
            for p in prompts:
                try:
                    _, toks = engine.encode(p)
                except Exception as e:   # noqa: BLE001 - e.g. a role the chat template refuses
                    raise HttpError(400, f"{'messages' if chat else 'prompt'} cannot be tokenized: {e}",
                                    "messages" if chat else "prompt") from None
                try:
                    engine.engine.validate(toks, params)
                except ValueError as e:
                    raise _bad(str(e), chat) from None
                ids.append(toks)
            self._admit()
        except HttpError as e:
            self.metrics.requests.labels(path, str(e.status)).inc()
            return e.response()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        decode = functools.lru_cache(maxsize=4096)(
            lambda t: engine.tokenizer.decode([t], skip_special_tokens=False))
        outputs = self._outputs(engine, ids, params, rid)
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return _SSEResponse(self._events(path, outputs, _Chunks(chat, params, head, decode), usage),
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            finals = await self._collect(request, outputs)
        except _ClientGone:
            self.metrics.requests.labels(path, "499").inc()
            return Response(status_code=499)
        except EngineDeadError as e:
            self.metrics.requests.labels(path, "500").inc()
            return HttpError(500, str(e)).response()
        except ValueError as e:    # rejected by the engine thread after the checks above
            self.metrics.requests.labels(path, "400").inc()
            return _bad(str(e), chat).response()
        self.metrics.requests.labels(path, "200").inc()
        url = F.CHAT_URL if chat else F.COMPLETIONS_URL
        choices = []
        for i in sorted(finals):
            req = F.BatchRequest(0, "", url, prompts[i], params)
            one = F.response_body(req, finals[i], model=self.model_name, body_id=rid, created=head["created"],
                                  decode=decode)
            for c in one["choices"]:
                c["index"] = i * params.n + c["index"]
                choices.append(c)
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": head["created"], "model": self.model_name, "choices": choices,
                             "usage": _usage(finals)})

    async def _observed(self, engine, ids: list[int], params: SamplingParams, rid: str):
        """One engine request: tracked in the servicer's in-flight set (drain waits for it) and in the metrics."""
        observe = RequestObserver(self.metrics)
        self.servicer.requests.add(rid)
        try:
            async with contextlib.aclosing(engine.generate(ids, params, rid)) as stream:
                async for out in stream:
                    observe(out)
                    yield out
            observe.finish()
        finally:
            self.servicer.requests.discard(rid)

    async def _outputs(self, engine, ids: list[list[int]], params: SamplingParams,
                       rid: str) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) of every prompt as they come; closing this aborts them all."""
        if len(ids) == 1:
            async with contextlib.aclosing(self._observed(engine, ids[0], params, rid)) as s:
                async for out in s:
                    yield 0, out
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, toks: list[int]) -> None:
            try:
                async with contextlib.aclosing(self._observed(engine, toks, params, f"{rid}-{i}")) as s:
                    async for out in s:
                        q.put_nowait((i, out))
            except Exception as e:
                q.put_nowait((i, e))
            finally:
                q.put_nowait((i, None))
        tasks = [asyncio.create_task(pump(i, t)) for i, t in enumerate(ids)]
        try:
            left = len(tasks)
            while left:
                i, item = await q.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self, request: Request, outputs) -> dict[int, RequestOutput]:
        """Run to the end; if the client disconnects first, close the outputs (abort) and raise _ClientGone."""
        finals: dict[int, RequestOutput] = {}

        async def run() -> None:
            async with contextlib.aclosing(outputs) as s:
                async for i, out in s:
                    finals[i] = out
        task = asyncio.create_task(run())
        watch = asyncio.create_task(_disconnected(request))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:          # this handler was cancelled (server shutting down)
            task.cancel()
            raise
        finally:
            watch.cancel()
        if not task.done():            # the client went away first
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise _ClientGone()
        task.result()
        return finals

    async def _events(self, path: str, outputs, chunks: _Chunks, include_usage: bool) -> AsyncIterator[bytes]:
        status, finals = "499", {}
        try:
            async with contextlib.aclosing(outputs) as s:
                async for i, out in s:
                    finals[i] = out
                    for c in chunks(i, out):
                        yield _sse(c)
            if include_usage:
                yield _sse(dict(chunks.head, choices=[], usage=_usage(finals)))
            yield b"data: [DONE]\n\n"
            status = "200"
        except EngineDeadError as e:
            status = "500"
            yield _sse(HttpError(500, str(e)).body())
        except ValueError as e:
            status = "400"
            yield _sse(_bad(str(e), chunks.chat).body())
        finally:
            self.metrics.requests.labels(path, status).inc()
