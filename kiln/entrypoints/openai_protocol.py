"""The OpenAI protocol, with no I/O: request bodies -> (prompts, SamplingParams), outputs -> response bodies and
stream chunks, kiln's errors -> HTTP status and OpenAI's error body `{"error": {message, type, param, code}}`.

`echo` (completions) puts each prompt before its choice's output: in the body, or in the first chunk of each
choice's stream (with the prompt's logprobs when `logprobs` is set; with `max_tokens: 0` that is the only chunk).
A completions `prompt` may be a list of prompts: each is its own engine request, and choice `index` is
prompt_index * n + sample_index, as in vLLM and the OpenAI API. Parameters are parsed by batch_format's
parsers, so a batch line and an HTTP body mean the same thing.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from kiln.engine.outputs import RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.entrypoints import batch_format as F
from kiln.serving import errors as E
from kiln.serving.deltas import DeltaTracker
from kiln.serving.prompts import ChatMessages
from kiln.serving.usage import Usage
from kiln.tools import output as T
from kiln.tools import request as tool_request

# kiln error -> (HTTP status, OpenAI error type, OpenAI error code)
STATUS: dict[type, tuple[int, str, str | None]] = {
    E.InvalidRequest: (400, "invalid_request_error", None),
    E.Unauthenticated: (401, "invalid_request_error", "invalid_api_key"),
    E.NotFound: (404, "invalid_request_error", "model_not_found"),
    E.Conflict: (409, "invalid_request_error", None),
    E.Overloaded: (429, "rate_limit_error", None),
    E.Unavailable: (503, "server_error", None),
    E.Internal: (500, "server_error", None),
}


def http_status(error: E.ServingError) -> int:
    return STATUS.get(type(error), (500,))[0]


def error_body(error: E.ServingError) -> dict:
    status, kind, code = STATUS.get(type(error), (500, "server_error", None))
    return {"error": {"message": error.message, "type": kind, "param": getattr(error, "field", None), "code": code}}


def plain_error_body(status: int, message: str) -> dict:
    """An error of the HTTP layer itself (unknown path, wrong method)."""
    return {"error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
                      "param": None, "code": None}}


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
    raise E.InvalidRequest("prompt must be a string, a list of token ids, or a non-empty list of strings or of "
                           f"token id lists; got {json.dumps(p)[:80]}", "prompt")


def _bad(message: str, chat: bool) -> E.InvalidRequest:
    field = E.field_of(message, chat)
    if chat and field == "logprobs" and "must be in" in message:
        field = "top_logprobs"          # chat asks for top-k alternatives by top_logprobs
    return E.InvalidRequest(message, field)


def chat_field(error: E.ServingError, chat: bool) -> E.ServingError:
    """The core names SamplingParams fields; for chat, `logprobs must be in` is about `top_logprobs`."""
    if isinstance(error, E.InvalidRequest) and chat and error.field == "logprobs":
        return _bad(error.message, chat)
    return error


def parse_body(body: dict, chat: bool) -> tuple[list, SamplingParams]:
    """(prompts, SamplingParams) of a request body; raises InvalidRequest naming the field."""
    if body.get("echo") and chat:
        raise E.InvalidRequest("echo is for /v1/completions", "echo")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise E.InvalidRequest(f"stream_options must be an object, got {opts!r}", "stream_options")
    if not isinstance(body.get("stream", False), bool):
        raise E.InvalidRequest(f"stream must be true or false, got {body['stream']!r}", "stream")
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "tools", "tool_choice",
                                                        "parallel_tool_calls")}   # batch jobs refuse stream
    try:
        if chat:
            return [F.chat_messages(plain)], F.chat_params(plain)
        return completion_prompts(plain), F.completion_params(plain)
    except F.LineError as e:
        raise _bad(e.message, chat) from None
    except ValueError as e:          # SamplingParams' own validation: the message names the field
        raise _bad(str(e), chat) from None


def parse_tools(body: dict, prompts: list, params: SamplingParams, template: str | None,
                parser: str | None = None) -> tuple[list, T.ToolUse | None]:
    """A chat body's tools: the prompt carries them to the chat template; `required` / a named choice set
    the grammar that makes the output a call. Returns (prompts, ToolUse or None); raises InvalidRequest."""
    try:
        messages, for_template, use = tool_request.prepare(body, prompts[0], params, template, parser)
    except ValueError as e:
        raise _bad(str(e), True) from None
    if use is None:
        return prompts, None
    return [ChatMessages(messages, tools=for_template)], use


@dataclasses.dataclass
class Echo:
    """A completions body's `echo`: the prompt (text, and its logprobs when `logprobs` is set) comes before each
    choice's output; `only` (max_tokens 0): the prompt alone, the one token generated for it is dropped."""
    prompts: list                         # the request's prompts by prompt index (text or token ids)
    only: bool


