"""The HTTP routes that generate nothing: GET /health (200 serving, 503 warming up, draining or engine stopped),
/metrics (no auth), /v1/models and /v1/models/{id} (auth), /version; POST /tokenize and /detokenize (vLLM's
shapes, serving/tokens.py)."""
from __future__ import annotations

import contextlib
import importlib.metadata

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kiln.entrypoints.http_common import HttpContext, error
from kiln.serving import errors as E
from kiln.serving import tokens as T
from kiln.serving.health import State


def router(ctx: HttpContext) -> APIRouter:
    r = APIRouter()
    core = ctx.core

    @r.get("/health")
    async def health():
        with contextlib.suppress(E.ServingError):
            core.ready()                # notices a dead engine even before on_death has run
        state = core.health.state
        return JSONResponse({"status": state.value}, status_code=200 if state is State.SERVING else 503)

    @r.get("/metrics")
    async def metrics():
        return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @r.get("/v1/models")
    async def models(request: Request):
        try:
            ctx.authenticate(request)
            engine = core.ready()
        except E.ServingError as e:
            return error(e)
        return {"object": "list", "data": [ctx.model_card(engine)]}

    @r.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        try:
            ctx.authenticate(request)
            engine = core.ready()
            if model_id != core.model_name:
                raise E.NotFound(f"The model `{model_id}` does not exist", "model")
        except E.ServingError as e:
            return error(e)
        return ctx.model_card(engine)

    @r.get("/version")
    async def version():
        try:
            v = importlib.metadata.version("kiln")
        except importlib.metadata.PackageNotFoundError:
            v = "unknown"
        return {"version": v}

    @r.post("/tokenize")
    async def tokenize(request: Request):
        return await ctx.simple(request, lambda eng, body: T.tokenize(eng, body, core.opts.limits))

    @r.post("/detokenize")
    async def detokenize(request: Request):
        return await ctx.simple(request, T.detokenize)

    return r
