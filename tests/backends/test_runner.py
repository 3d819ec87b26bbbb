"""The real runners on a small random Llama (2 layers, vocab 258: compiles stay fast).

- JaxRunner: padding rows and padded tokens never change real rows' results. The same three requests run as
  one batch (3 rows in a bucket of 4, short chunks padded to the longest) and each alone on a second runner;
  tokens, logprobs and the K/V written to the requests' blocks must agree.
- Both runners report what a step really computed (RunnerStats), checked by hand on one prefill and one decode.
- Both runners apply each row's own EOS ids: an ignore_eos row beside a min_tokens row does not lift the
  min_tokens row's EOS suppression.
"""
from __future__ import annotations

import numpy as np
import pytest

from kiln.backends.jax.model import expected_shapes
from kiln.backends.registry import create_runner
from kiln.engine.build import build_config
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.scheduler_output import ScheduledRow, SchedulerOutput
from tests.mock_engine import mock_spec, tiny_tokenizer
from tests.tiny import EOS

SPEC = mock_spec(max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0,
                 intermediate_size=128)


def _tensors():
    rng = np.random.default_rng(0)
    return {name: (np.ones(shape, np.float32) if name.endswith("norm.weight")
                   else rng.normal(0, 0.3, shape).astype(np.float32))
            for name, shape in expected_shapes(SPEC).items()}


def _config(backend, **kw):
    return build_config(SPEC, backend=backend, dtype="float32", max_model_len=64, num_blocks=16, warmup=False,
                        graph_cache=False, platform="cpu", free_bytes=2**34, **kw)


@pytest.fixture(scope="module")
def setup():
    return _tensors(), _config("jax"), {}


@pytest.fixture(scope="module", params=["jax", "torch"])
def runner_of(request):
    """A function making a fresh runner of the backend (own KV cache, weights shared with the first one)."""
    first = create_runner(request.param, spec=SPEC, config=_config(request.param), tensors=_tensors())
    return lambda: first.with_config(config=first.config)


def _runner(setup):
    """A fresh JAX runner (own zeroed KV cache) sharing the module's compiled executables (same shapes)."""
    tensors, config, executables = setup
    r = create_runner("jax", spec=SPEC, config=config, tensors=tensors)
    r.executables = executables
    return r


GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=1.0, seed=5)
LOGPROBS = SamplingParams(temperature=0.0, logprobs=2)
# (prompt, block table, params): 3 requests with their own blocks
REQS = [(list(range(10, 15)), [1], GREEDY),
        (list(range(40, 51)), [2], SEEDED),
        (list(range(100, 120)), [3, 4], LOGPROBS)]


def _row(i, tokens, start, sample=True, out_index=0):
    prompt, table, sp = REQS[i]
    return ScheduledRow(request_id=str(i), token_ids=tokens, start_pos=start, block_table=table, sample=sample,
                        sampling_params=sp, seed=17 + i, output_index=out_index, prompt_len=len(prompt),
                        history=[], eos_token_ids=(2,))


def _run(runner, which):
    """Prefill, then 3 decode steps, for the requests in `which` batched together; per-row results."""
    res = runner.execute(SchedulerOutput("prefill", [_row(i, REQS[i][0], 0) for i in which]))
    toks = {i: [t] for i, t in zip(which, res.tokens)}
    lps = {i: [lp] for i, lp in zip(which, res.logprobs)}
    tops = {i: [res.top[j] if res.top else None] for j, i in enumerate(which)}
    for step in range(3):
        rows = [_row(i, [toks[i][-1]], len(REQS[i][0]) + step, out_index=step + 1) for i in which]
        res = runner.execute(SchedulerOutput("decode", rows))
        for j, i in enumerate(which):
            toks[i].append(res.tokens[j])
            lps[i].append(res.logprobs[j])
            tops[i].append(res.top[j] if res.top else None)
    return toks, lps, tops


