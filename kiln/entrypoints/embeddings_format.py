"""The OpenAI embeddings protocol, with no I/O: a `/v1/embeddings` body (HTTP or a batch line's) -> prompts and
PoolingParams; pooled outputs -> the response body.

    {"input": str | [str] | [int] | [[int]], "model"?, "encoding_format"?: "float" | "base64",
     "dimensions"?: hidden size only, "user"?,                       (OpenAI)
     "pooling"?: "last" | "mean", "normalize"?: bool}                 (kiln / vLLM extensions)
    ─> {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...] | "<base64>"}],
        "model", "usage": {"prompt_tokens", "total_tokens"}}

base64 is the little-endian float32 bytes of the vector, as the OpenAI client decodes it.
"""
from __future__ import annotations

import base64
import time
import uuid

import numpy as np

from kiln.engine.outputs import EmbeddingRequestOutput
from kiln.engine.pooling import POOLING_TYPES, PoolingParams
from kiln.serving import errors as E

ENCODINGS = ("float", "base64")
_KNOWN = {"input", "model", "encoding_format", "dimensions", "user", "pooling", "normalize"}


def _is_ids(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def parse_input(body: dict) -> list[str | list[int]]:
    """`input` as a list of prompts (text or token ids); InvalidRequest naming `input` otherwise."""
    v = body.get("input")
    if isinstance(v, str):
        return [v]
    if _is_ids(v):
        return [list(v)]
    if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        return list(v)
    if isinstance(v, list) and v and all(_is_ids(x) for x in v):
        return [list(x) for x in v]
    raise E.InvalidRequest("input must be a non-empty string, list of strings, list of token ids or list of "
                           "lists of token ids", "input")


def check_dimensions(dims, hidden_size: int) -> None:
    """`dimensions`, when given, must be the hidden size: kiln does not truncate embeddings."""
    if dims is not None and (isinstance(dims, bool) or dims != hidden_size):
        raise E.InvalidRequest(f"dimensions must be this model's hidden size {hidden_size} (kiln does not "
                               f"truncate embeddings), got {str(dims)[:40]}", "dimensions")


def parse_body(body: dict, hidden_size: int | None) -> tuple[list[str | list[int]], PoolingParams, str]:
    """(prompts, PoolingParams, encoding_format) of an embeddings body; InvalidRequest naming the field.
    `dimensions` is checked when hidden_size is given (a batch line: when it is served)."""
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise E.InvalidRequest(f"unsupported field {unknown[0]!r} for /v1/embeddings", unknown[0])
    prompts = parse_input(body)
    enc = body.get("encoding_format", "float") or "float"
    if enc not in ENCODINGS:
        raise E.InvalidRequest(f"encoding_format must be one of {ENCODINGS}, got {str(enc)[:40]!r}",
                               "encoding_format")
    if hidden_size is not None:
        check_dimensions(body.get("dimensions"), hidden_size)
    pooling = body.get("pooling", "last")
    if pooling not in POOLING_TYPES:
        raise E.InvalidRequest(f"pooling must be one of {POOLING_TYPES}, got {str(pooling)[:40]!r}", "pooling")
    normalize = body.get("normalize", True)
    if not isinstance(normalize, bool):
        raise E.InvalidRequest("normalize must be a boolean", "normalize")
    return prompts, PoolingParams(pooling, normalize), enc


def encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")
    return vector


def response(outs: list[EmbeddingRequestOutput], *, model: str, encoding_format: str,
             request_id: str | None = None, created: int | None = None) -> dict:
    """The OpenAI embeddings response of the prompts' outputs, in input order."""
    n = sum(len(o.prompt_token_ids) for o in outs)
    return {"id": request_id or f"embd-{uuid.uuid4().hex}", "object": "list",
            "created": int(time.time()) if created is None else created, "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(o.outputs.embedding, encoding_format)}
                     for i, o in enumerate(outs)],
            "usage": {"prompt_tokens": n, "total_tokens": n}}
