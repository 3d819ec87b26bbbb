"""Property: any JSON-ish value in any SamplingParams field is either a ValueError naming a field, or params the
engine runs to completion with every token inside the vocabulary (and the sampler kernel too).

Examples per property: KILN_FUZZ_EXAMPLES (default 200), e.g. `KILN_FUZZ_EXAMPLES=20000 pytest
tests/engine/test_fuzz_params.py` for a long run. No example database is written (database=None).
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kiln.engine.sampling_params import MAX_N, MAX_STOP_STRING_CHARS, SamplingParams
from tests.mock_engine import mock_engine
from tests.tiny import VOCAB

EXAMPLES = int(os.environ.get("KILN_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_MODEL_LEN = 48
FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]
# first words of the engine's own messages (SamplingParams' start with a field name)
ENGINE_WORDS = {"prompt", "prompt_token_ids", "logit_bias", "min_tokens", "stop_token_ids"}

_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**80), max_value=2**80)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
            | st.sampled_from([10**20, -(10**20), 2**63, 2**31, -1, 0, 1, 1e308, 5e-324, -0.0, "NaN", "1"]))
JSONISH = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=4) | st.integers(-3, VOCAB + 3), inner, max_size=4),
                       max_leaves=8)

# field -> (valid values, edge values that are mostly invalid)
_VALUES = {
    "n": (st.integers(1, 4) | st.just(2.0), st.sampled_from([0, -1, MAX_N, MAX_N + 1, 10**20])),
    "presence_penalty": (st.floats(-2.0, 2.0), st.sampled_from([2.5, -3.0, math.nan, math.inf])),
    "frequency_penalty": (st.floats(-2.0, 2.0), st.sampled_from([2.5, -3.0, math.nan, -math.inf])),
    "repetition_penalty": (st.floats(1e-4, 3.0), st.sampled_from([0.0, 1e-4, 1e4, 1e-300, 1e300, math.inf])),
    "temperature": (st.floats(0.0, 2.0), st.sampled_from([1e-6, 2.5, -1.0, math.inf, math.nan, 10**400])),
    "top_p": (st.floats(1e-6, 1.0), st.sampled_from([0.0, 1e-30, 1.5, math.nan])),
    "top_k": (st.integers(-1, VOCAB + 2), st.sampled_from([-2, 2**31 - 1, 2**31, 99999999999999999999])),
    "min_p": (st.floats(0.0, 1.0), st.sampled_from([1e-30, 1.0, -0.1, math.nan])),
    "seed": (st.none() | st.integers(-(2**63), 2**63 - 1), st.sampled_from([2**63, -(2**64), 10**20])),
    "stop": (st.none() | st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=4),
             st.sampled_from(["", ["a", ""], ["a"] * 5, "x" * (MAX_STOP_STRING_CHARS + 1)])),
    "stop_token_ids": (st.none() | st.lists(st.integers(0, VOCAB - 1), max_size=5),
                       st.sampled_from([[-1], [VOCAB], [10**20], list(range(200))])),
    "ignore_eos": (st.booleans(), st.sampled_from([0, 1, "true"])),
    "max_tokens": (st.none() | st.integers(1, MAX_MODEL_LEN + 5), st.sampled_from([0, -1, 2**63 - 1, 2**63])),
    "min_tokens": (st.integers(0, 4), st.sampled_from([-1, 50, 2**63])),
    "logprobs": (st.none() | st.integers(0, 20), st.sampled_from([-1, 21, True, 10**20])),
    "logit_bias": (st.none() | st.dictionaries(st.integers(0, VOCAB - 1) | st.integers(0, VOCAB - 1).map(str),
                                               st.floats(-100.0, 100.0), max_size=4),
                   st.sampled_from([{VOCAB: 1.0}, {-1: 1.0}, {"x": 1.0}, {1: math.nan}, {1: 101.0},
                                    {i: 1.0 for i in range(40)}, {10**20: 1.0}])),
    "include_stop_str_in_output": (st.booleans(), st.sampled_from([None, 1])),
    "skip_special_tokens": (st.booleans(), st.sampled_from([None, "no"])),
    "structured_outputs": (st.none() | st.builds(lambda c: {"choice": c},
                                                 st.lists(st.text("abc", min_size=1, max_size=3), min_size=1,
                                                          max_size=3))
                           | st.sampled_from([{"regex": "[ab]{1,3}"}, {"json": {"type": "boolean"}}]),
                           st.sampled_from([{}, {"regex": 5}, "x", {"json": "{bad"}, {"regex": "(("},
                                            {"json": {"type": "nope"}}, {"choice": []}, {"bogus": 1}])),
    "prompt_logprobs": (st.none() | st.integers(0, 20), st.sampled_from([-1, 21, True, 10**20])),
}
VALID = {f: valid for f, (valid, _) in _VALUES.items()}
HOSTILE = {f: edge | JSONISH for f, (_, edge) in _VALUES.items()}

@st.composite
def sampling_kwargs(draw) -> dict:
    """Valid values for some fields, and an edge value or arbitrary JSON-ish junk in up to two of them."""
    kwargs = draw(st.fixed_dictionaries({}, optional=VALID))
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=2, unique=True)):
        kwargs[field] = draw(HOSTILE[field])
    return kwargs


KWARGS = sampling_kwargs()
FLOAT_FIELDS = ["presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p"]
# the sampler's question is numeric: any float that is accepted, extremes included, must be safe in float32
FLOAT32_EDGES = st.sampled_from([3.5e38, 1e39, 1e300, 1e-46, 1e-300, 5e-324, 1e-38, 3.4e38])   # overflow / underflow
KERNEL_KWARGS = st.fixed_dictionaries(
    {}, optional={**VALID, **{f: VALID[f] | st.floats() | FLOAT32_EDGES for f in FLOAT_FIELDS}})
PROMPTS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24)

_ENGINE = None


def engine():
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = mock_engine(max_model_len=MAX_MODEL_LEN, max_num_seqs=8, num_blocks=64)
    return _ENGINE


def build(kwargs: dict) -> SamplingParams | None:
    """SamplingParams(**kwargs), or None when it raised the ValueError it may raise (any other: the test fails)."""
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        assert str(e).split()[0].split(".")[0] in FIELDS, str(e)      # structured_outputs.regex: the field
        event(f"rejected: {str(e).split()[0]}")
        return None


@FUZZ
@given(kwargs=KWARGS, prompt=PROMPTS)
def test_params_are_rejected_or_run_to_completion_in_the_vocabulary(kwargs: dict, prompt: list[int]) -> None:
    params = build(kwargs)
    if params is None:
        return
    eng = engine()
    try:
        rid = eng.add_request(prompt, params)
    except ValueError as e:
        assert str(e).split()[0].split(".")[0] in ENGINE_WORDS | set(FIELDS), str(e)
        event("rejected by the engine")
        return
    event("ran")
    final = None
    for _ in range(10_000):
        if not eng.has_unfinished():
            break
        for out in eng.step():      # a StepError or EngineDeadError here is a failure of the property
            if out.request_id == rid and out.finished:
                final = out
    assert final is not None and not eng.has_unfinished()
    assert len(final.outputs) == params.n
    for c in final.outputs:
        assert all(type(t) is int and 0 <= t < VOCAB for t in c.token_ids), c.token_ids
        assert c.finish_reason in ("stop", "length")
        assert len(prompt) + len(c.token_ids) <= MAX_MODEL_LEN
        if params.max_tokens is not None:
            assert len(c.token_ids) <= params.max_tokens
    assert eng.scheduler.kv.stats()["blocks_used"] == 0


_SAMPLE = None


def sampling_tensors(rows: list[SamplingParams], history: list[int], step: int, seed: int):
    """The host-side tensors for `rows` sharing one history, step and seed; eos is VOCAB - 1."""
    try:        # the backends split: the host side lives in kiln.backends.inputs, with eos ids per row
        from kiln.backends.inputs import build_sampling_tensors
        eos: list = [[VOCAB - 1]] * len(rows)
    except ImportError:
        from kiln.kernels.sampling import build_sampling_tensors
        eos = [VOCAB - 1]
    n = len(rows)
    return build_sampling_tensors(rows, [history] * n, [len(history)] * n, eos, [step] * n, [seed] * n, n, 32)


def sampler():
    """The sampler kernel, jitted once for a [2, VOCAB] batch."""
    global _SAMPLE
    if _SAMPLE is None:
        import jax

        from kiln.kernels.sampling import sample
        _SAMPLE = jax.jit(sample)
    return _SAMPLE


@FUZZ
@given(kwargs=KERNEL_KWARGS, history=PROMPTS, logits=st.lists(st.floats(-30.0, 30.0) | st.sampled_from([0.0, -1e30]),
                                                        min_size=VOCAB, max_size=VOCAB),
       step=st.integers(0, 10))
def test_accepted_params_never_make_the_sampler_leave_the_vocabulary(kwargs, history, logits, step) -> None:
    from kiln.kernels.sampling import check_supported
    params = build(kwargs)
    if params is None:
        return
    try:
        params.validate_for_vocab(VOCAB)
        check_supported(params, 1)
    except ValueError:
        return
    event("sampled")
    greedy = dataclasses.replace(params, temperature=0.0)      # row 1: the same params on the argmax path
    seed = params.seed if params.seed is not None else 7
    tensors = sampling_tensors([params, greedy], history, step, seed)
    batch = np.stack([np.asarray(logits, np.float32)] * 2)
    tokens = np.asarray(sampler()(batch, tensors).tokens)
    assert tokens.shape == (2,) and all(0 <= t < VOCAB for t in tokens.tolist()), (tokens, params)

