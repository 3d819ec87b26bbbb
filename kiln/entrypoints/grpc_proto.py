"""kiln.v1 messages <-> the serving core: requests to prompts and SamplingParams, outputs to responses, and
kiln's errors to gRPC status codes. No I/O here; grpc_server.py wires it to the network."""
from __future__ import annotations

import json
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from kiln.engine.outputs import CompletionOutput, RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.structured.params import StructuredOutputsParams
from kiln.proto import inference_pb2 as pb
from kiln.serving import errors as E
from kiln.serving import prompts as P
from kiln.serving.deltas import DeltaTracker
from kiln.serving.usage import Usage
from kiln.tools import output as T
from kiln.tools import request as tool_request
from kiln.tools.output import ToolUse

STATUS = {E.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT, E.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
          E.NotFound: grpc.StatusCode.NOT_FOUND, E.Conflict: grpc.StatusCode.ALREADY_EXISTS,
          E.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED, E.Unavailable: grpc.StatusCode.UNAVAILABLE,
          E.Internal: grpc.StatusCode.INTERNAL}


def status_of(error: E.ServingError) -> grpc.StatusCode:
    return STATUS.get(type(error), grpc.StatusCode.INTERNAL)


class BadMessage:
    """What the request deserializer returns for bytes that are not a valid message (e.g. invalid UTF-8)."""

    def __init__(self, error: Exception):
        self.error = error


def safe_deserializer(cls):
    def deserialize(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError) as e:
            return BadMessage(e)
    return deserialize


# -- requests ---------------------------------------------------------------------------------------
_SCALAR_FIELDS = ("n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p",
                  "top_k", "min_p", "seed", "ignore_eos", "max_tokens", "min_tokens", "logprobs",
                  "include_stop_str_in_output", "skip_special_tokens", "prompt_logprobs")


def sampling_params_from_proto(m: pb.SamplingParams) -> SamplingParams:
    """Only the fields that are set; SamplingParams applies its defaults. Raises InvalidRequest."""
    kw: dict[str, Any] = {f: getattr(m, f) for f in _SCALAR_FIELDS if m.HasField(f)}
    for f in ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p"):
        if f in kw:   # float32 on the wire: 0.7 -> 0.699999988; round back to what the client wrote
            kw[f] = float(f"{kw[f]:.7g}")
    if m.stop:
        kw["stop"] = list(m.stop)
    if m.stop_token_ids:
        kw["stop_token_ids"] = list(m.stop_token_ids)
    if m.logit_bias:
        kw["logit_bias"] = dict(m.logit_bias)
    try:
        kw["structured_outputs"] = structured_from_proto(m)
        return SamplingParams(**kw)
    except ValueError as e:
        raise E.invalid(e) from None


def structured_from_proto(m: pb.SamplingParams) -> StructuredOutputsParams | None:
    """The `structured` oneof as StructuredOutputsParams (ValueError naming the field for a bad one)."""
    kind = m.WhichOneof("structured")
    if kind is None:
        return None
    value = list(m.choice.choices) if kind == "choice" else getattr(m, kind)
    ws = m.disable_any_whitespace if m.HasField("disable_any_whitespace") else True
    return StructuredOutputsParams(**{"json" if kind == "json_schema" else kind: value}, disable_any_whitespace=ws)


def messages_from_proto(chat: pb.ChatMessages) -> list[dict]:
    """The OpenAI message dicts (with an assistant's tool_calls and a tool message's tool_call_id), as the
    HTTP API receives them."""
    out = []
    for m in chat.messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def tool_fields(req: pb.GenerateRequest) -> dict:
    """The request's tools as the OpenAI body fields kiln/tools reads; ValueError naming the field."""
    fields: dict[str, Any] = {}
    if req.tools:
        try:
            fields["tools"] = json.loads(req.tools)
        except ValueError as e:
            raise ValueError(f"tools must be the OpenAI tools list as JSON text: {e}") from None
    choice = req.tool_choice
    if choice.startswith("{"):
        try:
            fields["tool_choice"] = json.loads(choice)
        except ValueError as e:
            raise ValueError(f"tool_choice is not valid JSON: {e}") from None
    elif choice:
        fields["tool_choice"] = choice if choice in ("auto", "none", "required") else \
            {"type": "function", "function": {"name": choice}}
    if req.HasField("parallel_tool_calls"):
        fields["parallel_tool_calls"] = req.parallel_tool_calls
    return fields


