"""Prompt logprobs through the engine on the mock runner (hand-computable: position p scores prompt token p
with mock_logprob): chunked prefill fills every position once, the first is None, n > 1 records them once,
requests asking for them skip the prefix cache, and the torch backend refuses them at admission."""
from __future__ import annotations

import pytest

from kiln.backends.mock import mock_logprob
from kiln.engine.sampling_params import SamplingParams
from tests.mock_engine import mock_engine


def run(eng, ids, sp):
    rid = eng.add_request(ids, sp)
    while True:
        for o in eng.step():
            if o.request_id == rid and o.finished:
                return o


@pytest.mark.parametrize("budget", [None, 16])
def test_every_prompt_position_once_chunked_or_not(budget):
    eng = mock_engine(**({} if budget is None else {"max_num_batched_tokens": budget}))
    ids = eng.tokenizer.encode("a prompt long enough for several chunks of sixteen tokens each")
    assert len(ids) > 40
    for _ in range(2):                            # the second run would hit the prefix cache
        out = run(eng, ids, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2, n=2))
        plp = out.prompt_logprobs
        assert plp[0] is None and len(plp) == len(ids)
        for p in range(1, len(ids)):
            assert plp[p] == {ids[p]: mock_logprob(ids[p]), (ids[p] + 1) % eng.spec.vocab_size:
                              mock_logprob(ids[p]) - 1}
        assert out.num_cached_tokens == 0
    steps = [s for s in eng.runner.steps if s.kind == "prefill"]
    if budget:
        assert max(s.num_tokens for s in steps) <= budget
    assert run(eng, ids, SamplingParams(max_tokens=1)).prompt_logprobs is None


def test_the_range_is_checked():
    with pytest.raises(ValueError, match="^prompt_logprobs must be in"):
        SamplingParams(prompt_logprobs=21)


def test_a_backend_without_them_refuses_at_admission():
    eng = mock_engine()
    eng.runner.prompt_logprobs_unavailable = lambda: "no scoring here"
    with pytest.raises(ValueError, match="^prompt_logprobs is not available: no scoring here"):
        eng.add_request("abc", SamplingParams(prompt_logprobs=1))
