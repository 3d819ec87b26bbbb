"""The OpenAI batch file format, both ways, as pure functions (no engine, no I/O; `batch.py` runs the job).

    input line  {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
        ── parse_jsonl_line ──> BatchRequest(prompt or messages, SamplingParams)   or LineError(code, message)
                            BatchRequest(inputs, PoolingParams)   for "url": "/v1/embeddings" (embeddings_format)
    outputs ── batch_records (re-exported here) ──> ok / error records

Body fields follow the OpenAI API plus vLLM's extensions (top_k, min_p, repetition_penalty, ignore_eos,
min_tokens, stop_token_ids, ...; structured outputs as response_format, structured_outputs or guided_*:
structured/params.from_body). Unknown fields are ignored, as vLLM does; fields that would change the answer
in a way kiln cannot honour (stream, suffix, best_of != n, ...) are rejected; chat tools
are parsed by openai_protocol.parse_tools when the line is served. A line whose `model` is
not the model the job serves gets the HTTP API's 404 `model_not_found` record (as vLLM's run-batch); a line
without `model` goes to it.

Every record's `id` is `batch_req_<job>_<line>`: the input line number it answers is part of the id, so that
`--resume` can match records to lines exactly even where custom_ids repeat or are missing.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from kiln.engine.pooling import PoolingParams
from kiln.engine.sampling_params import SamplingParams
from kiln.entrypoints import embeddings_format as EF
from kiln.entrypoints.batch_records import (CHAT_URL, MIN_LOGPROB, chat_logprobs, completion_logprobs,  # noqa: F401
                                            dumps, echo_logprobs, error_record, lineno_of, ok_record,
                                            record_id, response_body)
from kiln.serving.errors import InvalidRequest
from kiln.structured.params import from_body as structured_from_body

COMPLETIONS_URL = "/v1/completions"
EMBEDDINGS_URL = "/v1/embeddings"
URLS = (CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL)
TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")   # read by openai_protocol.parse_tools


class LineError(Exception):
    """One input line that cannot be served; becomes that line's error record."""

    def __init__(self, code: str, message: str, custom_id: str | None = None):
        super().__init__(message)
        self.code, self.message, self.custom_id = code, message, custom_id


@dataclasses.dataclass
class BatchRequest:
    lineno: int                                 # 1-based line number in the input
    custom_id: str
    url: str                                    # CHAT_URL, COMPLETIONS_URL or EMBEDDINGS_URL
    prompt: str | list[int] | list[dict[str, str]] | list   # completion text / token ids, chat messages, or
                                                            # embeddings: the list of inputs
    params: SamplingParams | PoolingParams
    echo: bool = False                          # completions: put the prompt text before the completion
    echo_only: bool = False                     # echo with max_tokens 0: the prompt alone
    model: str | None = None                    # the body's `model`, checked against the served one
    tools: dict | None = None                   # chat: the body's tools, tool_choice, parallel_tool_calls
    encoding_format: str = "float"              # embeddings: float | base64
    dimensions: Any = None                      # embeddings: checked against the hidden size when served


# -- input ----------------------------------------------------------------------------------------
def parse_text_line(text: str, lineno: int, params: SamplingParams) -> BatchRequest:
    """A line of a plain prompt file: a completion request with the job's sampling params, id `line-N`."""
    return BatchRequest(lineno, f"line-{lineno}", COMPLETIONS_URL, text, params)