def tools_from_proto(req: pb.GenerateRequest, prompt, params: SamplingParams, template: str | None,
                     parser: str | None) -> tuple[Any, ToolUse | None]:
    """(prompt, ToolUse or None): a chat prompt with tools carries them to the chat template (and a required /
    named choice sets the output grammar in params). Raises InvalidRequest naming the field."""
    if not (req.tools or req.tool_choice):
        return prompt, None
    if not P.is_chat(prompt):
        raise E.InvalidRequest("tools need a chat prompt (prompt.chat)", "tools")
    try:
        messages, for_template, use = tool_request.prepare(tool_fields(req), prompt, params, template, parser)
    except ValueError as e:
        raise E.invalid(e) from None
    return (P.ChatMessages(messages, tools=for_template) if use else prompt), use


def prompt_from_proto(req: pb.GenerateRequest) -> str | list[int] | list[dict[str, str]]:
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise E.InvalidRequest("prompt is required: set text, token_ids or chat", "prompt")
    if kind == "text":
        if not req.text:
            raise E.InvalidRequest("prompt.text is empty: it must hold at least one token", "text")
        return req.text
    if kind == "token_ids":
        return list(req.token_ids.ids)
    if not req.chat.messages:
        raise E.InvalidRequest("prompt.chat holds no messages", "chat.messages")
    return messages_from_proto(req.chat)


# -- responses --------------------------------------------------------------------------------------
def logprobs_pb(entries: list[dict[int, float]], tokens: list[int], k: int) -> list[pb.TokenLogprob]:
    out = []
    for tok, entry in zip(tokens, entries):
        top = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
        out.append(pb.TokenLogprob(token_id=tok, logprob=entry[tok],
                                   top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top]))
    return out


def _set_stop_reason(msg, c: CompletionOutput) -> None:
    if isinstance(c.stop_reason, str):
        msg.stop_string = c.stop_reason
    elif isinstance(c.stop_reason, int):
        msg.stop_token_id = c.stop_reason


def usage_pb(out: RequestOutput) -> pb.Usage:
    u = Usage.of([out])
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                    cached_prompt_tokens=u.cached_prompt_tokens)


def tool_calls_pb(deltas: list[dict]) -> tuple[str, list[pb.ToolCall]]:
    """kiln/tools' OpenAI-shaped deltas -> (content text, ToolCalls), pieces of the same call merged."""
    text, calls = "", []
    for d in deltas:
        text += d.get("content") or ""
        for tc in d.get("tool_calls", ()):
            fn = tc.get("function", {})
            if calls and calls[-1].index == tc["index"]:
                calls[-1].arguments += fn.get("arguments", "")
                continue
            calls.append(pb.ToolCall(index=tc["index"], id=tc.get("id", ""), name=fn.get("name", ""),
                                     arguments=fn.get("arguments", "")))
    return text, calls


def _finish(c: CompletionOutput, made_calls: bool) -> str:
    return "tool_calls" if made_calls and c.finish_reason == "stop" else c.finish_reason or ""


