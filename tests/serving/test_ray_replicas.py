"""Data-parallel serving on Ray (kiln/serving/ray_replicas.py): two mock-backend replicas as Ray actors.

- requests spread least-loaded over the replicas, and each answer equals the same request on a local engine;
- a replica killed (SIGKILL) mid-request: that request fails with ReplicaLost, an Unavailable (UNAVAILABLE /
  503, retryable), while a new request is served by the other replica; Ray restarts the killed actor (a new
  process) and the health check routes to it again;
- ServingCore serves over the replicas unchanged (what `kiln serve --data-parallel-size 2` does).
One Ray cluster for the module (num_cpus 3)."""
from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from kiln.engine.async_engine import AsyncEngine
from kiln.engine.sampling_params import SamplingParams
from kiln.serving.core import ServingCore
from kiln.serving.errors import Unavailable
from kiln.serving.ray_replicas import ReplicaLost, start_replicas
from tests.serving.ray_factory import slow_mock

ROOT = str(Path(__file__).resolve().parents[2])
KW = {"step_seconds": 0.02}


@pytest.fixture(scope="module")
def replicas():
    import ray
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT, "KILN_SKIP_WARMUP": "1"}})
    eng = start_replicas(2, KW, factory="tests.serving.ray_factory:slow_mock", health_s=0.2)
    yield eng
    eng.shutdown()
    ray.shutdown()


async def _tokens(engine, prompt, n, rid):
    out = None
    async for out in engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), rid):
        pass
    return out.outputs[0].token_ids


async def _local(prompts, n):
    ae = AsyncEngine(slow_mock())
    try:
        return await asyncio.gather(*(_tokens(ae, p, n, f"l{i}") for i, p in enumerate(prompts)))
    finally:
        ae.shutdown()


def test_least_loaded_routing_and_answers_equal_local(replicas):
    prompts = [[10 + i, 20, 30 + i] for i in range(4)]

    async def go():
        before = list(replicas.routed)
        got = await asyncio.gather(*(_tokens(replicas, p, 12, f"r{i}") for i, p in enumerate(prompts)))
        return got, [a - b for a, b in zip(replicas.routed, before)]
    got, routed = asyncio.run(go())
    assert routed == [2, 2]                     # 4 concurrent requests, 2 replicas: least-loaded alternates
    assert got == asyncio.run(_local(prompts, 12))


def test_killed_replica_fails_in_flight_retryably_and_comes_back(replicas):
    import ray

    async def go():
        await replicas.check_health()
        assert replicas.healthy == [True, True]
        long = asyncio.create_task(_tokens(replicas, [5, 6, 7], 2000, "long"))
        await asyncio.sleep(0.5)                                   # it is streaming on replica 0 now
        victim = replicas.pick() ^ 1                                # the busy one (the other is least-loaded)
        old_pid = (await replicas.actors[victim].ping.remote())["pid"]
        os.kill(old_pid, signal.SIGKILL)
        with pytest.raises(ReplicaLost) as lost:
            await long
        assert isinstance(lost.value, Unavailable)                 # UNAVAILABLE / 503: retry
        other = await _tokens(replicas, [1, 2, 3], 5, "during")     # served while the victim restarts
        for _ in range(600):                                        # Ray restarts the actor: a new process
            if (await replicas.check_health())[victim]:
                break
            await asyncio.sleep(0.2)
        new_pid = (await replicas.actors[victim].ping.remote())["pid"]
        replicas.inflight[victim ^ 1] += 100                        # make the restarted replica the least loaded
        try:
            after = await _tokens(replicas, [1, 2, 3], 5, "after")
        finally:
            replicas.inflight[victim ^ 1] -= 100
        return other, after, old_pid, new_pid
    other, after, old_pid, new_pid = asyncio.run(go())
    assert new_pid != old_pid and replicas.healthy == [True, True]
    assert other == after == asyncio.run(_local([[1, 2, 3]], 5))[0]
    assert replicas.lost >= 1
    del ray


def test_serving_core_over_replicas(replicas):
    async def go():
        core = ServingCore()
        core.attach(replicas, "mock")
        core.start_serving()
        req = core.submit([[10, 11, 12]], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
        return (await req.finals())[0].outputs[0].token_ids
    assert asyncio.run(go()) == asyncio.run(_local([[10, 11, 12]], 6))[0]


def test_without_ray_the_flag_says_how_to_get_it(monkeypatch, capsys):
    import sys

    from kiln.entrypoints.cli import main
    monkeypatch.setitem(sys.modules, "ray", None)               # `import ray` raises ImportError
    assert main(["serve", "--data-parallel-size", "2"]) == 2
    assert "pip install 'kiln[ray]'" in capsys.readouterr().err
