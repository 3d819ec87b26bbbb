"""AsyncEngine on the mock runner: each error reaches the stream it concerns, and a dead engine fails every
stream (pending and new) instead of hanging it."""
from __future__ import annotations

import asyncio
import threading

import pytest

from kiln.engine.async_engine import AsyncEngine, EngineDeadError, StepError
from kiln.engine.sampling_params import SamplingParams
from tests.engine.test_faults import GREEDY, PROMPTS, expected, fault_for
from tests.mock_engine import mock_engine

TIMEOUT = 20.0     # no test here should come near it: a hang is the failure this file guards against


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


async def collect(ae: AsyncEngine, prompt, params=GREEDY, rid=None):
    """The final output, or the exception the stream raised."""
    out = None
    try:
        async for out in ae.generate(prompt, params, rid):
            pass
    except Exception as e:  # noqa: BLE001 - the test looks at which
        return e
    return out


@pytest.fixture
def ae():
    deaths: list[BaseException] = []
    engine = AsyncEngine(mock_engine(), on_death=deaths.append)
    engine.deaths = deaths
    yield engine
    engine.shutdown()


async def wait_idle(ae: AsyncEngine) -> None:
    while ae.engine.has_unfinished() or ae.num_pending:
        await asyncio.sleep(0.005)


def test_a_step_error_reaches_only_its_stream(ae) -> None:
    ae.engine.runner.fault = fault_for("bad")

    async def main():
        rids = ["a", "bad", "b", "c"]
        outs = await asyncio.gather(*(collect(ae, PROMPTS[r], rid=r) for r in rids))
        await wait_idle(ae)
        return dict(zip(rids, outs))

    outs = run(main())
    err = outs.pop("bad")
    assert isinstance(err, StepError) and err.request_ids == ("bad",) and "injected fault" in str(err)
    for rid, out in outs.items():
        assert out.finished and out.outputs[0].token_ids == expected(PROMPTS[rid]), rid
    assert ae.error is None and not ae.deaths
    assert ae.engine.scheduler.kv.stats()["blocks_used"] == 0
    ae.engine.runner.fault = None
    assert run(collect(ae, PROMPTS["bad"], rid="bad")).outputs[0].token_ids == expected(PROMPTS["bad"])


def test_each_failed_stream_sees_only_its_own_request_id(ae) -> None:
    fail_1, fail_2 = fault_for("x1"), fault_for("x2")

    def fault(step):
        fail_1(step)
        fail_2(step)

    ae.engine.runner.fault = fault

    async def main():
        return await asyncio.gather(collect(ae, [1, 2], rid="x1"), collect(ae, [3, 4], rid="x2"),
                                    collect(ae, [5, 6], rid="ok"))

    e1, e2, ok = run(main())
    assert e1.request_ids == ("x1",) and "x2" not in str(e1)
    assert e2.request_ids == ("x2",) and "x1" not in str(e2)
    assert ok.outputs[0].token_ids == expected([5, 6])


def test_invalid_input_is_a_value_error_and_the_engine_serves_on(ae) -> None:
    bad = SamplingParams(temperature=0.0)
    bad.temperature = float("nan")

    async def main():
        with pytest.raises(ValueError, match="^temperature"):
            await collect_raising(ae, [1, 2], bad)
        with pytest.raises(ValueError, match="^prompt_token_ids"):
            await collect_raising(ae, [1, 10**20])
        with pytest.raises(ValueError, match="^prompt_token_ids must hold integers"):
            await collect_raising(ae, [1, 2.5])
        return await collect(ae, PROMPTS["a"])

    assert run(main()).outputs[0].token_ids == expected(PROMPTS["a"])


async def collect_raising(ae, prompt, params=GREEDY):
    async for _ in ae.generate(prompt, params):
        pass


def test_a_dead_engine_fails_pending_and_new_streams(ae) -> None:
    ae.engine.runner.step_seconds = 0.002
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        started = asyncio.Event()
        seen: set[str] = set()

        async def stream(rid):
            try:
                async for _ in ae.generate(PROMPTS["a"], long, rid):
                    seen.add(rid)
                    if len(seen) == 3:
                        started.set()
            except Exception as e:  # noqa: BLE001
                return e
            return None

        tasks = [asyncio.create_task(stream(r)) for r in ("s1", "s2", "s3")]
        await started.wait()

        def broken():
            raise AssertionError("free list corrupted")

        ae.engine.scheduler.schedule = broken
        return await asyncio.gather(*tasks)

    errors = run(main())
    assert all(isinstance(e, EngineDeadError) for e in errors), errors
    assert len({id(e) for e in errors}) == 3                  # one exception object per stream
    assert "free list corrupted" in str(errors[0])
    assert len(ae.deaths) == 1 and ae.error is ae.deaths[0] and isinstance(ae.error, EngineDeadError)
    with pytest.raises(EngineDeadError):
        run(collect_raising(ae, PROMPTS["a"]))
    assert ae.num_pending == 0


