"""The gRPC transport: kiln.v1.Inference, grpc.health.v1 and reflection over one ServingCore.

    start(): bind (127.0.0.1 unless --host; TLS if --tls-cert/--tls-key, client certificates required and verified
            with --tls-client-ca), health NOT_SERVING, reflection on
    every kiln.v1 call: API key from metadata (UNAUTHENTICATED) ─> decodable message (INVALID_ARGUMENT)
        ─> grpc_proto parses it (tools: kiln/tools/request.prepare, as HTTP) ─> core.submit: validation,
           admission (see kiln/serving/core.py)
        ─> outputs streamed as per-sample deltas (Generate) or one reply (GenerateUnary)
        client cancel / disconnect / deadline ─> the core's stream is closed ─> abort ─> blocks freed
    kiln errors -> status codes: grpc_proto.STATUS. Health follows core.health: SERVING only while the core is
    (NOT_SERVING warming up, draining, or once the engine has stopped), for "" and kiln.v1.Inference.
"""
from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kiln.engine.pooling import PoolingParams
from kiln.entrypoints import grpc_proto as G
from kiln.proto import inference_pb2 as pb
from kiln.serving import errors as E
from kiln.serving.core import ServingCore
from kiln.serving.health import State
from kiln.serving.options import ServeOptions

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name   # kiln.v1.Inference


class InferenceServicer:
    """kiln.v1.Inference: each RPC translates its messages for the core and the core's errors to status."""

    def __init__(self, core: ServingCore):
        self.core = core

    async def _call(self, method: str, request, context, fn):
        """Run `fn(engine)` after auth and readiness; ServingErrors become status, counted in the metrics."""
        status = grpc.StatusCode.OK
        try:
            self.core.authenticate(dict(context.invocation_metadata() or ()).get("authorization"))
            if isinstance(request, G.BadMessage):
                raise E.InvalidRequest(f"request is not a valid {method} message ({request.error}); "
                                       f"strings must be UTF-8")
            return await fn(self.core.ready())
        except E.ServingError as e:
            status = G.status_of(e)
            await context.abort(status, e.message)
        except TimeoutError:
            status = grpc.StatusCode.DEADLINE_EXCEEDED
            await context.abort(status, "deadline exceeded; the request was aborted")
        except asyncio.CancelledError:
            status = grpc.StatusCode.CANCELLED
            raise
        finally:
            self.core.count(method, status.name)

    def _prepare(self, request, engine):
        """(prompt, SamplingParams, ToolUse or None) of a GenerateRequest; raises InvalidRequest."""
        params = G.sampling_params_from_proto(request.sampling_params)
        prompt, tools = G.tools_from_proto(request, G.prompt_from_proto(request), params,
                                           engine.tokenizer.chat_template, self.core.opts.tool_call_parser)
        return prompt, params, tools

    async def _run(self, request, context, prompt, params, on_output):
        """Submit a GenerateRequest and await `on_output(out)` for each cumulative output; returns the last."""
        req = self.core.submit([prompt], params, request.request_id or None)
        last = None
        try:
            async with contextlib.aclosing(req.outputs()) as stream, asyncio.timeout(context.time_remaining()):
                async for _, last in stream:
                    await on_output(last)
            return last
        finally:
            req.close()          # idempotent; frees the slots even if the stream never started

    async def Generate(self, request, context):
        async def run(engine):
            prompt, params, tools = self._prepare(request, engine)
            deltas = G.Deltas(params, tools)

            async def send(out):
                for m in deltas(out):
                    await context.write(m)
            await self._run(request, context, prompt, params, send)
        await self._call("Generate", request, context, run)

    async def GenerateUnary(self, request, context):
        async def run(engine):
            async def keep(out):
                pass
            prompt, params, tools = self._prepare(request, engine)
            return G.reply_pb(await self._run(request, context, prompt, params, keep), params, tools)
        return await self._call("GenerateUnary", request, context, run)

    async def Tokenize(self, request, context):
        async def run(engine):
            if request.WhichOneof("input") == "chat":
                _, ids = self.core.encode(G.messages_from_proto(request.chat))
            else:
                add = request.add_special_tokens if request.HasField("add_special_tokens") else True
                ids = engine.tokenizer.encode(request.text, add_special_tokens=add)
            return pb.TokenizeResponse(token_ids=ids, count=len(ids),
                                       max_model_len=engine.engine.config.scheduler.max_model_len)
        return await self._call("Tokenize", request, context, run)

    async def Detokenize(self, request, context):
        async def run(engine):
            vocab = engine.engine.spec.vocab_size
            bad = [t for t in request.token_ids if not 0 <= t < vocab]
            if bad:
                raise E.InvalidRequest(f"token_ids holds {bad[0]}, outside the vocabulary [0, {vocab})", "token_ids")
            skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
            try:
                text = engine.tokenizer.decode(list(request.token_ids), skip_special_tokens=skip)
                text.encode("utf-8")   # lone surrogates cannot go on the wire
            except (ValueError, OverflowError, TypeError) as e:
                raise E.InvalidRequest(f"token_ids cannot be decoded: {e}", "token_ids") from None
            return pb.DetokenizeResponse(text=text)
        return await self._call("Detokenize", request, context, run)

    async def GetModelInfo(self, request, context):
        async def run(engine):
            from kiln.backends.platform import jax_platform
            return G.model_info_pb(engine, self.core.model_name, jax_platform())
        return await self._call("GetModelInfo", request, context, run)

    async def Abort(self, request, context):
        async def run(engine):
            return pb.AbortResponse(found=self.core.abort(request.request_id))
        return await self._call("Abort", request, context, run)

    async def Embed(self, request, context):
        async def run(engine):
            prompts = []
            for i, x in enumerate(request.inputs):
                kind = x.WhichOneof("input")
                if kind is None:
                    raise E.InvalidRequest(f"inputs[{i}] holds neither text nor token_ids", f"inputs[{i}]")
                prompts.append(x.text if kind == "text" else list(x.token_ids.ids))
            if not prompts:
                raise E.InvalidRequest("inputs is empty: give at least one text or token_ids", "inputs")
            pooling = PoolingParams(request.pooling if request.HasField("pooling") else "last",
                                    request.normalize if request.HasField("normalize") else True)
            try:
                pooling.verify()
            except ValueError as e:
                raise E.InvalidRequest(str(e), "pooling") from None
            async with asyncio.timeout(context.time_remaining()):
                outs = await self.core.embed(prompts, pooling, request.request_id or None)
            n = sum(len(o.prompt_token_ids) for o in outs)
            return pb.EmbedResponse(embeddings=[pb.Embedding(values=o.outputs.embedding,
                                                             prompt_tokens=len(o.prompt_token_ids)) for o in outs],
                                    usage=pb.Usage(prompt_tokens=n))
        return await self._call("Embed", request, context, run)

    def handler(self) -> grpc.GenericRpcHandler:
        """Method handlers whose deserializer turns undecodable bytes into INVALID_ARGUMENT, not INTERNAL."""
        def h(kind, fn, req, resp):
            return kind(fn, request_deserializer=G.safe_deserializer(req), response_serializer=resp.SerializeToString)
        uu, us = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Generate": h(us, self.Generate, pb.GenerateRequest, pb.GenerateResponse),
            "GenerateUnary": h(uu, self.GenerateUnary, pb.GenerateRequest, pb.GenerateReply),
            "Tokenize": h(uu, self.Tokenize, pb.TokenizeRequest, pb.TokenizeResponse),
            "Detokenize": h(uu, self.Detokenize, pb.DetokenizeRequest, pb.DetokenizeResponse),
            "GetModelInfo": h(uu, self.GetModelInfo, pb.ModelInfoRequest, pb.ModelInfo),
            "Abort": h(uu, self.Abort, pb.AbortRequest, pb.AbortResponse),
            "Embed": h(uu, self.Embed, pb.EmbedRequest, pb.EmbedResponse),
        })


