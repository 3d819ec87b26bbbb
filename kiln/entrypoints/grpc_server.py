"""`kiln serve`: the gRPC inference service (kiln.v1.Inference) over an AsyncEngine.

    start(): bind (127.0.0.1 unless --host; TLS if --tls-cert/--tls-key), health NOT_SERVING, reflection on
    attach(engine) + warmup(): one tiny request compiles the smallest graphs ─> health SERVING, log "ready"
    Generate: auth interceptor ─> parse (INVALID_ARGUMENT naming the field) ─> admission (RESOURCE_EXHAUSTED past
              --max-queued, UNAVAILABLE while draining) ─> AsyncEngine.generate ─> per-sample deltas streamed
              client cancel / disconnect / deadline ─> the engine stream is closed ─> abort ─> blocks freed
    SIGTERM: health NOT_SERVING, refuse new requests, let in-flight ones finish for --drain-seconds, exit 0
    --http-port: the OpenAI-compatible HTTP API (http_server.py) runs in the same loop over the same engine,
    sharing readiness, draining, admission, the API key and the metrics registry
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kiln.engine.async_engine import AsyncEngine, EngineDeadError
from kiln.engine.outputs import CompletionOutput, DeltaTracker, RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.entrypoints.metrics import RequestObserver, ServerMetrics
from kiln.proto import inference_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name   # kiln.v1.Inference
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # reachable without the API key


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int | None = 50051              # 0: any free port; None: no gRPC (HTTP only)
    max_queued: int = 64                  # requests allowed to wait beyond the running batch
    drain_seconds: float = 30.0           # SIGTERM: how long in-flight requests may take to finish
    api_key: str | None = None            # require `authorization: Bearer <key>` on kiln.v1 calls
    tls_cert: str | None = None           # PEM files; both or neither
    tls_key: str | None = None
    metrics_port: int | None = None       # serve Prometheus /metrics there (0: any free port)
    max_message_bytes: int = 16 * 2**20
    http_port: int | None = None          # also serve the OpenAI-compatible HTTP API there (0: any free port)
    served_model_name: str | None = None  # the name GetModelInfo and /v1/models report (default: --model)

    def __post_init__(self):
        if self.port is None and self.http_port is None:
            raise ValueError("--no-grpc needs --http-port: there would be nothing to serve")
        if self.max_queued < 0:
            raise ValueError(f"--max-queued must be >= 0, got {self.max_queued}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")


class _BadMessage:
    """What the request deserializer returns for bytes that are not a valid message (e.g. invalid UTF-8)."""

    def __init__(self, error: Exception):
        self.error = error


def _safe_deserializer(cls):
    def deserialize(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError) as e:
            return _BadMessage(e)
    return deserialize


# -- proto <-> engine -------------------------------------------------------------------------------
_SCALAR_FIELDS = ("n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p",
                  "top_k", "min_p", "seed", "ignore_eos", "max_tokens", "min_tokens", "logprobs",
                  "include_stop_str_in_output", "skip_special_tokens")


def sampling_params_from_proto(m: pb.SamplingParams) -> SamplingParams:
    """Only the fields that are set; SamplingParams applies its defaults and raises ValueError on bad values."""
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
    return SamplingParams(**kw)


def prompt_from_proto(req: pb.GenerateRequest) -> str | list[int] | list[dict[str, str]]:
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise ValueError("prompt is required: set text, token_ids or chat")
    if kind == "text":
        if not req.text:
            raise ValueError("prompt.text is empty: it must hold at least one token")
        return req.text
    if kind == "token_ids":
        return list(req.token_ids.ids)
    if not req.chat.messages:
        raise ValueError("prompt.chat holds no messages")
    return [{"role": m.role, "content": m.content} for m in req.chat.messages]


def _logprobs(entries: list[dict[int, float]], tokens: list[int], k: int) -> list[pb.TokenLogprob]:
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


def _usage(out: RequestOutput) -> pb.Usage:
    return pb.Usage(prompt_tokens=len(out.prompt_token_ids),
                    completion_tokens=sum(len(c.token_ids) for c in out.outputs),
                    cached_prompt_tokens=out.num_cached_tokens)


class _Deltas:
    """Turns cumulative RequestOutputs into per-sample GenerateResponses (what is new since the last one)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.tracker = DeltaTracker()

    def __call__(self, out: RequestOutput) -> list[pb.GenerateResponse]:
        msgs = []
        for c in out.outputs:
            d = self.tracker.delta(c.index, c)
            if not (d.text or d.token_ids or d.finishing):
                continue
            m = pb.GenerateResponse(request_id=out.request_id, index=c.index, text=d.text, token_ids=d.token_ids)
            if d.logprobs is not None:
                m.logprobs.extend(_logprobs(d.logprobs, d.token_ids, self.params.logprobs or 0))
            if d.finishing:
                m.finish_reason = c.finish_reason
                _set_stop_reason(m, c)
            msgs.append(m)
        if out.finished:
            if not msgs:
                msgs.append(pb.GenerateResponse(request_id=out.request_id, index=0))
            msgs[-1].usage.CopyFrom(_usage(out))
        return msgs