def echo_of(body: dict, prompts: list, chat: bool) -> Echo | None:
    return Echo(prompts, F.echo_only(body)) if body.get("echo") and not chat else None


def usage(finals, echo: Echo | None) -> dict:
    """OpenAI usage of finished outputs; an echo-only request generated nothing the client sees."""
    u = Usage.of(finals)
    return dataclasses.replace(u, completion_tokens=0).openai() if echo and echo.only else u.openai()


# -- responses --------------------------------------------------------------------------------------
def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode() + b"\n\n"


class Chunks:
    """Cumulative RequestOutputs -> OpenAI stream chunks (what is new for each choice since the last chunk)."""

    def __init__(self, chat: bool, params: SamplingParams, head: dict, decode: Callable[[int], str],
                 tools: T.ToolUse | None = None, echo: Echo | None = None):
        self.chat, self.params, self.head, self.decode = chat, params, head, decode
        self.tracker = DeltaTracker()
        self.tools, self.streams = tools, {}
        self.echo, self.echoed = echo, set()

    def _tool_deltas(self, idx: int, d, finishing: bool) -> tuple[list[dict], bool]:
        """The delta objects of choice idx's new text under tool parsing, and whether it made calls."""
        ts = self.streams.setdefault(idx, T.ToolStream(self.tools))
        deltas = ts.feed(d.text)
        made = False
        if finishing:
            rest, made = ts.finish()
            deltas += rest
        return deltas, made

    def __call__(self, i: int, out: RequestOutput) -> list[dict]:
        chunks, k = [], self.params.logprobs
        for c in out.outputs:
            idx = i * self.params.n + c.index
            d = self.tracker.delta(idx, c)
            if self.echo is not None:
                chunks += self._echo_chunk(i, idx, out, c, d)
                continue
            if d.empty and not (d.first and self.chat):
                continue
            lp = None
            if k is not None and d.logprobs is not None and d.token_ids:
                lp = F.chat_logprobs(d.token_ids, d.logprobs, k, self.decode) if self.chat else \
                    F.completion_logprobs(d.token_ids, d.logprobs, k, self.decode, offset=self._offset(c, d))
            if self.chat and self.tools is not None:
                chunks += self._tool_chunks(idx, d, c, lp)
                continue
            choice: dict[str, Any] = {"index": idx}
            if self.chat:
                choice["delta"] = ({"role": "assistant", "content": d.text} if d.first else {"content": d.text})
            else:
                choice["text"] = d.text
            choice.update(logprobs=lp, finish_reason=c.finish_reason if d.finishing else None,
                          stop_reason=c.stop_reason if d.finishing else None)
            chunks.append(dict(self.head, choices=[choice]))
        return chunks

    def _tool_chunks(self, idx: int, d, c, lp) -> list[dict]:
        deltas, made = self._tool_deltas(idx, d, d.finishing)
        if d.first:
            deltas.insert(0, {"role": "assistant", "content": ""})
        if d.finishing and not deltas:
            deltas.append({})
        out = []
        for j, delta in enumerate(deltas):
            last = d.finishing and j == len(deltas) - 1
            finish = ("tool_calls" if made and c.finish_reason == "stop" else c.finish_reason) if last else None
            out.append(dict(self.head, choices=[{"index": idx, "delta": delta, "logprobs": lp if j == 0 else None,
                                                 "finish_reason": finish,
                                                 "stop_reason": c.stop_reason if last else None}]))
        return out

    def _offset(self, c, d) -> int:
        """text_offset of the delta's first token: the decoded tokens before it, as the whole response counts
        them (the text itself may hold back an incomplete character)."""
        return sum(len(self.decode(t)) for t in c.token_ids[:len(c.token_ids) - len(d.token_ids)])

    def _echo_chunk(self, i: int, idx: int, out: RequestOutput, c, d) -> list[dict]:
        """A completion choice's chunk under echo: its first carries the prompt text (and the prompt's logprobs)
        before the new text, as vLLM streams it; echo-only sends that one chunk once the sample has finished."""
        only, k, first = self.echo.only, self.params.logprobs, idx not in self.echoed
        if (only and (not d.finishing or not first)) or (d.empty and not first):
            return []
        self.echoed.add(idx)
        ids, entries = ([], []) if only else (d.token_ids, d.logprobs or [])
        prompt_ids = out.prompt_token_ids
        shown = sum(len(self.decode(t)) for t in prompt_ids)    # the offsets count the decoded prompt
        lp, text = None, "" if only else d.text
        if k is not None:
            at = self._offset(c, d) + (0 if first else shown)
            lp = F.completion_logprobs(ids, entries, k, self.decode, offset=at)
            if first:
                lp = F.echo_logprobs(out, lp, k, self.decode)
        if first:
            p = self.echo.prompts[i]
            text = (p if isinstance(p, str) else "".join(self.decode(t) for t in prompt_ids)) + text
        finish, stop = ("length", None) if only else (c.finish_reason, c.stop_reason) if d.finishing else (None, None)
        return [dict(self.head, choices=[{"index": idx, "text": text, "logprobs": lp, "finish_reason": finish,
                                          "stop_reason": stop}])]

    def usage_chunk(self, finals: dict[int, RequestOutput]) -> dict:
        return dict(self.head, choices=[], usage=usage(finals.values(), self.echo))


