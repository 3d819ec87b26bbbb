"""kiln.v1 messages <-> the serving core: requests to prompts and SamplingParams, outputs to responses, and
kiln's errors to gRPC status codes. No I/O here; grpc_server.py wires it to the network."""
from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import DecodeError

from kiln.engine.outputs import CompletionOutput, RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.structured.params import StructuredOutputsParams
from kiln.proto import inference_pb2 as pb
from kiln.serving import errors as E
from kiln.serving.deltas import DeltaTracker
from kiln.serving.usage import Usage

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


def messages_from_proto(chat: pb.ChatMessages) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in chat.messages]


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


class Deltas:
    """Cumulative RequestOutputs -> per-sample GenerateResponses (what is new since the last one)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.tracker = DeltaTracker()
        self.sent_prompt = False

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


def reply_pb(last: RequestOutput, params: SamplingParams) -> pb.GenerateReply:
    reply = pb.GenerateReply(request_id=last.request_id, usage=usage_pb(last))
    for c in last.outputs:
        m = reply.completions.add(index=c.index, text=c.text, token_ids=c.token_ids,
                                  finish_reason=c.finish_reason or "")
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