# -- the service ------------------------------------------------------------------------------------
class InferenceServicer:
    """kiln.v1.Inference over one AsyncEngine (attached once the engine is built)."""

    def __init__(self, opts: ServeOptions, metrics: ServerMetrics):
        self.opts, self.metrics = opts, metrics
        self.engine: AsyncEngine | None = None
        self.model_name = ""
        self.ready = False
        self.draining = False
        self.requests: set[str] = set()      # request ids this server is streaming now

    # -- helpers --------------------------------------------------------------------------------
    async def _fail(self, context, method: str, code: grpc.StatusCode, message: str):
        self.metrics.requests.labels(method, code.name).inc()
        await context.abort(code, message)

    async def _check(self, request, context, method: str) -> AsyncEngine:
        if isinstance(request, _BadMessage):
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT,
                             f"request is not a valid {method} message ({request.error}); strings must be UTF-8")
        if self.engine is None or not self.ready:
            await self._fail(context, method, grpc.StatusCode.UNAVAILABLE, "the engine is still warming up")
        return self.engine

    def admission_error(self) -> tuple[grpc.StatusCode, str] | None:
        """Why a new request cannot be admitted now (draining, or --max-queued reached), or None.

        The one admission rule of the process: the HTTP server asks the same question."""
        if self.draining:
            return grpc.StatusCode.UNAVAILABLE, "the server is draining (shutting down); retry on another replica"
        sched = self.engine.engine.config.scheduler
        waiting = self.engine.num_pending - sched.max_num_seqs
        if waiting >= self.opts.max_queued:
            return grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"server is at capacity: {self.engine.num_pending} requests in flight, "
                f"{max(waiting, 0)} waiting; max_num_seqs is {sched.max_num_seqs} and "
                f"--max-queued is {self.opts.max_queued}")
        return None

    async def _admit(self, context, method: str) -> None:
        err = self.admission_error()
        if err is not None:
            await self._fail(context, method, *err)

    def _parse(self, request: pb.GenerateRequest):
        params = sampling_params_from_proto(request.sampling_params)
        return prompt_from_proto(request), params, request.request_id or f"kiln-{uuid.uuid4().hex}"

    async def _run(self, request, context, method: str, on_output=None) -> RequestOutput:
        """Run one request to its end, awaiting `on_output(out, params)` per cumulative output; returns the last.

        Failures become gRPC status; a cancelled call (client gone) or an exceeded deadline closes the engine
        stream, which aborts the request and frees its blocks.
        """
        engine = await self._check(request, context, method)
        try:
            prompt, params, rid = self._parse(request)
        except ValueError as e:
            await self._fail(context, method, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if rid in self.requests:
            await self._fail(context, method, grpc.StatusCode.ALREADY_EXISTS, f"request_id {rid!r} is already in use")
        await self._admit(context, method)
        t0 = time.perf_counter()
        status, out, observe = grpc.StatusCode.OK, None, RequestObserver(self.metrics)
        self.requests.add(rid)
        try:
            async with contextlib.aclosing(engine.generate(prompt, params, rid)) as stream, \
                    asyncio.timeout(context.time_remaining()):
                async for out in stream:
                    observe(out)
                    if on_output is not None:
                        await on_output(out, params)
            observe.finish()
            return out
        except ValueError as e:   # validation (prompt length, token ids, ...): raised before any output
            status = grpc.StatusCode.INVALID_ARGUMENT
            await context.abort(status, str(e))
        except TimeoutError:
            status = grpc.StatusCode.DEADLINE_EXCEEDED
            await context.abort(status, f"deadline exceeded after {time.perf_counter() - t0:.2f}s; "
                                        f"request {rid} aborted")
        except asyncio.CancelledError:
            status = grpc.StatusCode.CANCELLED
            raise
        except EngineDeadError as e:
            status = grpc.StatusCode.INTERNAL
            await context.abort(status, str(e))
        finally:
            self.requests.discard(rid)
            self.metrics.requests.labels(method, status.name).inc()

    # -- RPCs -----------------------------------------------------------------------------------
    async def Generate(self, request, context):
        deltas: list[_Deltas] = []

        async def send(out, params):
            if not deltas:
                deltas.append(_Deltas(params))
            for m in deltas[0](out):
                await context.write(m)
        await self._run(request, context, "Generate", send)

    async def GenerateUnary(self, request, context):
        seen: list[SamplingParams] = []

        async def keep(out, params):
            seen[:] = [params]
        last = await self._run(request, context, "GenerateUnary", keep)
        k = (seen[0].logprobs or 0) if seen else 0
        reply = pb.GenerateReply(request_id=last.request_id, usage=_usage(last))
        for c in last.outputs:
            m = reply.completions.add(index=c.index, text=c.text, token_ids=c.token_ids,
                                      finish_reason=c.finish_reason or "")
            if c.logprobs is not None:
                m.cumulative_logprob = c.cumulative_logprob
                m.logprobs.extend(_logprobs(c.logprobs, c.token_ids, k))
            _set_stop_reason(m, c)
        return reply

    async def Tokenize(self, request, context):
        engine = await self._check(request, context, "Tokenize")
        kind = request.WhichOneof("input")
        try:
            if kind == "chat":
                ids = engine.tokenizer.apply_chat_template([{"role": m.role, "content": m.content}
                                                            for m in request.chat.messages])
            else:
                add = request.add_special_tokens if request.HasField("add_special_tokens") else True
                ids = engine.tokenizer.encode(request.text, add_special_tokens=add)
        except ValueError as e:
            await self._fail(context, "Tokenize", grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.metrics.requests.labels("Tokenize", "OK").inc()
        return pb.TokenizeResponse(token_ids=ids, count=len(ids),
                                   max_model_len=engine.engine.config.scheduler.max_model_len)

    async def Detokenize(self, request, context):
        engine = await self._check(request, context, "Detokenize")
        vocab = engine.engine.spec.vocab_size
        bad = [t for t in request.token_ids if not 0 <= t < vocab]
        if bad:
            await self._fail(context, "Detokenize", grpc.StatusCode.INVALID_ARGUMENT,
                             f"token_ids holds {bad[0]}, outside the vocabulary [0, {vocab})")
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        try:
            text = engine.tokenizer.decode(list(request.token_ids), skip_special_tokens=skip)
            text.encode("utf-8")   # lone surrogates cannot go on the wire
        except (ValueError, OverflowError, TypeError) as e:
            await self._fail(context, "Detokenize", grpc.StatusCode.INVALID_ARGUMENT,
                             f"token_ids cannot be decoded: {e}")
        self.metrics.requests.labels("Detokenize", "OK").inc()
        return pb.DetokenizeResponse(text=text)

    async def GetModelInfo(self, request, context):
        engine = await self._check(request, context, "GetModelInfo")
        cfg, st = engine.engine.config, engine.stats()
        b = cfg.buckets
        self.metrics.requests.labels("GetModelInfo", "OK").inc()
        return pb.ModelInfo(
            model=self.model_name or cfg.model.model, max_model_len=cfg.scheduler.max_model_len,
            vocab_size=engine.engine.spec.vocab_size, dtype=cfg.dtype, backend=cfg.backend,
            platform=_platform(), max_num_seqs=cfg.scheduler.max_num_seqs,
            prefill_batch_buckets=b.prompt_bs, prefill_seq_buckets=b.prompt_seq,
            decode_batch_buckets=b.decode_bs, decode_block_buckets=b.decode_blocks,
            compiles=int(st.get("compiles", 0)),
            cache=pb.CacheState(blocks_total=cfg.cache.num_blocks - 1, blocks_used=int(st.get("blocks_used", 0)),
                                blocks_free=int(st.get("blocks_free", 0)),
                                blocks_cached=int(st.get("blocks_cached", 0)),
                                prefix_hit_rate=float(st.get("prefix_hit_rate", 0.0)),
                                block_size=cfg.cache.block_size))

    async def Abort(self, request, context):
        engine = await self._check(request, context, "Abort")
        found = request.request_id in self.requests
        if found:
            engine.abort(request.request_id)
        self.metrics.requests.labels("Abort", "OK").inc()
        return pb.AbortResponse(found=found)

    def handler(self) -> grpc.GenericRpcHandler:
        """Method handlers whose deserializer turns undecodable bytes into INVALID_ARGUMENT, not INTERNAL."""
        def h(kind, fn, req, resp):
            return kind(fn, request_deserializer=_safe_deserializer(req), response_serializer=resp.SerializeToString)
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Generate": h(grpc.unary_stream_rpc_method_handler, self.Generate, pb.GenerateRequest,
                          pb.GenerateResponse),
            "GenerateUnary": h(grpc.unary_unary_rpc_method_handler, self.GenerateUnary, pb.GenerateRequest,
                               pb.GenerateReply),
            "Tokenize": h(grpc.unary_unary_rpc_method_handler, self.Tokenize, pb.TokenizeRequest,
                          pb.TokenizeResponse),
            "Detokenize": h(grpc.unary_unary_rpc_method_handler, self.Detokenize, pb.DetokenizeRequest,
                            pb.DetokenizeResponse),
            "GetModelInfo": h(grpc.unary_unary_rpc_method_handler, self.GetModelInfo, pb.ModelInfoRequest,
                              pb.ModelInfo),
            "Abort": h(grpc.unary_unary_rpc_method_handler, self.Abort, pb.AbortRequest, pb.AbortResponse),
        })