def tool_choices(choices: list[dict], tools: T.ToolUse) -> None:
    """Chat choices with their output parsed into tool_calls (finish_reason tool_calls when there are any)."""
    for c in choices:
        c["message"], made = T.message(tools, c["message"]["content"])
        if made and c["finish_reason"] == "stop":
            c["finish_reason"] = "tool_calls"


def response(chat: bool, prompts: list, params: SamplingParams, finals: dict[int, RequestOutput], *, head: dict,
             decode: Callable[[int], str], tools: T.ToolUse | None = None, body: dict | None = None) -> dict:
    """The chat.completion / text_completion body of a finished request (every prompt, every sample)."""
    url = F.CHAT_URL if chat else F.COMPLETIONS_URL
    choices = []
    for i in sorted(finals):
        echo = bool((body or {}).get("echo")) and not chat
        req = F.BatchRequest(0, "", url, prompts[i], params, echo, echo and F.echo_only(body))
        one = F.response_body(req, finals[i], model=head["model"], body_id=head["id"], created=head["created"],
                              decode=decode)
        for c in one["choices"]:
            c["index"] = i * params.n + c["index"]
            choices.append(c)
    if chat and tools is not None:
        tool_choices(choices, tools)
    return {"id": head["id"], "object": "chat.completion" if chat else "text_completion",
            "created": head["created"], "model": head["model"], "choices": choices,
            "usage": usage(finals.values(), echo_of(body or {}, prompts, chat))}
