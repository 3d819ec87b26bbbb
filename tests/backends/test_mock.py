"""The mock runner drives the real scheduler and engine; its tokens are computed by hand here."""
from __future__ import annotations

from kiln.backends.mock import mock_logprob, next_token
from kiln.engine.sampling_params import SamplingParams
from tests.mock_engine import mock_engine
from tests.tiny import EOS, VOCAB


def _run(engine, prompts, params):
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids]


def _expected(prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        toks.append(next_token(toks[-1], len(toks) - 1, VOCAB))
    return toks[len(prompt):]


def test_greedy_tokens_follow_the_rule_across_batching_and_chunking():
    engine = mock_engine(max_num_batched_tokens=32)
    prompts = [[5, 6, 7], list(range(40, 90)), [200]]     # the 50-token prompt is prefilled in chunks
    outs = _run(engine, prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1))
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == _expected(p, 6)
        assert [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] == \
            [mock_logprob(t) for t in o.outputs[0].token_ids]
    assert engine.scheduler.kv.stats()["blocks_used"] == 0


def test_min_tokens_skips_eos_then_positive_bias_stops():
    engine = mock_engine()
    sp = SamplingParams(temperature=0, max_tokens=10, min_tokens=3, logit_bias={EOS: 5.0})
    out = _run(engine, [[1, 2, 3]], sp)[0].outputs[0]
    assert len(out.token_ids) == 4 and out.token_ids[-1] == EOS and EOS not in out.token_ids[:3]
    assert out.finish_reason == "stop"
