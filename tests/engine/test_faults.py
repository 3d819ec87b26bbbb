"""Fault isolation in LLMEngine.step on the mock runner: a fault fails the requests it touches, frees their
blocks and the engine serves the rest with the hand-computed tokens; a runner that fails every step kills it."""
from __future__ import annotations

import logging

import pytest

from kiln.backends.base import StepResult
from kiln.backends.mock import next_token
from kiln.engine.errors import EngineDeadError, EngineError, StepError
from kiln.engine.llm_engine import MAX_EXECUTES_PER_STEP, MAX_FAILED_STEPS_IN_A_ROW
from kiln.engine.sampling_params import SamplingParams
from tests.mock_engine import mock_engine
from tests.tiny import VOCAB

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
PROMPTS = {"a": [5, 6, 7], "b": [40, 41], "bad": [9, 9, 9, 9], "c": [200], "d": list(range(60, 70))}


def expected(prompt: list[int], n: int = 5) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        toks.append(next_token(toks[-1], len(toks) - 1, VOCAB))
    return toks[len(prompt):]


def drive(engine, max_steps: int = 1000) -> tuple[dict, dict]:
    """Step until idle: (finished outputs by request id, StepErrors by request id)."""
    done, errors = {}, {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return done, errors
        try:
            outs = engine.step()
        except StepError as e:
            for rid in e.request_ids:
                assert rid not in errors, f"{rid} failed twice"
                errors[rid] = e
            outs = e.outputs
        done.update({o.request_id: o for o in outs if o.finished})
    raise AssertionError("engine never went idle")


def fault_for(request_id: str):
    """A runner.fault raising for every step (or retried part of one) holding a row of `request_id`."""
    def fault(step):
        if any(r.request_id == request_id or r.request_id.startswith(request_id + "#") for r in step.rows):
            raise RuntimeError(f"injected fault for {request_id}")
    return fault


def add_all(engine, prompts=PROMPTS, params=GREEDY) -> None:
    for rid, prompt in prompts.items():
        engine.add_request(prompt, params, request_id=rid)


def assert_clean(engine) -> None:
    assert not engine.has_unfinished()
    assert engine.scheduler.kv.stats()["blocks_used"] == 0
    assert not engine.scheduler.requests and not engine.scheduler.running and not engine.scheduler.waiting


def test_a_failing_request_fails_alone_and_the_others_finish(caplog) -> None:
    engine = mock_engine()
    engine.runner.fault = fault_for("bad")
    add_all(engine)
    with caplog.at_level(logging.ERROR, logger="kiln.engine.llm_engine"):
        done, errors = drive(engine)
    assert set(errors) == {"bad"} and errors["bad"].request_ids == ("bad",)
    assert isinstance(errors["bad"].cause, RuntimeError) and "injected fault for bad" in str(errors["bad"])
    assert isinstance(errors["bad"], EngineError) and not isinstance(errors["bad"], ValueError)
    assert set(done) == set(PROMPTS) - {"bad"}
    for rid, out in done.items():
        assert out.outputs[0].token_ids == expected(PROMPTS[rid]), rid
        assert out.outputs[0].finish_reason == "length"
    assert_clean(engine)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "bad" in tracebacks[0].getMessage()
    # the engine goes on serving, the faulty request's id included once the fault is gone
    engine.runner.fault = None
    engine.add_request(PROMPTS["bad"], GREEDY, request_id="bad")
    done, errors = drive(engine)
    assert not errors and done["bad"].outputs[0].token_ids == expected(PROMPTS["bad"])
    assert_clean(engine)


def test_the_fault_is_found_with_few_retries() -> None:
    engine = mock_engine()
    prompts = {f"r{i}": [i + 1, i + 2] for i in range(8)}
    add_all(engine, prompts)
    engine.step()                                   # one prefill step holding all 8
    assert len(engine.runner.steps[-1].rows) == 8
    engine.runner.fault = fault_for("r5")
    calls = []
    real = engine.runner.execute
    engine.runner.execute = lambda step: calls.append(len(step.rows)) or real(step)
    with pytest.raises(StepError) as e:
        engine.step()                               # the 8-row decode step fails, halves are retried
    assert e.value.request_ids == ("r5",)
    assert len(e.value.outputs) == 7
    assert calls == [8, 4, 4, 2, 1, 1, 2]          # the whole step, then halves down to r5 alone
    engine.runner.fault = None
    done, errors = drive(engine)
    assert not errors and set(done) == set(prompts) - {"r5"}
    for rid, out in done.items():
        assert out.outputs[0].token_ids == expected(prompts[rid])
    assert_clean(engine)


def test_all_samples_of_a_parent_fail_together() -> None:
    engine = mock_engine()
    engine.runner.fault = fault_for("bad#1")
    sampled = SamplingParams(temperature=0.8, seed=3, n=3, max_tokens=4, ignore_eos=True)
    engine.add_request([1, 2, 3], sampled, request_id="bad")
    engine.add_request([1, 2, 3], sampled, request_id="good")
    add_all(engine, {"a": PROMPTS["a"]})
    done, errors = drive(engine)
    assert set(errors) == {"bad"} and set(done) == {"good", "a"}
    assert len(done["good"].outputs) == 3 and all(len(c.token_ids) == 4 for c in done["good"].outputs)
    assert done["a"].outputs[0].token_ids == expected(PROMPTS["a"])
    assert_clean(engine)


def test_a_fault_in_a_prefill_chunk_fails_that_request() -> None:
    engine = mock_engine(max_num_batched_tokens=32)
    long = list(range(1, 101))                      # 100 tokens: prefilled in chunks

    def fault(step):                                # only the chunks before the last one (sample=False)
        if any(r.request_id == "long" and not r.sample for r in step.rows):
            raise RuntimeError("chunk")

    engine.runner.fault = fault
    engine.add_request(long, GREEDY, request_id="long")
    add_all(engine, {"a": PROMPTS["a"], "c": PROMPTS["c"]})
    done, errors = drive(engine)
    assert set(errors) == {"long"} and set(done) == {"a", "c"}
    assert done["c"].outputs[0].token_ids == expected(PROMPTS["c"])
    assert_clean(engine)


def test_a_token_outside_the_vocabulary_fails_only_its_request() -> None:
    engine = mock_engine()
    real = engine.runner.execute

    def execute(step):
        res = real(step)
        tokens = [VOCAB if r.request_id == "bad" else t for r, t in zip(step.rows, res.tokens)]
        return StepResult(tokens, res.logprobs, res.top)

    engine.runner.execute = execute
    add_all(engine)
    done, errors = drive(engine)
    assert set(errors) == {"bad"} and "outside the vocabulary" in str(errors["bad"])
    assert set(done) == set(PROMPTS) - {"bad"}
    assert all(o.outputs[0].token_ids == expected(PROMPTS[r]) for r, o in done.items())
    assert_clean(engine)


def test_a_result_of_the_wrong_length_is_retried_in_parts() -> None:
    engine = mock_engine()
    real = engine.runner.execute

    def execute(step):
        res = real(step)
        return StepResult(res.tokens[:1], res.logprobs[:1], None) if len(step.rows) > 2 else res

    engine.runner.execute = execute
    add_all(engine)
    done, errors = drive(engine)
    assert not errors and set(done) == set(PROMPTS)
    assert all(o.outputs[0].token_ids == expected(PROMPTS[r]) for r, o in done.items())
    assert_clean(engine)


def test_a_fault_after_the_runner_fails_only_that_request() -> None:
    engine = mock_engine()
    add_all(engine)
    engine.step()                                   # prefill: every request now has its detokenizer running

    def broken(ids):
        raise UnicodeError("detokenizer bug")

    engine._child_to_parent["bad"][1].detok.add_tokens = broken
    done, errors = drive(engine)
    assert set(errors) == {"bad"} and isinstance(errors["bad"].cause, UnicodeError)
    assert set(done) == set(PROMPTS) - {"bad"}
    assert all(o.outputs[0].token_ids == expected(PROMPTS[r]) for r, o in done.items())
    assert_clean(engine)


def test_poison_requests_between_good_steps_do_not_kill_the_engine() -> None:
    engine = mock_engine()
    for i in range(2 * MAX_FAILED_STEPS_IN_A_ROW):
        engine.runner.fault = fault_for("bad")
        engine.add_request(PROMPTS["bad"], GREEDY, request_id="bad")
        done, errors = drive(engine)
        assert set(errors) == {"bad"}
        engine.runner.fault = None
        engine.add_request(PROMPTS["a"], GREEDY, request_id=f"a{i}")
        done, errors = drive(engine)
        assert not errors and done[f"a{i}"].outputs[0].token_ids == expected(PROMPTS["a"])
    assert engine.dead is None
    assert_clean(engine)


def test_a_runner_failing_every_step_kills_the_engine() -> None:
    engine = mock_engine()

    def always(step):
        raise RuntimeError("device lost")

    engine.runner.fault = always
    for i in range(MAX_FAILED_STEPS_IN_A_ROW):
        engine.add_request(PROMPTS["a"], GREEDY, request_id=f"r{i}")
        if i < MAX_FAILED_STEPS_IN_A_ROW - 1:
            with pytest.raises(StepError):
                engine.step()
    with pytest.raises(EngineDeadError, match="every row of 3 steps in a row.*device lost") as e:
        engine.step()
    assert isinstance(e.value.__cause__, RuntimeError)
    assert engine.dead is not None and engine.scheduler.kv.stats()["blocks_used"] == 0
    with pytest.raises(EngineDeadError):
        engine.step()
    with pytest.raises(EngineDeadError):
        engine.add_request(PROMPTS["a"], GREEDY)
    with pytest.raises(EngineDeadError):
        engine.validate(PROMPTS["a"], GREEDY)


def test_a_broken_scheduler_kills_the_engine() -> None:
    engine = mock_engine()
    add_all(engine)

    def broken():
        raise AssertionError("block table out of sync")

    engine.scheduler.schedule = broken
    with pytest.raises(EngineDeadError, match="the scheduler failed: AssertionError: block table out of sync"):
        engine.step()
    assert engine.dead is not None
    with pytest.raises(EngineDeadError):
        engine.step()


def test_a_broken_runner_costs_a_bounded_number_of_calls_per_step() -> None:
    engine = mock_engine(max_num_seqs=64)
    add_all(engine, {f"r{i}": [i + 1] for i in range(64)})
    calls = []

    def always(step):
        calls.append(len(step.rows))
        raise RuntimeError("device lost")

    engine.runner.fault = always
    with pytest.raises(StepError) as e:
        engine.step()
    assert len(e.value.request_ids) == 64 and not e.value.outputs
    assert calls[0] == 64 and len(calls) == MAX_EXECUTES_PER_STEP     # not 2 * 64 - 1
    assert engine.scheduler.kv.stats()["blocks_used"] == 0