def _platform() -> str:
    from kiln.backends.platform import jax_platform
    return jax_platform()


class _AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects kiln.v1 calls without `authorization: Bearer <key>` before any work (health/reflection stay open)."""

    def __init__(self, api_key: str, metrics: ServerMetrics):
        self._expected = f"Bearer {api_key}".encode()
        self._metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_PREFIXES):
            return handler
        got = dict(details.invocation_metadata or ()).get("authorization", "")
        got = got.encode() if isinstance(got, str) else got
        if hmac.compare_digest(got, self._expected):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        msg = "missing authorization metadata" if not got else "invalid API key"
        metrics = self._metrics

        async def deny(request, context):
            metrics.requests.labels(method, "UNAUTHENTICATED").inc()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{msg}: send metadata 'authorization: Bearer <key>'")

        kind = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[
            (handler.request_streaming, handler.response_streaming)]
        return kind(deny, request_deserializer=lambda b: None, response_serializer=lambda m: b"")


class KilnServer:
    """One gRPC server: Inference + Health + reflection (+ metrics over HTTP). Runs inside an asyncio loop."""

    def __init__(self, opts: ServeOptions = ServeOptions()):
        self.opts = opts
        self.metrics = ServerMetrics(stats=lambda: self.servicer.engine.stats() if self.servicer.engine else None,
                                     pending=lambda: len(self.servicer.requests))
        self.servicer = InferenceServicer(opts, self.metrics)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None

    async def start(self) -> int | None:
        """Bind and start serving (health NOT_SERVING until `attach` + `warmup`); returns the bound port
        (None when `port` is None: no gRPC, only the state the HTTP server shares)."""
        opts = self.opts
        if opts.port is None:
            if opts.metrics_port is not None:
                self.metrics_port = self.metrics.start_http(opts.metrics_port, opts.host)
            return None
        interceptors = [_AuthInterceptor(opts.api_key, self.metrics)] if opts.api_key else []
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", opts.max_message_bytes),
            ("grpc.max_send_message_length", opts.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ])
        self.server.add_generic_rpc_handlers((self.servicer.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        addr = f"{self.opts.host}:{self.opts.port}"
        if self.opts.tls_cert:
            creds = grpc.ssl_server_credentials([(Path(self.opts.tls_key).read_bytes(),
                                                  Path(self.opts.tls_cert).read_bytes())])
            self.port = self.server.add_secure_port(addr, creds)
        else:
            self.port = self.server.add_insecure_port(addr)
        if not self.port:
            raise OSError(f"cannot bind {addr}")
        await self.server.start()
        if self.opts.metrics_port is not None:
            self.metrics_port = self.metrics.start_http(self.opts.metrics_port, self.opts.host)
        return self.port

    def attach(self, engine: AsyncEngine, model_name: str = "") -> None:
        self.servicer.engine, self.servicer.model_name = engine, model_name

    async def warmup(self) -> None:
        """Run one tiny request through the engine (compiles the smallest graphs), then report SERVING."""
        engine = self.servicer.engine
        ids = engine.tokenizer.encode("warm up") or [0]
        async for _ in engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                                       request_id=f"warmup-{uuid.uuid4().hex}"):
            pass
        self.servicer.ready = True
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def drain(self, seconds: float) -> None:
        """Refuse new requests, wait up to `seconds` for in-flight ones, then abort what is left."""
        self.servicer.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + seconds
        while self.servicer.requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self.servicer.requests):
            log.warning("drain: aborting %s after %.1fs", rid, seconds)
            self.servicer.engine.abort(rid)

    async def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)
        self.metrics.stop_http()

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE):
            await self.health.set(name, status)


# -- `kiln serve` -----------------------------------------------------------------------------------
