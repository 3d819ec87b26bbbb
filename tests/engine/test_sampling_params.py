"""SamplingParams: vLLM defaults, normalisation and validation messages; hostile values at the engine's edge."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kiln.backends.mock import next_token
from kiln.engine.sampling_params import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
)
from tests.mock_engine import mock_engine
from tests.tiny import VOCAB


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.seed) == (16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.logit_bias is None
    assert not p.ignore_eos and not p.include_stop_str_in_output and p.skip_special_tokens
    assert not p.greedy and not p.has_penalties


def test_normalisation() -> None:
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=(5, 6), logit_bias={"7": 1})
    assert p.top_k == 0
    assert p.stop == ["###"]
    assert p.stop_token_ids == [5, 6]
    assert p.logit_bias == {7: 1.0}


def test_greedy() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.5, top_k=2).greedy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be at least 1, got 0"),
        ({"temperature": -1.0}, "temperature must be non-negative, got -1.0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"top_k": -2}, "top_k must be -1 or 0 \\(disable\\), or at least 1, got -2"),
        ({"min_p": 1.5}, r"min_p must be in \[0, 1\], got 1.5"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be greater than zero, got 0.0"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\], got 2.5"),
        ({"frequency_penalty": -3.0}, r"frequency_penalty must be in \[-2, 2\], got -3.0"),
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
        ({"min_tokens": -1}, "min_tokens must be greater than or equal to 0, got -1"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be <= max_tokens=4, got 5"),
        ({"logprobs": MAX_LOGPROBS + 1}, r"logprobs must be in \[0, 20\], got 21"),
        ({"logprobs": -1}, r"logprobs must be in \[0, 20\], got -1"),
        ({"stop": ["ok", ""]}, "stop cannot contain an empty string"),
        ({"logit_bias": {3: 101.0}}, r"logit_bias values must be in \[-100, 100\], got 101.0"),
    ],
)
def test_validation_messages(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_limits_are_inclusive() -> None:
    SamplingParams(
        temperature=0.0, top_p=1.0, min_p=1.0, presence_penalty=-2.0, frequency_penalty=2.0,
        logprobs=MAX_LOGPROBS, max_tokens=1, min_tokens=1, logit_bias={0: -100.0, 1: 100.0},
    )
    SamplingParams(max_tokens=None, min_tokens=1000)  # no upper limit: any min_tokens is fine


def test_validate_for_vocab() -> None:
    SamplingParams(logit_bias={0: 1.0, 99: 1.0}, stop_token_ids=[99]).validate_for_vocab(100)
    with pytest.raises(ValueError, match="logit_bias token id 100"):
        SamplingParams(logit_bias={100: 1.0}).validate_for_vocab(100)
    with pytest.raises(ValueError, match="stop_token_ids contains -1"):
        SamplingParams(stop_token_ids=[-1]).validate_for_vocab(100)


# -- hostile values: every field, every way a client can get it wrong ---------------------------------------------
FLOAT_FIELDS = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]
INT_FIELDS = ["n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs"]


def _kwargs(field: str, value) -> dict:
    """SamplingParams kwargs putting `value` into `field`; the list and dict fields take it as an element."""
    if field == "logit_bias values":
        return {"logit_bias": {1: value}}
    if field == "logit_bias keys":
        return {"logit_bias": {value: 1.0}}
    if field == "stop_token_ids":
        return {"stop_token_ids": [value]}
    return {field: value}


def _rejects(kwargs: dict, field: str) -> str:
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    message = str(e.value)
    assert message.split()[0] == field.split()[0], message      # the HTTP server's `param` is the first word
    assert message.startswith(field) and len(message) < 200, message
    return message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400, -(10**400)],
                         ids=["nan", "inf", "-inf", "1e400", "-1e400"])
@pytest.mark.parametrize("field", FLOAT_FIELDS + ["logit_bias values"])
def test_non_finite_floats_are_rejected(field: str, value) -> None:
    assert "finite number" in _rejects(_kwargs(field, value), field)


@pytest.mark.parametrize("value", [10**20, -(10**20), 2**64, 10**5000], ids=["1e20", "-1e20", "2^64", "1e5000"])
@pytest.mark.parametrize("field", INT_FIELDS + ["stop_token_ids", "logit_bias keys"])
def test_integers_beyond_64_bits_are_rejected(field: str, value) -> None:
    _rejects(_kwargs(field, value), field)


@pytest.mark.parametrize("value", [True, False, "3", "", 2.5, math.nan, math.inf, None, [1], {"a": 1}, object()])
@pytest.mark.parametrize("field", INT_FIELDS + ["stop_token_ids"])
def test_ints_of_the_wrong_type_are_rejected(field: str, value) -> None:
    if value is None and field in ("seed", "max_tokens", "logprobs"):
        assert getattr(SamplingParams(**{field: None}), field) is None     # None is these fields' "unset"
        return
    _rejects(_kwargs(field, value), field)


@pytest.mark.parametrize("key", [True, 2.5, math.nan, None, "", "3.0", "abc", " 3", object()])
def test_logit_bias_keys_of_the_wrong_type_are_rejected(key) -> None:
    _rejects(_kwargs("logit_bias keys", key), "logit_bias keys")


@pytest.mark.parametrize("value", [True, "0.5", None, [0.5], {"a": 1}])
@pytest.mark.parametrize("field", FLOAT_FIELDS + ["logit_bias values"])
def test_floats_of_the_wrong_type_are_rejected(field: str, value) -> None:
    _rejects(_kwargs(field, value), field)


@pytest.mark.parametrize("field", ["ignore_eos", "include_stop_str_in_output", "skip_special_tokens"])
@pytest.mark.parametrize("value", [1, "true", None])
def test_flags_must_be_bools(field: str, value) -> None:
    _rejects({field: value}, field)


def test_integral_numbers_are_normalised_to_plain_python_values() -> None:
    p = SamplingParams(n=2.0, top_k=np.int64(5), seed=np.uint32(7), max_tokens=8.0, temperature=1,
                       top_p=np.float32(0.5), logit_bias={np.int32(4): 1, "-1": 2.0}, stop_token_ids=[np.int16(3)])
    assert (p.n, p.top_k, p.seed, p.max_tokens) == (2, 5, 7, 8)
    assert all(type(v) is int for v in (p.n, p.top_k, p.seed, p.max_tokens, *p.stop_token_ids, *p.logit_bias))
    assert all(type(v) is float for v in (p.temperature, p.top_p, *p.logit_bias.values()))
    assert p.logit_bias == {4: 1.0, -1: 2.0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": MAX_N + 1}, rf"n must be at most {MAX_N}, got {MAX_N + 1}"),
        ({"n": 100000}, rf"n must be at most {MAX_N}, got 100000"),
        ({"temperature": 2.5}, r"temperature must be in \[0, 2\], got 2.5"),
        ({"top_k": 99999999999999999999}, r"top_k must be at most 2147483647, got 99999999999999999999"),
        ({"repetition_penalty": 1e5}, r"repetition_penalty must be in \[0.0001, 10000\], got 100000.0"),
        ({"repetition_penalty": 1e-300}, r"repetition_penalty must be in \[0.0001, 10000\]"),
        ({"stop": ["a", "b", "c", "d", "e"]}, rf"stop may hold at most {MAX_STOP_STRINGS} strings, got 5"),
        ({"stop": "x" * (MAX_STOP_STRING_CHARS + 1)},
         rf"stop strings must be at most {MAX_STOP_STRING_CHARS} characters, got one of {MAX_STOP_STRING_CHARS + 1}"),
        ({"stop": ["ok", 3]}, "stop must be a string or a list of strings, got"),
        ({"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))},
         rf"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, got {MAX_STOP_TOKEN_IDS + 1}"),
        ({"stop_token_ids": 5}, "stop_token_ids must be a list of token ids, got 5"),
        ({"logit_bias": [1, 2]}, "logit_bias must be an object of token id -> bias"),
        ({"logit_bias": {"seven": 1.0}}, "logit_bias keys must be token ids, got 'seven'"),
        ({"logit_bias": {"1" * 5000: 1.0}}, "logit_bias keys must be token ids, got '1111"),
    ],
)
def test_caps(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_caps_are_inclusive() -> None:
    SamplingParams(n=MAX_N, temperature=2.0, top_k=2**31 - 1, repetition_penalty=1e4, stop=["abcd"] * 4,
                   stop_token_ids=list(range(MAX_STOP_TOKEN_IDS)), seed=2**63 - 1, max_tokens=2**63 - 1)
    SamplingParams(repetition_penalty=1e-4, seed=-(2**63), min_tokens=2**63 - 1, max_tokens=None,
                   stop="x" * MAX_STOP_STRING_CHARS)


def test_stop_token_ids_keep_their_first_order_without_duplicates() -> None:
    assert SamplingParams(stop_token_ids=[42, 7, 42, 9, 7]).stop_token_ids == [42, 7, 9]


def test_verify_catches_fields_set_after_construction() -> None:
    p = SamplingParams()
    p.temperature = math.nan
    with pytest.raises(ValueError, match="^temperature must be a finite number"):
        p.verify()
    p.temperature, p.top_k = 0.5, 10**20
    with pytest.raises(ValueError, match="^top_k must be at most"):
        p.verify()


def test_validate_for_vocab_with_huge_ids() -> None:
    with pytest.raises(ValueError, match="^logit_bias token id 9223372036854775807 is out of vocabulary"):
        SamplingParams(logit_bias={2**63 - 1: 1.0}).validate_for_vocab(100)
    with pytest.raises(ValueError, match="^stop_token_ids contains -9223372036854775808, out of vocabulary"):
        SamplingParams(stop_token_ids=[-(2**63)]).validate_for_vocab(100)


# -- the same edge through the engine: rejected before anything is queued, and the engine serves on ---------------
def _generate(engine, prompt: list[int], params: SamplingParams):
    rid = engine.add_request(prompt, params)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished and out.request_id == rid:
                return out
    raise AssertionError("request never finished")


@pytest.mark.parametrize(
    ("prompt", "mutate", "field"),
    [
        ([1, 2], {"temperature": math.nan}, "temperature"),
        ([1, 2], {"repetition_penalty": math.inf}, "repetition_penalty"),
        ([1, 2], {"top_k": 99999999999999999999}, "top_k"),
        ([1, 2], {"n": 100000}, "n"),
        ([1, 2], {"logit_bias": {VOCAB: 1.0}}, "logit_bias"),
        ([1, 2], {"logit_bias": {10**20: 1.0}}, "logit_bias"),
        ([1, 2], {"stop_token_ids": [VOCAB]}, "stop_token_ids"),
        ([1, 2], {"stop_token_ids": [10**20]}, "stop_token_ids"),
        ([1, VOCAB], {}, "prompt_token_ids"),
        ([1, 10**20], {}, "prompt_token_ids"),
        ([1, -1], {}, "prompt_token_ids"),
        ([], {}, "prompt"),
        ([1] * 256, {}, "prompt"),
    ],
)
def test_engine_rejects_then_serves(prompt: list[int], mutate: dict, field: str) -> None:
    engine = mock_engine()
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    for k, v in mutate.items():        # set after construction: the engine must check again
        setattr(params, k, v)
    with pytest.raises(ValueError) as e:
        engine.add_request(prompt, params)
    assert str(e.value).split()[0] == field, str(e.value)
    assert not engine.has_unfinished() and engine.scheduler.kv.stats()["blocks_used"] == 0
    out = _generate(engine, [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert out.outputs[0].token_ids == [next_token(7, 2, VOCAB), next_token(next_token(7, 2, VOCAB), 3, VOCAB),
                                        next_token(next_token(next_token(7, 2, VOCAB), 3, VOCAB), 4, VOCAB)]


@pytest.mark.parametrize("max_tokens", [None, 100, 2**63 - 1])
def test_max_tokens_beyond_the_context_finishes_with_length(max_tokens) -> None:
    """Decision (vLLM's get_max_tokens): clamp to the context, finish with `length`, no error."""
    engine = mock_engine(max_model_len=32)
    prompt = list(range(1, 21))                                  # 20 tokens: 12 left in the context
    out = _generate(engine, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 32 - 20
    assert engine.scheduler.kv.stats()["blocks_used"] == 0
