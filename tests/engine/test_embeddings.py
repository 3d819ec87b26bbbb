"""Embedding requests through the engine on the mock runner, against hand-computed pools of `mock_hidden`
(each position's final hidden state is [(token + d) % 5 - 2]): last and mean pooling, L2-normalised or not,
chunked prefill (the chunks' sums add up), preemption (a recomputed prompt starts over), no prefix-cache hit,
no token sampled, blocks freed, a prompt may fill max_model_len, and a runner that cannot score refuses them."""
from __future__ import annotations

import numpy as np
import pytest

from kiln.backends.mock import mock_hidden
from kiln.engine.outputs import EmbeddingRequestOutput
from kiln.engine.pooling import PoolingParams
from kiln.engine.sampling_params import SamplingParams
from tests.mock_engine import mock_engine


def expected(ids, D, pooling, normalize=True):
    hs = np.stack([((t + np.arange(D)) % 5 - 2).astype(np.float64) for t in ids])   # [T, D], by hand
    v = hs[-1] if pooling == "last" else hs.mean(0)
    return v / np.linalg.norm(v) if normalize else v


def run_all(eng, rids):
    done = {}
    while len(done) < len(rids):
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    return [done[r] for r in rids]


@pytest.mark.parametrize("budget", [None, 16])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooled_as_computed_by_hand(budget, pooling):
    eng = mock_engine(**({} if budget is None else {"max_num_batched_tokens": budget}))
    D = eng.spec.hidden_size
    ids = eng.tokenizer.encode("a prompt long enough for several chunks of sixteen tokens each")
    assert len(ids) > 40
    for _ in range(2):                                      # the second run would hit the prefix cache
        rids = [eng.add_request(ids, PoolingParams(pooling)), eng.add_request(ids[:7], PoolingParams(pooling)),
                eng.add_request(ids, PoolingParams(pooling, normalize=False)),
                eng.add_request(ids[:5], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))]
        a, b, c, gen = run_all(eng, rids)
        for out, want in ((a, expected(ids, D, pooling)), (b, expected(ids[:7], D, pooling)),
                          (c, expected(ids, D, pooling, normalize=False))):
            assert isinstance(out, EmbeddingRequestOutput) and out.finish_reason == "stop"
            np.testing.assert_allclose(out.outputs.embedding, want, rtol=1e-6, atol=1e-6)
        assert len(gen.outputs[0].token_ids) == 3           # generation beside them is unaffected
    prefills = [s for s in eng.runner.steps if s.kind == "prefill"]
    if budget:
        assert max(s.num_tokens for s in prefills) <= budget and len(prefills) > 3
    pooled = [r for s in eng.runner.steps for r in s.rows if r.pooling is not None]
    assert sum(len(r.token_ids) for r in pooled) == 2 * (2 * len(ids) + 7)   # every position, every time
    assert not any(s.kind == "decode" and any(r.pooling for r in s.rows) for s in eng.runner.steps)
    assert eng.scheduler.kv.stats()["blocks_used"] == 0


def test_preempted_prompt_starts_over():
    eng = mock_engine(max_num_batched_tokens=16)
    D = eng.spec.hidden_size
    ids = list(range(3, 44))                                # 41 tokens: a mean that is not 0
    rid = eng.add_request(ids, PoolingParams("mean"))
    eng.step()                                              # the first chunk
    parent = eng._parents[rid]
    req = parent.samples[0].request
    eng.scheduler._preempt(req)                             # as the decode scheduler would when out of blocks
    out, = run_all(eng, [rid])
    np.testing.assert_allclose(out.outputs.embedding, expected(ids, D, "mean"), rtol=1e-6, atol=1e-6)
    assert mock_hidden(ids[0], D).tolist() == [(ids[0] + d) % 5 - 2 for d in range(D)]


def test_admission():
    eng = mock_engine()
    max_len = eng.config.scheduler.max_model_len
    eng.add_request([1] * max_len, PoolingParams())         # no room for a token is needed
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request([1] * (max_len + 1), PoolingParams())
    with pytest.raises(ValueError, match="^pooling must be one of"):
        eng.add_request([1, 2], PoolingParams("cls"))
    eng.runner.prompt_logprobs_unavailable = lambda: "no scoring here"
    with pytest.raises(ValueError, match="^embeddings are not available: no scoring here"):
        eng.add_request([1, 2], PoolingParams())


def test_abort_gives_an_empty_finished_output():
    eng = mock_engine(max_num_batched_tokens=16)
    rid = eng.add_request(list(range(3, 60)), PoolingParams())
    eng.step()
    out = eng.abort(rid)
    assert isinstance(out, EmbeddingRequestOutput) and out.finished and out.finish_reason == "abort"
    assert out.outputs.embedding == [] and not eng.has_unfinished()