def parse_jsonl_line(raw: bytes | str, lineno: int, seen: set[str] | None = None) -> BatchRequest:
    """One OpenAI batch input line -> BatchRequest. Raises LineError (with the custom_id when it was read).

    `seen` holds the custom_ids of earlier lines; a repeat is an error (the first line with an id is served).
    """
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError as e:
        raise LineError("invalid_json", f"line {lineno} is not UTF-8: {e}") from None
    except json.JSONDecodeError as e:
        raise LineError("invalid_json", f"line {lineno} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise LineError("invalid_json", f"line {lineno} is a JSON {type(obj).__name__}, not an object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise LineError("missing_custom_id", f"line {lineno}: custom_id must be a non-empty string, got {cid!r}")
    if seen is not None:
        if cid in seen:
            raise LineError("duplicate_custom_id", f"custom_id {cid!r} is used by an earlier line; "
                                                   f"each request needs its own", cid)
        seen.add(cid)
    try:
        method = obj.get("method", "POST")
        if method != "POST":
            raise LineError("invalid_method", f"method must be POST, got {method!r}")
        url = obj.get("url")
        if url not in URLS:
            raise LineError("invalid_url", f"url must be one of {', '.join(URLS)}, got {url!r}")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise LineError("invalid_request", f"body must be a JSON object, got {_kind(body)}")
        tools = None
        if url == EMBEDDINGS_URL:
            try:
                prompts, pooling, enc = EF.parse_body(body, None)
            except InvalidRequest as e:
                raise LineError("invalid_request", e.message) from None
            return BatchRequest(lineno, cid, url, prompts, pooling, model=body.get("model") if isinstance(
                body.get("model"), str) else None, encoding_format=enc, dimensions=body.get("dimensions"))
        if url == CHAT_URL:
            tools = {k: body[k] for k in TOOL_FIELDS if k in body} or None
            body = {k: v for k, v in body.items() if k not in TOOL_FIELDS}
            prompt, params, echo = chat_messages(body), chat_params(body), False
        else:
            prompt, params, echo = _completion_prompt(body), completion_params(body), bool(body.get("echo"))
        model = body.get("model")
        return BatchRequest(lineno, cid, url, prompt, params, echo, echo_only(body) if echo else False,
                            model if isinstance(model, str) else None, tools)
    except LineError as e:
        e.custom_id = cid
        raise
    except ValueError as e:          # SamplingParams' own validation: its message names the field
        raise LineError("invalid_request", str(e), cid) from None


def _kind(v: Any) -> str:
    return "nothing" if v is None else f"a {type(v).__name__}"


def chat_messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise LineError("invalid_request", f"messages must be a non-empty list, got {_kind(msgs)}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise LineError("invalid_request", f"messages[{i}] must be an object with a string role")
        content = m.get("content")
        if isinstance(content, list):    # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise LineError("invalid_request", f"messages[{i}].content: only text parts are supported")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise LineError("invalid_request", f"messages[{i}].content must be a string or a list of text parts")
        msg = {"role": m["role"], "content": content}
        for key in ("tool_calls", "tool_call_id", "name"):      # tool conversations, for the chat template
            if m.get(key) is not None:
                msg[key] = m[key]
        out.append(msg)
    return out


def _completion_prompt(body: dict) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                          # a batch of one prompt
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p                          # token ids
    if isinstance(p, list) and len(p) > 1:
        raise LineError("invalid_request", f"prompt holds {len(p)} prompts; send one prompt per batch line")
    raise LineError("invalid_request", f"prompt must be a string or a list of token ids, got {_kind(p)}")


def _number(body: dict, key: str, kind: type, default: Any) -> Any:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise LineError("invalid_request", f"{key} must be a number, got {_short(v)}")
    if kind is int:
        if isinstance(v, int):
            return v                      # any size: SamplingParams states the range
        if not v.is_integer():
            raise LineError("invalid_request", f"{key} must be an integer, got {_short(v)}")
        return int(v)
    try:
        return float(v)
    except OverflowError:                 # an integer literal too large for a float
        raise LineError("invalid_request", f"{key} must be a finite number, got {_short(v)}") from None


def _short(v: Any, limit: int = 40) -> str:
    """repr(v) cut to `limit` characters: an error message never echoes a huge value in full."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit] + "..."


def _flag(body: dict, key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise LineError("invalid_request", f"{key} must be true or false, got {v!r}")
    return v


def _reject_unsupported(body: dict) -> None:
    if body.get("stream"):
        raise LineError("invalid_request", "stream is not supported in a batch job")
    for key in ("tools", "functions", "suffix"):
        if body.get(key):
            raise LineError("invalid_request", f"{key} is not supported")
    if body.get("use_beam_search"):
        raise LineError("invalid_request", "use_beam_search is not supported")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise LineError("invalid_request", "best_of other than n is not supported")


def _common_params(body: dict, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    _reject_unsupported(body)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise LineError("invalid_request", f"stop must be a string or a list of strings, got {stop!r}")
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and not (isinstance(stop_ids, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in stop_ids)):
        raise LineError("invalid_request", f"stop_token_ids must be a list of token ids, got {stop_ids!r}")
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise LineError("invalid_request", f"logit_bias must be an object of token id -> bias, got {bias!r}")
        try:
            bias = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError, OverflowError):
            raise LineError("invalid_request", "logit_bias keys must be token ids and values finite numbers") from None
    return SamplingParams(
        n=_number(body, "n", int, 1),
        presence_penalty=_number(body, "presence_penalty", float, 0.0),
        frequency_penalty=_number(body, "frequency_penalty", float, 0.0),
        repetition_penalty=_number(body, "repetition_penalty", float, 1.0),
        temperature=_number(body, "temperature", float, 1.0),
        top_p=_number(body, "top_p", float, 1.0),
        top_k=_number(body, "top_k", int, 0),
        min_p=_number(body, "min_p", float, 0.0),
        seed=_number(body, "seed", int, None),
        stop=stop, stop_token_ids=stop_ids,
        ignore_eos=_flag(body, "ignore_eos", False),
        max_tokens=max_tokens,
        min_tokens=_number(body, "min_tokens", int, 0),
        logprobs=logprobs, logit_bias=bias,
        include_stop_str_in_output=_flag(body, "include_stop_str_in_output", False),
        skip_special_tokens=_flag(body, "skip_special_tokens", True),
        structured_outputs=structured_from_body(body),
        prompt_logprobs=_number(body, "prompt_logprobs", int, None),
    )


def chat_params(body: dict) -> SamplingParams:
    """SamplingParams of a /v1/chat/completions body. max_completion_tokens wins over max_tokens; neither
    means "until the context is full"; `logprobs: true` + `top_logprobs: k` asks for k alternatives."""
    max_tokens = _number(body, "max_completion_tokens", int, None)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int, None)
    want = _flag(body, "logprobs", False)
    top = _number(body, "top_logprobs", int, None)
    if top is not None and not want:
        raise LineError("invalid_request", "top_logprobs needs logprobs set to true")
    return _common_params(body, max_tokens, (top or 0) if want else None)


def completion_params(body: dict) -> SamplingParams:
    """SamplingParams of a /v1/completions body: max_tokens defaults to 16, logprobs is a count."""
    v = body.get("logprobs")
    if isinstance(v, bool):
        raise LineError("invalid_request", f"logprobs must be an integer for {COMPLETIONS_URL}, got {v!r}")
    max_tokens, logprobs = _number(body, "max_tokens", int, 16), _number(body, "logprobs", int, None)
    echo = _flag(body, "echo", False)
    if echo and max_tokens == 0:
        max_tokens = 1                    # the prompt alone (echo_only): the one token generated is dropped
    params = _common_params(body, max_tokens, logprobs)
    if echo and logprobs is not None and (params.prompt_logprobs is None or params.prompt_logprobs < logprobs):
        params.prompt_logprobs = logprobs  # the echoed prompt's logprobs, computed in its prefill steps
    return params


def echo_only(body: dict) -> bool:
    """`echo` with `max_tokens: 0`: answer with the prompt (and its logprobs) only, as lm-eval's loglikelihood
    requests ask."""
    return bool(body.get("echo")) and body.get("max_tokens") == 0