def server_credentials(opts: ServeOptions) -> grpc.ServerCredentials:
    """TLS with --tls-cert/--tls-key; with --tls-client-ca also mutual TLS: a client without a certificate signed
    by that CA fails the handshake (the client sees UNAVAILABLE), before any RPC or API key is looked at."""
    pair = [(Path(opts.tls_key).read_bytes(), Path(opts.tls_cert).read_bytes())]
    if opts.tls_client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=Path(opts.tls_client_ca).read_bytes(),
                                       require_client_auth=True)


class GrpcServer:
    """One gRPC server (Inference + Health + reflection) over a ServingCore, inside the running asyncio loop."""

    def __init__(self, core: ServingCore, opts: ServeOptions):
        self.core, self.opts = core, opts
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self._tasks: set[asyncio.Task] = set()
        core.health.watch(self._on_state)

    async def start(self) -> int:
        """Bind and start serving (health NOT_SERVING until the core is SERVING); returns the bound port."""
        opts = self.opts
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", opts.max_message_bytes),
            ("grpc.max_send_message_length", opts.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ])
        self.server.add_generic_rpc_handlers((InferenceServicer(self.core).handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        await self._set_health(self.core.health.serving)
        addr = f"{opts.host}:{opts.port}"
        if opts.tls_cert:
            self.port = self.server.add_secure_port(addr, server_credentials(opts))
        else:
            self.port = self.server.add_insecure_port(addr)
        if not self.port:
            raise OSError(f"cannot bind {addr}")
        await self.server.start()
        return self.port

    async def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            await self.server.stop(grace)

    def _on_state(self, state: State) -> None:
        t = asyncio.get_running_loop().create_task(self._set_health(state is State.SERVING))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)
