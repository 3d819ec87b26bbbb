"""The generating HTTP routes, POST /v1/completions and /v1/chat/completions:

    Bearer --api-key (401) ─> JSON body (400, 413) ─> `model` is the served name (404)
    ─> openai_protocol.parse_body (400, `param` = the field) [chat: parse_tools] ─> core.submit: validation
       (400), admission (429 past --max-queued, 503 warming up / draining / engine stopped)
    ─> one JSON body, or `stream: true`: SSE chunks `data: {...}` then `data: [DONE]`
       (stream_options.include_usage: a last chunk with usage and no choices)
    client disconnect ─> the core's stream is closed ─> abort ─> blocks freed
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kiln.entrypoints import openai_protocol as O
from kiln.entrypoints.http_common import HttpContext, error
from kiln.serving import errors as E


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


def router(ctx: HttpContext) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/completions")
    async def completions(request: Request):
        return await generate(ctx, request, chat=False)

    @r.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(ctx, request, chat=True)

    return r


async def generate(ctx: HttpContext, request: Request, chat: bool):
    core, path = ctx.core, request.url.path
    try:
        ctx.authenticate(request)
        engine = core.ready()
        body = ctx.check_model(await ctx.body(request))
        prompts, params = O.parse_body(body, chat)
        tools = None
        if chat:
            prompts, tools = O.parse_tools(body, prompts, params, engine.tokenizer.chat_template,
                                           core.opts.tool_call_parser)
        req = core.submit(prompts, params, id_prefix="chatcmpl" if chat else "cmpl")
    except E.ServingError as e:
        e = O.chat_field(e, chat)
        core.count(path, str(O.http_status(e)))
        return error(e)
    head = {"id": req.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": core.model_name}
    decode = functools.lru_cache(maxsize=4096)(lambda t: engine.tokenizer.decode([t], skip_special_tokens=False))
    if body.get("stream"):
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = O.Chunks(chat, params, head, decode, tools, O.echo_of(body, prompts, chat))
        return _SSEResponse(_events(ctx, path, req, chunks, usage), req.close,
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        finals = await _collect(request, req)
    except _ClientGone:
        core.count(path, "499")
        return Response(status_code=499)
    except E.ServingError as e:
        core.count(path, str(O.http_status(e)))
        return error(O.chat_field(e, chat))
    core.count(path, "200")
    return JSONResponse(O.response(chat, prompts, params, finals, head=head, decode=decode, tools=tools, body=body))


async def _collect(request: Request, req) -> dict:
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


async def _events(ctx: HttpContext, path: str, req, chunks: O.Chunks, include_usage: bool) -> AsyncIterator[bytes]:
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
        ctx.core.count(path, status)