class Deltas:
    """Cumulative RequestOutputs -> per-sample GenerateResponses (what is new since the last one); with tools,
    `text` is the content and tool calls stream as ToolCall deltas (kiln/tools/output.ToolStream)."""

    def __init__(self, params: SamplingParams, tools: ToolUse | None = None):
        self.params, self.tools = params, tools
        self.tracker = DeltaTracker()
        self.sent_prompt = False
        self.streams: dict[int, T.ToolStream] = {}

    def _tools(self, m: pb.GenerateResponse, c: CompletionOutput, d) -> None:
        ts = self.streams.setdefault(c.index, T.ToolStream(self.tools))
        deltas, made = ts.feed(d.text), False
        if d.finishing:
            rest, made = ts.finish()
            deltas += rest
        m.text, calls = tool_calls_pb(deltas)
        m.tool_calls.extend(calls)
        if d.finishing:
            m.finish_reason = _finish(c, made)

    def __call__(self, out: RequestOutput) -> list[pb.GenerateResponse]:
        msgs = []
        for c in out.outputs:
            d = self.tracker.delta(c.index, c)
            if d.empty:
                continue
            m = pb.GenerateResponse(request_id=out.request_id, index=c.index, text=d.text, token_ids=d.token_ids)
            if d.logprobs is not None:
                m.logprobs.extend(logprobs_pb(d.logprobs, d.token_ids, self.params.logprobs or 0))
            if d.finishing:
                m.finish_reason = c.finish_reason
                _set_stop_reason(m, c)
            if self.tools is not None:
                self._tools(m, c, d)
            msgs.append(m)
        if out.finished:
            if not msgs:
                msgs.append(pb.GenerateResponse(request_id=out.request_id, index=0))
            msgs[-1].usage.CopyFrom(usage_pb(out))
        if msgs and not self.sent_prompt and out.prompt_logprobs is not None:
            self.sent_prompt = True
            msgs[0].prompt_logprobs.extend(prompt_logprobs_pb(out, self.params.prompt_logprobs or 0))
        return msgs


def prompt_logprobs_pb(out: RequestOutput, k: int) -> list[pb.TokenLogprob]:
    """One TokenLogprob per prompt token after the first (the first has no logprob)."""
    ids, entries = out.prompt_token_ids[1:], out.prompt_logprobs[1:]
    return logprobs_pb([e if e is not None else {t: float("nan")} for t, e in zip(ids, entries)], ids, k)


def reply_pb(last: RequestOutput, params: SamplingParams, tools: ToolUse | None = None) -> pb.GenerateReply:
    reply = pb.GenerateReply(request_id=last.request_id, usage=usage_pb(last))
    for c in last.outputs:
        m = reply.completions.add(index=c.index, text=c.text, token_ids=c.token_ids,
                                  finish_reason=c.finish_reason or "")
        if tools is not None:
            msg, made = T.message(tools, c.text)
            m.text, m.finish_reason = msg["content"] or "", _finish(c, made)
            m.tool_calls.extend(pb.ToolCall(index=i, id=tc["id"], name=tc["function"]["name"],
                                            arguments=tc["function"]["arguments"])
                                for i, tc in enumerate(msg.get("tool_calls", ())))
        if c.logprobs is not None:
            m.cumulative_logprob = c.cumulative_logprob
            m.logprobs.extend(logprobs_pb(c.logprobs, c.token_ids, params.logprobs or 0))
        _set_stop_reason(m, c)
    if last.prompt_logprobs is not None:
        reply.prompt_logprobs.extend(prompt_logprobs_pb(last, params.prompt_logprobs or 0))
    return reply


def model_info_pb(engine, name: str, platform: str) -> pb.ModelInfo:
    cfg, st = engine.engine.config, engine.stats()
    b = cfg.buckets
    return pb.ModelInfo(
        model=name, max_model_len=cfg.scheduler.max_model_len,
        vocab_size=engine.engine.spec.vocab_size, dtype=cfg.dtype, backend=cfg.backend,
        platform=platform, max_num_seqs=cfg.scheduler.max_num_seqs,
        prefill_batch_buckets=b.prompt_bs, prefill_seq_buckets=b.prompt_seq,
        decode_batch_buckets=b.decode_bs, decode_block_buckets=b.decode_blocks,
        compiles=int(st.get("compiles", 0)), tensor_parallel_size=cfg.parallel.tensor_parallel_size,
        kv_bytes_per_block=cfg.memory.kv_bytes_per_block, kv_shards=cfg.memory.kv_shards,
        cache=pb.CacheState(blocks_total=cfg.cache.num_blocks - 1, blocks_used=int(st.get("blocks_used", 0)),
                            blocks_free=int(st.get("blocks_free", 0)),
                            blocks_cached=int(st.get("blocks_cached", 0)),
                            prefix_hit_rate=float(st.get("prefix_hit_rate", 0.0)),
                            block_size=cfg.cache.block_size))
