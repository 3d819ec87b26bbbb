"""The serving core: what gRPC, HTTP and batch share, knowing no wire format.

    transport: parse the wire format into (prompts, SamplingParams, request id?)
    core.authenticate(authorization)             Unauthenticated
    req = core.submit(prompts, params, ...)      synchronous, so admission is decided the moment it arrives:
        ready? (health SERVING, engine alive)    Unavailable
        encode + validate every prompt           InvalidRequest naming the field
        request id free? (client-chosen)         Conflict
        slots = prompts x n free?                Overloaded          (admission.py)
    async for i, out in req.outputs():           cumulative RequestOutputs by prompt index (the newest only, for
                                                 a consumer that fell behind: latest.py); Internal if the engine
                                                 fails it; closing the iteration aborts the engine requests;
                                                 slots are released once the engine has finished every prompt
    req.close()                                  idempotent (outputs() ends with it): slots released, in-flight
                                                 entry removed; call it if outputs() may never be iterated
    transport: deltas (deltas.py), usage (usage.py), errors -> its codes

Lifecycle: attach(engine) ─> warmup() ─> SERVING ─> drain() ─> DRAINING; AsyncEngine(on_death=core.engine_died)
moves it to STOPPED from the engine thread, and every health endpoint watching `core.health` flips at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence

from kiln.engine.async_engine import AsyncEngine, EngineDeadError
from kiln.engine.outputs import EmbeddingRequestOutput, RequestOutput
from kiln.engine.pooling import PoolingParams
from kiln.engine.sampling_params import SamplingParams
from kiln.serving import prompts as P
from kiln.serving.admission import Admission, Slots
from kiln.serving.auth import ApiKey
from kiln.serving.errors import Conflict, Internal, ServingError, Unavailable, invalid
from kiln.serving.health import Health, State
from kiln.serving.latest import Latest
from kiln.serving.metrics import RequestObserver, ServerMetrics
from kiln.serving.options import ServingOptions
from kiln.serving.registry import InFlight

log = logging.getLogger(__name__)


def new_request_id(prefix: str = "kiln") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Request:
    """One admitted request: P prompts (each an engine request) with the same SamplingParams (or PoolingParams:
    embeddings, whose outputs are EmbeddingRequestOutputs)."""

    def __init__(self, core: "ServingCore", request_id: str, texts: list[str | None], ids: list[list[int]],
                 params: SamplingParams | PoolingParams, chat: bool, slots: Slots):
        self.core, self.request_id, self.texts, self.ids = core, request_id, texts, ids
        self.params, self.chat, self._slots = params, chat, slots
        self.engine_ids = [request_id] if len(ids) == 1 else [f"{request_id}-{i}" for i in range(len(ids))]
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._slots.release()
            self.core.inflight.remove(self.request_id)

    async def _one(self, i: int) -> AsyncIterator[RequestOutput]:
        observe = RequestObserver(self.core.metrics)
        try:
            async with contextlib.aclosing(self.core.engine.generate(self.ids[i], self.params,
                                                                     self.engine_ids[i])) as stream:
                async for out in stream:
                    if isinstance(out, EmbeddingRequestOutput):
                        if out.finished:
                            self.core.metrics.prompt_tokens.inc(len(out.prompt_token_ids))
                    else:
                        observe(out)
                    yield out
            observe.finish()
        except EngineDeadError as e:
            raise Internal(str(e), self.request_id) from None
        except ServingError:         # already a client-facing answer (e.g. a replica lost: Unavailable, retry)
            raise
        except ValueError as e:      # rejected by the engine thread after the checks of submit()
            raise invalid(e, self.chat) from None
        except Exception as e:       # the engine failed this request only (e.g. a step's fault); it goes on
            raise Internal(f"the engine failed this request: {type(e).__name__}: {e}", self.request_id) from None

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) as steps produce them; ends when every prompt has finished.

        One pump task per prompt drains its engine stream at the engine's pace into a `Latest` box, so a
        consumer that falls behind (a client that stops reading) skips to the newest output instead of the
        engine queueing one copy of every output for it; and the request's admission slots are released as
        soon as the engine has finished every prompt, not when the slowest client has read the last byte."""
        box = Latest(len(self.ids))

        async def pump(i: int) -> None:
            try:
                async with contextlib.aclosing(self._one(i)) as s:
                    async for out in s:
                        box.put(i, out)
            except Exception as e:   # noqa: BLE001 - handed to the consumer
                box.fail(e)
            finally:
                box.done()
                if box.open == 0:
                    self._slots.release()     # no sequence of this request is in the engine any more
        tasks = [asyncio.create_task(pump(i)) for i in range(len(self.ids))]
        try:
            while (items := await box.take()) is not None:
                for i, out in items.items():
                    yield i, out
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.close()

    async def finals(self) -> dict[int, RequestOutput]:
        """Run to the end; the last output of every prompt."""
        done: dict[int, RequestOutput] = {}
        async with contextlib.aclosing(self.outputs()) as s:
            async for i, out in s:
                done[i] = out
        return done


