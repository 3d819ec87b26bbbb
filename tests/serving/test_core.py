"""The serving core on its own (no transport): admission in slots, prompt validation, auth, errors' fields,
deltas, usage, and a request's life through the core on the mock engine."""
from __future__ import annotations

import asyncio

import pytest

from kiln.engine.outputs import CompletionOutput, RequestOutput
from kiln.engine.sampling_params import SamplingParams
from kiln.serving import errors as E
from kiln.serving.admission import Admission
from kiln.serving.auth import ApiKey
from kiln.serving.core import ServingCore
from kiln.serving.deltas import DeltaTracker
from kiln.serving.health import State
from kiln.serving.options import ServingOptions
from kiln.serving.prompts import ROLES, PromptLimits, check_messages
from kiln.serving.usage import Usage
from tests.serving.engines import mock_async_engine


def test_admission_counts_slots_at_arrival():
    a = Admission(max_running=4, max_queued=2)           # capacity 6
    first = a.acquire(4)                                 # n=4: four slots
    a.acquire(2)
    with pytest.raises(E.Overloaded, match="max-queued"):
        a.acquire(1)
    first.release()
    first.release()                                      # idempotent
    assert a.used == 2
    a.acquire(4)
    with pytest.raises(E.InvalidRequest) as e:           # can never fit: not a retryable overload
        a.acquire(7)
    assert e.value.field == "n"
    unbounded = Admission(max_running=1, max_queued=None)
    unbounded.acquire(1000)
    assert unbounded.used == 1000 and unbounded.capacity is None


def test_chat_roles_and_limits_name_the_field():
    ok = [{"role": r, "content": "x"} for r in ROLES]
    assert check_messages(ok) == ok
    with pytest.raises(E.InvalidRequest) as e:
        check_messages([{"role": "user", "content": "hi"}, {"role": "bogus", "content": "x"}])
    assert e.value.field == "messages[1].role" and "'bogus'" in e.value.message and "system" in e.value.message
    with pytest.raises(E.InvalidRequest) as e:
        check_messages([{"role": "user", "content": 5}])
    assert e.value.field == "messages[0].content"
    limits = PromptLimits(max_messages=2, max_message_chars=10, max_prompt_chars=15)
    with pytest.raises(E.InvalidRequest) as e:
        check_messages([{"role": "user", "content": "a"}] * 3, limits)
    assert e.value.field == "messages" and "limit is 2" in e.value.message
    with pytest.raises(E.InvalidRequest) as e:
        check_messages([{"role": "user", "content": "a" * 11}], limits)
    assert e.value.field == "messages[0].content" and "limit is 10" in e.value.message
    with pytest.raises(E.InvalidRequest) as e:
        check_messages([{"role": "user", "content": "a" * 8}] * 2, limits)
    assert e.value.field == "messages" and "16 characters" in e.value.message
    for bad in ([], None, "hi", [{"content": "no role"}]):
        with pytest.raises(E.InvalidRequest):
            check_messages(bad)


def test_api_key_and_fields():
    key = ApiKey("s3cret")
    key.check("Bearer s3cret")
    key.check(b"Bearer s3cret")
    for bad in (None, "", "Bearer wrong", "s3cret", "Bearer s3cret "):
        with pytest.raises(E.Unauthenticated):
            key.check(bad)
    assert E.field_of("max_tokens must be at least 1, got 0.") == "max_tokens"
    assert E.field_of("prompt is 600 tokens; max_model_len is 512") == "prompt"
    assert E.field_of("prompt is empty", chat=True) == "messages"
    assert E.field_of("prompt_token_ids holds 9999, outside the vocabulary") == "prompt"
    assert E.field_of("the engine is still warming up") is None
    assert "request r-1" in E.Internal("engine stopped", "r-1").message


