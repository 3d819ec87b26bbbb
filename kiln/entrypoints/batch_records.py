"""The OpenAI batch file format, output side, as pure functions: records of answered lines and the response
bodies inside them (batch_format.py parses the input; both are re-exported there).

    RequestOutput ── response_body ──> chat.completion / text_completion ── ok_record ──> {"id", "custom_id",
                                                                   "response": {"status_code": 200, "body"}, "error": null}
    LineError     ── error_record ──> {"id", "custom_id", "response": {"status_code": 400, "body": {"error"}}, "error"}
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any, Callable

from kiln.engine.outputs import RequestOutput

if TYPE_CHECKING:
    from kiln.entrypoints.batch_format import BatchRequest

CHAT_URL = "/v1/chat/completions"
MIN_LOGPROB = -9999.0        # -inf is not JSON; vLLM clamps the same way


# -- output ---------------------------------------------------------------------------------------
def record_id(job: str, lineno: int) -> str:
    return f"batch_req_{job}_{lineno}"


def lineno_of(record: dict) -> int | None:
    """The input line a record answers (from its id), or None if the record is not one of ours."""
    rid = record.get("id") if isinstance(record, dict) else None
    if not isinstance(rid, str) or not rid.startswith("batch_req_"):
        return None
    tail = rid.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _lp(x: float) -> float:
    return MIN_LOGPROB if math.isnan(x) else max(x, MIN_LOGPROB)


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of one position (the entry also holds the sampled token)."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], k: int,
                  decode: Callable[[int], str]) -> dict:
    def item(t: int, lp: float) -> dict:
        s = decode(t)
        return {"token": s, "logprob": _lp(lp), "bytes": list(s.encode("utf-8"))}
    return {"content": [dict(item(t, e[t]), top_logprobs=[item(a, b) for a, b in _top(e, k)])
                        for t, e in zip(token_ids, logprobs)]}


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, float]], k: int,
                        decode: Callable[[int], str], offset: int = 0) -> dict:
    tokens, offsets = [], []
    for t in token_ids:
        offsets.append(offset)
        tokens.append(decode(t))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [_lp(e[t]) for t, e in zip(token_ids, logprobs)],
            "top_logprobs": [{decode(a): _lp(b) for a, b in _top(e, k)} for e in logprobs],
            "text_offset": offsets}


def echo_logprobs(out: RequestOutput, lp: dict, k: int, decode: Callable[[int], str]) -> dict:
    """Completion logprobs with the prompt's before them: its first token has none (null), as in vLLM."""
    ids, plp = out.prompt_token_ids, out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    tokens = [decode(t) for t in ids]
    offsets, off = [], 0
    for t in tokens:
        offsets.append(off)
        off += len(t)
    return {"tokens": tokens + lp["tokens"],
            "token_logprobs": [None if e is None else _lp(e[t]) for t, e in zip(ids, plp)] + lp["token_logprobs"],
            "top_logprobs": [None if e is None else {decode(a): _lp(b) for a, b in _top(e, k)} for e in plp]
            + lp["top_logprobs"],
            "text_offset": offsets + [o + off for o in lp["text_offset"]]}


def response_body(req: BatchRequest, out: RequestOutput, *, model: str, body_id: str, created: int,
                  decode: Callable[[int], str]) -> dict:
    """The chat.completion / text_completion object of one finished request."""
    chat = req.url == CHAT_URL
    k = req.params.logprobs
    prefix = "" if not req.echo else req.prompt if isinstance(req.prompt, str) else \
        "".join(decode(t) for t in out.prompt_token_ids)
    choices = []
    for c in out.outputs:
        if req.echo_only:
            c = dataclasses.replace(c, text="", token_ids=[], logprobs=None if c.logprobs is None else [],
                                    finish_reason="length")
        lp = None
        if k is not None and c.logprobs is not None:
            lp = chat_logprobs(c.token_ids, c.logprobs, k, decode) if chat else \
                completion_logprobs(c.token_ids, c.logprobs, k, decode)
            if req.echo and not chat:
                lp = echo_logprobs(out, lp, k, decode)
        choice: dict[str, Any] = {"index": c.index}
        if chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = prefix + c.text
        choice.update(logprobs=lp, finish_reason=c.finish_reason, stop_reason=c.stop_reason)
        if out.prompt_logprobs is not None and req.params.prompt_logprobs is not None:
            choice["prompt_logprobs"] = [None if e is None else {   # vLLM's shape: token id -> logprob
                str(t): {"logprob": _lp(v), "decoded_token": decode(t)} for t, v in e.items()}
                for e in out.prompt_logprobs]
        choices.append(choice)
    n_in = len(out.prompt_token_ids)
    n_out = 0 if req.echo_only else sum(len(c.token_ids) for c in out.outputs)
    return {"id": body_id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices,
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}


def ok_record(rec_id: str, custom_id: str, request_id: str, body: dict) -> dict:
    return {"id": rec_id, "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def error_record(rec_id: str, custom_id: str | None, request_id: str, code: str, message: str,
                 status_code: int = 400) -> dict:
    """A failed line: the HTTP-style error in `response` (as the OpenAI API returns it) and the same code
    and message in `error`, so that `record["error"] is None` alone tells success from failure."""
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    return {"id": rec_id, "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": request_id,
                         "body": {"error": {"message": message, "type": kind, "param": None, "code": code}}},
            "error": {"code": code, "message": message}}


def dumps(record: dict) -> bytes:
    """One output line: compact JSON, strict (no NaN), newline-terminated."""
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n").encode()
