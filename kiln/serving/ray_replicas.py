"""Data-parallel serving on Ray: N engine replicas as Ray actors behind one AsyncEngine face.

    ServingCore (gRPC / HTTP, unchanged) ──> ReplicaEngine.generate(ids, params, request_id)
        picks the healthy replica with the fewest requests in flight (ties: the lowest index)
        ──> EngineReplica actor i: its own AsyncEngine over its own LLMEngine (any backend)
            streams RequestOutput back (a Ray streaming generator: one object per output)
    replica process dies ──> its in-flight streams raise ReplicaLost (UNAVAILABLE / 503: retry is safe, nothing
                             was committed) ──> Ray restarts the actor (max_restarts=-1: __init__ runs again,
                             the engine is rebuilt) ──> the health loop (ping every `health_s`) sees it answer
                             and routes to it again; the others serve throughout
    every replica dead ──> new requests get ReplicaLost until one is back

Why actors and not Ray Serve deployments: the core already does admission, auth, validation and the wire
protocols; a replica only needs an engine, and an actor handle is the smallest thing that gives placement,
restarts and streaming. The same EngineReplica class is what a Ray Serve deployment would wrap.

A replica builds its engine with `kiln.engine.build.build_engine(**engine_kwargs)`, or with `factory`
("module:function", called with engine_kwargs) where tests want the mock backend.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import os
from typing import Any

from kiln.serving.errors import Unavailable

log = logging.getLogger(__name__)

RAY_HINT = "data-parallel replicas run on Ray: pip install 'kiln[ray]' (or pip install ray)"


class ReplicaLost(Unavailable):
    """The replica serving this request died; the request may be retried (another replica will take it)."""


def require_ray():
    try:
        import ray
    except ImportError:
        raise ValueError(RAY_HINT) from None
    return ray


def _build(factory: str | None, engine_kwargs: dict):
    if factory:
        module, fn = factory.split(":")
        return getattr(importlib.import_module(module), fn)(**engine_kwargs)
    from kiln.engine.build import build_engine
    return build_engine(**engine_kwargs)


class EngineReplica:
    """One engine in its own Ray actor process (wrapped by ray.remote in `start_replicas`)."""

    def __init__(self, engine_kwargs: dict, factory: str | None = None):
        from kiln.engine.async_engine import AsyncEngine
        self.llm = _build(factory, engine_kwargs)
        self.engine = None
        self._make = lambda: AsyncEngine(self.llm)

    def _async(self):
        if self.engine is None:            # made on the actor's event loop
            self.engine = self._make()
        return self.engine

    def describe(self) -> tuple[Any, Any, Any]:
        """(config, spec, tokenizer): what the ingress validates requests with."""
        return self.llm.config, self.llm.spec, self.llm.tokenizer

    async def generate(self, prompt, params, request_id: str):
        async for out in self._async().generate(prompt, params, request_id):
            yield out

    async def abort(self, request_id: str) -> None:
        self._async().abort(request_id)

    async def ping(self) -> dict:
        e = self._async()
        return {"pid": os.getpid(), "pending": e.num_pending, "error": repr(e.error) if e.error else None,
                "stats": e.stats()}


class ReplicaEngine:
    """The AsyncEngine face over N EngineReplica actors (what ServingCore.attach and the batch runner take)."""

    def __init__(self, ray, actors: list, shadow, health_s: float = 1.0, retry_lost: bool = False):
        self._ray, self.actors, self.engine = ray, actors, shadow    # shadow: an LLMEngine for validation only
        self.tokenizer = shadow.tokenizer
        self.inflight = [0] * len(actors)
        self.healthy = [True] * len(actors)
        self.routed = [0] * len(actors)          # requests sent to each replica (tests, metrics)
        self.lost = 0                            # in-flight requests failed by a replica's death
        self._where: dict[str, int] = {}
        self._last: list[dict] = [{} for _ in actors]
        self._health_s = health_s
        self._health_task: asyncio.Task | None = None
        self.error = None                        # the face never dies; replicas do, and come back
        self.retry_lost = retry_lost             # restart a lost request on another replica (batch)
        self.max_attempts = 2 * len(actors) + 1

    # -- the AsyncEngine face ---------------------------------------------------------------------
    @property
    def num_pending(self) -> int:
        return sum(self.inflight)

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for s in self._last:
            for k, v in (s.get("stats") or {}).items():
                out[k] = out.get(k, 0.0) + v
        return out

    def pick(self) -> int:
        live = [i for i, ok in enumerate(self.healthy) if ok]
        if not live:
            raise ReplicaLost("no engine replica is up (restarting); retry")
        return min(live, key=lambda i: (self.inflight[i], i))

    async def generate(self, prompt, params=None, request_id: str | None = None):
        """Stream one request from the least-loaded healthy replica. If that replica dies: ReplicaLost, or with
        `retry_lost` (batch jobs, which keep only the final output) the request starts over on another replica,
        and only its final output is yielded."""
        from kiln.engine.sampling_params import SamplingParams
        self._ensure_health_loop()
        params = params or SamplingParams()
        rid = request_id or f"dp-{sum(self.routed)}"
        for attempt in range(self.max_attempts if self.retry_lost else 1):
            try:
                async for out in self._one(prompt, params, rid):
                    if out.finished or not self.retry_lost:   # retrying: only the final output, so that no
                        yield out                             # consumer ever sees a stream start over
                return
            except ReplicaLost:
                if attempt + 1 >= (self.max_attempts if self.retry_lost else 1):
                    raise
                log.warning("request %s: its replica died; retrying on another (attempt %d)", rid, attempt + 2)
                while not any(self.healthy):           # every replica restarting: wait for one
                    await asyncio.sleep(self._health_s)
                    await self.check_health()

    async def _one(self, prompt, params, rid: str):
        i = self.pick()
        self.inflight[i] += 1
        self.routed[i] += 1
        self._where[rid] = i
        finished = False
        try:
            gen = self.actors[i].generate.options(num_returns="streaming").remote(prompt, params, rid)
            async for ref in gen:
                out = await ref
                yield out
                finished = finished or out.finished
        except (self._ray.exceptions.RayActorError, self._ray.exceptions.ActorUnavailableError) as e:
            self.healthy[i] = False
            self.lost += 1
            finished = True                            # nothing to abort: the process is gone
            raise ReplicaLost(f"engine replica {i} died while serving this request ({type(e).__name__}); "
                              f"retry") from None
        finally:
            self.inflight[i] -= 1
            self._where.pop(rid, None)
            if not finished:
                self.abort(rid, replica=i)

    def abort(self, request_id: str, replica: int | None = None) -> None:
        i = self._where.get(request_id, replica)
        if i is not None:
            self.actors[i].abort.remote(request_id)

    def shutdown(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        for a in self.actors:
            self._ray.kill(a)

    # -- health ---------------------------------------------------------------------------------
    async def check_health(self) -> list[bool]:
        """Ping every replica once (timeout health_s): who answers is routed to."""
        async def one(i):
            try:
                self._last[i] = await asyncio.wait_for(self.actors[i].ping.remote(), self._health_s * 5)
                return self._last[i]["error"] is None
            except Exception:   # noqa: BLE001 - dead, restarting or slow: not routed to until it answers
                return False
        self.healthy = list(await asyncio.gather(*(one(i) for i in range(len(self.actors)))))
        return self.healthy

    def _ensure_health_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._health_task is None or self._health_task.done() or self._health_task.get_loop() is not loop:
            self._health_task = loop.create_task(self._health_loop())

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self._health_s)
            await self.check_health()


def start_replicas(n: int, engine_kwargs: dict, *, factory: str | None = None, address: str | None = None,
                   num_cpus_per_replica: float = 1, health_s: float = 1.0, retry_lost: bool = False,
                   **ray_init) -> ReplicaEngine:
    """Start (or join, with `address`) a Ray cluster and N replicas; returns their ReplicaEngine once every
    replica has built its engine."""
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **ray_init)
    cls = ray.remote(max_restarts=-1, max_task_retries=0, num_cpus=num_cpus_per_replica)(EngineReplica)
    actors = [cls.remote(engine_kwargs, factory) for _ in range(n)]
    config, spec, tokenizer = ray.get(actors[0].describe.remote())
    ray.get([a.ping.remote() for a in actors])
    from kiln.engine.llm_engine import LLMEngine
    shadow = LLMEngine(config, spec, None, tokenizer)         # validates requests; never steps
    log.info("%d engine replicas up on Ray", n)
    return ReplicaEngine(ray, actors, shadow, health_s, retry_lost)
