"""POST /v1/embeddings on the HTTP server: authenticate, read and check the body (the server's own helpers),
parse it (embeddings_format), `core.embed`, answer the OpenAI shape. `register(app, server)` adds the route."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kiln.entrypoints import embeddings_format as EF
from kiln.entrypoints import openai_protocol as O
from kiln.serving import errors as E

PATH = "/v1/embeddings"


def register(app: FastAPI, server) -> None:
    """`server` is the HTTPServer: its `core`, `_body(request)`, `_check_model(body)` and `_error(e)`."""
    core = server.core

    @app.post(PATH)
    async def embeddings(request: Request):
        try:
            core.authenticate(request.headers.get("authorization"))
            engine = core.ready()
            body = server._check_model(await server._body(request))
            prompts, pooling, enc = EF.parse_body(body, engine.engine.spec.hidden_size)
            outs = await core.embed(prompts, pooling)
        except E.ServingError as e:
            core.count(PATH, str(O.http_status(e)))
            return server._error(e)
        core.count(PATH, "200")
        return JSONResponse(EF.response(outs, model=core.model_name, encoding_format=enc))
