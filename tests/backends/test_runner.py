"""JaxRunner: padding rows and padded tokens never change real rows' results.

A small random Llama (2 layers, vocab 256) keeps compiles fast. The same three requests run as one batch
(3 rows in a bucket of 4, short chunks padded to the longest) and each alone on a second runner; tokens,
logprobs and the K/V written to the requests' blocks must agree.
"""
from __future__ import annotations

import numpy as np
import pytest

from kiln.backends.jax.model import expected_shapes, params_from_hf
from kiln.backends.jax.runner import JaxRunner
from kiln.config import EngineConfig
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.scheduler_output import ScheduledRow, SchedulerOutput
from kiln.models.spec import ModelSpec

SPEC = ModelSpec.from_hf_config({
    "architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "tie_word_embeddings": True, "eos_token_id": 2, "rope_theta": 10000.0})


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    tensors = {name: (np.ones(shape, np.float32) if name.endswith("norm.weight")
                      else rng.normal(0, 0.3, shape).astype(np.float32))
               for name, shape in expected_shapes(SPEC).items()}
    params = params_from_hf(SPEC, tensors, np.float32)
    config = EngineConfig.create(SPEC, dtype="float32", max_model_len=64, num_blocks=16, warmup=False,
                                 graph_cache=False)
    return params, config, {}


def _runner(setup) -> JaxRunner:
    """A fresh runner (own zeroed KV cache) sharing the module's compiled executables (same shapes)."""
    params, config, executables = setup
    r = JaxRunner(SPEC, params, config)
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
    assert batched.padding_tokens > 0

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