class ServingCore:
    def __init__(self, opts: ServingOptions = ServingOptions(), metrics: ServerMetrics | None = None):
        self.opts = opts
        self.engine: AsyncEngine | None = None
        self.health = Health()
        self.inflight = InFlight()
        self.admission: Admission | None = None
        self.auth = ApiKey(opts.api_key) if opts.api_key else None
        self.metrics = metrics or ServerMetrics(stats=lambda: self.engine.stats() if self.engine else None,
                                                pending=lambda: len(self.inflight))
        self._name = ""
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def attach(self, engine: AsyncEngine, model_name: str = "") -> None:
        """Serve this engine (call on the event loop; `warmup()` then makes the core SERVING)."""
        self.engine, self._name = engine, model_name
        self.admission = Admission(engine.engine.config.scheduler.max_num_seqs, self.opts.max_queued)
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        if engine.error is not None:
            self.health.set(State.STOPPED, str(engine.error))

    def engine_died(self, error: BaseException) -> None:
        """AsyncEngine's on_death (engine thread): STOPPED, on the event loop."""
        log.error("the engine stopped: %r; health is NOT_SERVING from now on", error)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.health.set, State.STOPPED, repr(error))
        else:
            self.health.set(State.STOPPED, repr(error))

    async def warmup(self) -> None:
        """One tiny request through the engine (compiles the smallest graphs), then SERVING."""
        ids = self.engine.tokenizer.encode("warm up") or [0]
        async for _ in self.engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                                            request_id=new_request_id("warmup")):
            pass
        self.start_serving()

    def start_serving(self) -> None:
        """SERVING from now on (warmup() ends with it; a batch job, which needs no warmup, calls it)."""
        self.health.set(State.SERVING)

    async def drain(self, seconds: float) -> None:
        """Refuse new requests, wait up to `seconds` for in-flight ones, then abort what is left."""
        self.health.set(State.DRAINING)
        if not await self.inflight.wait_empty(seconds):
            for rid in self.inflight.ids():
                log.warning("drain: aborting %s after %.1fs", rid, seconds)
                self.abort(rid)

    # -- per request --------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        if self.opts.served_model_name:
            return self.opts.served_model_name
        return self._name or (self.engine.engine.config.model.model if self.engine else "")

    def authenticate(self, authorization: str | bytes | None) -> None:
        if self.auth is not None:
            self.auth.check(authorization)

    def ready(self) -> AsyncEngine:
        """The engine, or Unavailable while warming up, draining or stopped."""
        if self.engine is not None and self.engine.error is not None:
            self.health.set(State.STOPPED, repr(self.engine.error))   # on_death may not have run yet
        if self.engine is None:
            raise Unavailable("the engine is still warming up")
        self.health.check()
        return self.engine

    def encode(self, prompt: P.Prompt) -> tuple[str | None, list[int]]:
        return P.encode(self.ready().tokenizer, prompt, self.opts.limits)

    def submit(self, prompts: Sequence[P.Prompt], params: SamplingParams | PoolingParams,
               request_id: str | None = None, id_prefix: str = "kiln") -> Request:
        """Check, encode and admit a request of one or more prompts; raises ServingError subclasses.
        PoolingParams make it an embedding request (one slot per prompt)."""
        engine = self.ready()
        texts, ids, chat = [], [], False
        for p in prompts:
            chat = chat or P.is_chat(p)
            text, toks = P.encode(engine.tokenizer, p, self.opts.limits)
            P.validate(engine.engine, toks, params, P.is_chat(p))
            texts.append(text)
            ids.append(toks)
        rid = request_id or new_request_id(id_prefix)
        if rid in self.inflight:
            raise Conflict(f"request_id {rid!r} is already in use")
        slots = self.admission.acquire(len(ids) * getattr(params, "n", 1))
        req = Request(self, rid, texts, ids, params, chat, slots)
        self.inflight.add(rid, req.engine_ids)
        return req

    async def embed(self, prompts: Sequence[P.Prompt], pooling: PoolingParams | None = None,
                    request_id: str | None = None) -> list[EmbeddingRequestOutput]:
        """The embedding of every prompt, in order (admitted as one request); raises ServingError subclasses."""
        req = self.submit(prompts, pooling or PoolingParams(), request_id, id_prefix="embd")
        finals = await req.finals()
        return [finals[i] for i in range(len(prompts))]

    def abort(self, request_id: str) -> bool:
        """Stop a request of this server now (its streams end with finish_reason abort); False if unknown."""
        ids = self.inflight.engine_ids(request_id)
        for eid in ids:
            self.engine.abort(eid)
        return bool(ids)

    def count(self, method: str, status: str) -> None:
        """One finished call of `method` (gRPC method or HTTP path) with its transport's status."""
        self.metrics.requests.labels(method, status).inc()
