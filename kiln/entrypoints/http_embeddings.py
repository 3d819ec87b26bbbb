"""POST /v1/embeddings on the HTTP server: authenticate, read and check the body (http_common), parse it
(embeddings_format), `core.embed`, answer the OpenAI shape."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from kiln.entrypoints import embeddings_format as EF
from kiln.entrypoints import openai_protocol as O
from kiln.entrypoints.http_common import HttpContext, error
from kiln.serving import errors as E

PATH = "/v1/embeddings"


def router(ctx: HttpContext) -> APIRouter:
    r = APIRouter()
    core = ctx.core

    @r.post(PATH)
    async def embeddings(request: Request):
        try:
            ctx.authenticate(request)
            engine = core.ready()
            body = ctx.check_model(await ctx.body(request))
            prompts, pooling, enc = EF.parse_body(body, engine.engine.spec.hidden_size)
            outs = await core.embed(prompts, pooling)
        except E.ServingError as e:
            core.count(PATH, str(O.http_status(e)))
            return error(e)
        core.count(PATH, "200")
        return JSONResponse(EF.response(outs, model=core.model_name, encoding_format=enc))

    return r
