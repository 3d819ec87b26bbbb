"""What every HTTP route shares: the serving core and options (`HttpContext`), reading and checking a request
(API key, JSON body, its `model`), kiln errors as OpenAI error responses, and the wrapper of the simple
(non-generating) routes. No routes here; http_server.py includes the routers that define them."""
from __future__ import annotations

import json
import time
from typing import Any, Callable

from fastapi import Request
from fastapi.responses import JSONResponse

from kiln.entrypoints import openai_protocol as O
from kiln.serving import errors as E
from kiln.serving.core import ServingCore
from kiln.serving.options import ServeOptions


class HttpContext:
    """One HTTP server's state as its routes see it."""

    def __init__(self, core: ServingCore, opts: ServeOptions):
        self.core, self.opts = core, opts
        self.created = int(time.time())          # the `created` of the model cards

    def authenticate(self, request: Request) -> None:
        self.core.authenticate(request.headers.get("authorization"))

    def model_card(self, engine) -> dict:
        name = self.core.model_name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "kiln", "root": name,
                "parent": None, "max_model_len": engine.engine.config.scheduler.max_model_len}

    def check_model(self, body: dict) -> dict:
        """The body, if its `model` (optional) is the served one; else 404 model_not_found."""
        model = body.get("model")
        if model is not None and model != self.core.model_name:
            raise E.NotFound(f"The model `{model}` does not exist; this server serves "
                             f"`{self.core.model_name}` (GET /v1/models)", "model")
        return body

    async def body(self, request: Request) -> dict:
        """The request's JSON object body; InvalidRequest if it is too large, not JSON or not an object."""
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

    async def simple(self, request: Request, fn: Callable[[Any, dict], Any]) -> JSONResponse:
        """A non-generating POST: authenticate, read the body, check its model, fn(engine, body) -> JSON;
        counted in the metrics by path and status."""
        try:
            self.authenticate(request)
            engine = self.core.ready()
            body = self.check_model(await self.body(request))
            result = fn(engine, body)
        except E.ServingError as e:
            self.core.count(request.url.path, str(O.http_status(e)))
            return error(e)
        self.core.count(request.url.path, "200")
        return JSONResponse(result)


def error(e: E.ServingError) -> JSONResponse:
    return JSONResponse(O.error_body(e), status_code=O.http_status(e))
