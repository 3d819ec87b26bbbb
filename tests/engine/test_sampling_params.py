"""SamplingParams: vLLM defaults, normalisation and validation messages."""

from __future__ import annotations

import pytest

from kiln.engine.sampling_params import MAX_LOGPROBS, SamplingParams


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