def test_generate_racing_the_death_does_not_hang(ae) -> None:
    """A stream registered just after the engine thread failed the pending ones must still be answered."""
    gate = threading.Event()

    def step():
        gate.wait(TIMEOUT)
        raise RuntimeError("engine bug")

    ae.engine.step = step
    real_validate = ae.engine.validate

    def validate(ids, params):        # runs in generate() after its first liveness check, before registering
        real_validate(ids, params)
        if ids == PROMPTS["b"]:
            gate.set()
            ae._thread.join(TIMEOUT)   # the thread has died and failed every stream it knew of
            assert not ae._thread.is_alive()

    ae.engine.validate = validate

    async def main():
        first = asyncio.create_task(collect(ae, PROMPTS["a"]))
        while not ae.engine.has_unfinished():
            await asyncio.sleep(0.005)
        late = await collect(ae, PROMPTS["b"])
        return await first, late, await collect(ae, PROMPTS["c"])

    results = run(main())
    assert all(isinstance(r, EngineDeadError) for r in results), results
    assert len(ae.deaths) == 1 and isinstance(ae.error, RuntimeError) and ae.num_pending == 0


def test_shutdown_fails_pending_streams_and_refuses_new_ones() -> None:
    ae = AsyncEngine(mock_engine())
    ae.engine.runner.step_seconds = 0.002
    long = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        got_one = asyncio.Event()

        async def stream():
            try:
                async for _ in ae.generate(PROMPTS["a"], long):
                    got_one.set()
            except Exception as e:  # noqa: BLE001
                return e

        task = asyncio.create_task(stream())
        await got_one.wait()
        await asyncio.to_thread(ae.shutdown)
        return await task

    err = run(main())
    assert isinstance(err, EngineDeadError) and "shut down" in str(err)
    assert ae.error is None                                    # a shutdown is not a death
    with pytest.raises(EngineDeadError, match="shut down"):
        run(collect_raising(ae, PROMPTS["a"]))


def test_a_closed_event_loop_does_not_kill_the_engine(ae) -> None:
    gone = asyncio.new_event_loop()
    gone.close()
    ae._streams["ghost"] = (gone, asyncio.Queue())             # a caller whose loop closed mid-stream
    ae._inbox.put((ae._add, "ghost", None, PROMPTS["b"], GREEDY))
    out = run(collect(ae, PROMPTS["a"]))
    assert out.outputs[0].token_ids == expected(PROMPTS["a"])
    run(wait_idle(ae))
    assert ae.error is None and "ghost" not in ae._streams
    assert ae.engine.scheduler.kv.stats()["blocks_used"] == 0


def test_failing_stats_do_not_kill_the_engine(ae) -> None:
    def broken():
        raise AttributeError("no such counter")

    ae.engine.stats = broken
    out = run(collect(ae, PROMPTS["c"]))
    assert out.outputs[0].token_ids == expected(PROMPTS["c"]) and ae.error is None


def test_a_request_that_fails_half_added_is_cleaned_up(ae, monkeypatch) -> None:
    import kiln.engine.llm_engine as llm_engine
    real = llm_engine.IncrementalDetokenizer
    made = []

    def detokenizer(*args, **kwargs):           # the second sample's detokenizer fails: one child is queued
        made.append(1)
        if len(made) == 2:
            raise RuntimeError("half added")
        return real(*args, **kwargs)

    monkeypatch.setattr(llm_engine, "IncrementalDetokenizer", detokenizer)
    ae.engine.runner.step_seconds = 0.002
    err = run(collect(ae, [1, 2, 3], SamplingParams(temperature=0.5, n=3, max_tokens=200, ignore_eos=True), "half"))
    assert isinstance(err, StepError) and err.request_ids == ("half",) and "half added" in str(err)
    assert "half#0" not in ae.engine.scheduler.requests        # discarded before the error was delivered
    monkeypatch.setattr(llm_engine, "IncrementalDetokenizer", real)
    assert run(collect(ae, PROMPTS["a"])).outputs[0].token_ids == expected(PROMPTS["a"])
    run(wait_idle(ae))
    assert not ae.engine.scheduler.requests and ae.engine.scheduler.kv.stats()["blocks_used"] == 0
    assert ae.error is None