def test_padding_rows_and_tokens_do_not_change_real_rows(setup):
    batched = _runner(setup)
    toks, lps, tops = _run(batched, [0, 1, 2])
    keys = [k for k, _ in batched.compile_log]
    assert {(k.kind, k.batch) for k in keys} == {("prefill", 4), ("decode", 4), ("sample", 4)}   # 3 rows padded to 4
    assert batched.stats().padding_tokens > 0

    alone = _runner(setup)
    for i in range(3):
        t1, lp1, top1 = _run(alone, [i])
        assert t1[i] == toks[i], f"request {i}: alone {t1[i]} != batched {toks[i]}"
        if REQS[i][2].logprobs is not None:     # logprobs are computed when some row of the step asks
            np.testing.assert_allclose(lp1[i], lps[i], atol=1e-4)
            for a, b in zip(top1[i], tops[i]):
                assert [t for t, _ in a[:3]] == [t for t, _ in b[:3]]
                np.testing.assert_allclose([v for _, v in a[:3]], [v for _, v in b[:3]], atol=1e-4)
    assert {k.batch for k, _ in alone.compile_log} == {1}

    # the K/V the requests wrote to their own blocks agree too (padding only ever writes the null block 0)
    for cache_a, cache_b in ((batched.k_cache, alone.k_cache), (batched.v_cache, alone.v_cache)):
        a, b = np.asarray(cache_a), np.asarray(cache_b)
        np.testing.assert_allclose(a[:, 1:5], b[:, 1:5], rtol=1e-4, atol=1e-4)   # fp noise of other shapes
        assert not a[:, 5:].any() and not b[:, 5:].any()                 # unused blocks untouched


def test_garbage_in_null_block_is_masked(setup):
    clean, _, _ = _run(_runner(setup), [0, 1, 2])
    dirty = _runner(setup)
    dirty.k_cache = dirty.k_cache.at[:, 0].set(1e4)
    dirty.v_cache = dirty.v_cache.at[:, 0].set(-1e4)
    toks, _, _ = _run(dirty, [0, 1, 2])
    assert toks == clean


def test_stats_count_what_the_step_computed(runner_of):
    """3 rows of 5, 11 and 20 tokens, then one decode token each. jax pads to its buckets: prefill (4 rows,
    seq_len 32) = 128 positions, decode 4 rows; torch computes the 3 real rows, prefill padded to the longest row
    rounded up to a multiple of 16 (20 -> 32, so the shapes a server meets stay few) = 96."""
    runner = runner_of()
    prompts = [REQS[0][0], REQS[1][0], REQS[2][0]]
    rows = [_row(i, p, 0) for i, p in enumerate(prompts)]
    res = runner.execute(SchedulerOutput("prefill", rows))
    runner.execute(SchedulerOutput("decode", [_row(i, [res.tokens[i]], len(p), out_index=1)
                                              for i, p in enumerate(prompts)]))
    st = runner.stats()
    assert (st.steps, st.real_tokens) == (2, 36 + 3)
    if runner.name == "jax":
        assert st.computed_tokens == 4 * 32 + 4 * 1
        assert st.padding_by_bucket == {"prefill(batch=4, seq_len=32)": 128 - 36, "decode(batch=4, blocks=4)": 1}
    else:
        assert st.computed_tokens == 3 * 32 + 3 * 1
        assert st.padding_by_bucket == {"prefill(batch=3, seq_len=32)": 96 - 36, "decode(batch=3, seq_len=1)": 0}
        assert st.compiles == 0
    assert st.padding_tokens == st.computed_tokens - st.real_tokens


def test_eos_is_per_row(runner_of):
    """Row 0 ignores EOS; row 1 has min_tokens 4 and a +100 bias on EOS. Row 1 must emit 4 other tokens, then
    EOS, and stop; a sampler that applied row 0's (empty) EOS ids to every row would stop row 1 at once."""
    runner = runner_of()
    engine = LLMEngine(runner.config, SPEC, runner, tiny_tokenizer())
    ids = [engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)),
           engine.add_request([8, 9], SamplingParams(temperature=0, max_tokens=10, min_tokens=4,
                                                     logit_bias={EOS: 100.0}))]
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
    first, second = done[ids[0]], done[ids[1]]
    assert len(first.token_ids) == 8 and first.finish_reason == "length"
    assert second.token_ids[4] == EOS and EOS not in second.token_ids[:4] and len(second.token_ids) == 5
    assert second.finish_reason == "stop"