def test_deltas_and_usage():
    t = DeltaTracker()
    c = CompletionOutput(0, "ab", [1, 2])
    d = t.delta(0, c)
    assert (d.text, d.token_ids, d.first, d.finishing) == ("ab", [1, 2], True, False)
    c = CompletionOutput(0, "abcd", [1, 2, 3], finish_reason="stop")
    d = t.delta(0, c)
    assert (d.text, d.token_ids, d.first, d.finishing, d.text_offset) == ("cd", [3], False, True, 2)
    assert t.delta(0, c).empty
    outs = [RequestOutput("a", None, [1, 2, 3], [CompletionOutput(0, "", [4]), CompletionOutput(1, "", [5, 6])],
                          True, num_cached_tokens=2),
            RequestOutput("b", None, [1], [CompletionOutput(0, "", [7])], True)]
    u = Usage.of(outs)
    assert (u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens, u.total_tokens) == (4, 4, 2, 8)
    assert u.openai() == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}


def test_a_request_through_the_core():
    """submit -> outputs on the mock engine: validation before admission, slots and in-flight entry held while it
    runs and released at its end; a repeated client id is a Conflict; draining refuses new requests."""
    async def main():
        core = ServingCore(ServingOptions(max_queued=1))
        engine = mock_async_engine(on_death=core.engine_died, max_num_seqs=2)
        try:
            with pytest.raises(E.Unavailable, match="warming up"):
                core.submit(["hi"], SamplingParams())
            core.attach(engine, "mock")
            await core.warmup()
            assert core.health.state is State.SERVING and core.model_name == "mock"
            with pytest.raises(E.InvalidRequest) as e:
                core.submit([[{"role": "bogus", "content": "x"}]], SamplingParams())
            assert e.value.field == "messages[0].role"
            with pytest.raises(E.InvalidRequest) as e:
                core.submit([[1] * 300], SamplingParams())
            assert e.value.field == "prompt" and "max_model_len" in e.value.message
            params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, n=2)
            req = core.submit(["hello", [5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                              request_id="r1")
            assert core.admission.used == 2 and "r1" in core.inflight and req.engine_ids == ["r1-0", "r1-1"]
            with pytest.raises(E.Conflict):
                core.submit(["again"], params, request_id="r1")
            with pytest.raises(E.Overloaded):              # 2 + 2 > max_num_seqs 2 + max_queued 1
                core.submit(["x"], params)
            finals = await req.finals()
            assert sorted(finals) == [0, 1] and all(len(o.outputs[0].token_ids) == 3 for o in finals.values())
            assert core.admission.used == 0 and len(core.inflight) == 0
            never = core.submit(["x"], params)              # admitted, never iterated: close() frees it
            assert core.admission.used == 2
            never.close()
            assert core.admission.used == 0 and len(core.inflight) == 0
            await core.drain(0)
            with pytest.raises(E.Unavailable, match="draining"):
                core.submit(["x"], params)
        finally:
            engine.shutdown()
    asyncio.run(asyncio.wait_for(main(), 60))


def test_engine_errors_on_a_stream_become_kiln_errors():
    """What the engine raises on a request's stream: ValueError -> InvalidRequest naming the field, an engine that
    stopped or any other failure -> Internal carrying the request id, a ServingError (a lost Ray replica's Unavailable)
as it is, retryable; the slots are released either way."""
    from kiln.engine.async_engine import EngineDeadError

    class Failing:
        def __init__(self, inner, error):
            self.inner, self.error_to_raise = inner, error

        def __getattr__(self, name):
            return getattr(self.inner, name)

        async def generate(self, ids, params, request_id=None):
            raise self.error_to_raise
            yield

    async def main():
        real = mock_async_engine()
        try:
            for error, kind, needle in [(ValueError("max_tokens must be at least 1"), E.InvalidRequest, "max_tokens"),
                                        (EngineDeadError("engine stopped: boom"), E.Internal, "request r"),
                                        (RuntimeError("step failed"), E.Internal, "RuntimeError: step failed"),
                                        (E.Unavailable("replica 1 died"), E.Unavailable, "replica 1 died")]:
                core = ServingCore()
                core.attach(Failing(real, error))
                core.start_serving()
                with pytest.raises(kind) as e:
                    await core.submit(["hi"], SamplingParams(), request_id="r").finals()
                assert needle in e.value.message
                assert core.admission.used == 0 and len(core.inflight) == 0
        finally:
            real.shutdown()
    asyncio.run(asyncio.wait_for(main(), 60))
