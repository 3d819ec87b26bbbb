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


# -- engine and scheduler behaviour, fast ------------------------------------------------------------------
def _record(engine):
    """Keep every SchedulerOutput the engine's runner executes on `engine.recorded`."""
    engine.recorded = []
    inner = engine.runner.execute
    engine.runner.execute = lambda step: (engine.recorded.append(step), inner(step))[1]
    return engine


def _assert_clean(engine):
    kv = engine.scheduler.kv
    kv.check_invariants()
    assert kv.stats()["blocks_used"] == 0 and not engine.has_unfinished() and not engine.scheduler.has_work()


def _sampled(prompt: list[int], n: int, seed: int) -> list[int]:
    """The mock rule for a sampled row: the greedy token plus an offset of (seed, output index)."""
    toks = list(prompt)
    for i in range(n):
        toks.append((next_token(toks[-1], len(toks) - 1, VOCAB) + seed * 1000003 + i * 7919) % VOCAB)
    return toks[len(prompt):]


def test_n_samples_are_seeded_seed_plus_i_and_share_the_prompt():
    engine = mock_engine()
    prompt = list(range(10, 30))
    out = _run(engine, [prompt], SamplingParams(n=3, temperature=1.0, seed=40, max_tokens=5, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.token_ids for c in out.outputs] == [_sampled(prompt, 5, 40 + i) for i in range(3)]
    assert all(c.finish_reason == "length" for c in out.outputs)
    _assert_clean(engine)


def test_abort_mid_way_frees_blocks():
    engine = mock_engine()
    rid = engine.add_request(list(range(1, 40)), SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    seen = [o for _ in range(4) for o in engine.step()]
    assert engine.scheduler.kv.stats()["blocks_used"] == 3 and len(seen[-1].outputs[0].token_ids) == 4
    out = engine.abort(rid)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert out.outputs[0].token_ids == seen[-1].outputs[0].token_ids
    assert engine.scheduler.kv.block_table(rid) == [] and engine.abort(rid) is None and engine.step() == []
    _assert_clean(engine)


def test_stop_string_cuts_the_text_and_ends_the_request():
    engine = mock_engine()
    prompt = [ord(c) for c in "hello"]
    full = _run(engine, [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    assert full.token_ids == _expected(prompt, 12) and len(full.text) >= 6
    stop = full.text[3:5]
    out = _run(engine, [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:full.text.index(stop)] and len(out.token_ids) < 12
    assert out.token_ids == full.token_ids[:len(out.token_ids)]
    _assert_clean(engine)


def test_preemption_recomputes_and_outputs_stay_the_same():
    prompts = [list(range(20 * i + 1, 20 * i + 21)) for i in range(4)]     # 4 x (20 + 40 tokens) > 9 blocks
    engine = _record(mock_engine(max_model_len=64, num_blocks=10))
    outs = _run(engine, prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0 and any(s.preempted for s in engine.recorded)
    assert [o.outputs[0].token_ids for o in outs] == [_expected(p, 40) for p in prompts]
    _assert_clean(engine)


def test_prefix_cache_hits_count_full_blocks():
    engine = _record(mock_engine())
    prompt = list(range(50, 90))                                             # 40 tokens: 2 full blocks of 16
    first = _run(engine, [prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert first.num_cached_tokens == 0
    hits = engine.scheduler.kv.prefix_hits
    engine.recorded.clear()
    second = _run(engine, [prompt + [7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert second.num_cached_tokens == 32 and engine.scheduler.kv.prefix_hits - hits == 32
    step = engine.recorded[0]
    assert step.kind == "prefill" and step.rows[0].start_pos == 32 and step.rows[0].token_ids == prompt[32:] + [7]
    assert second.outputs[0].token_ids == _expected(prompt + [7], 3)
    _assert_clean(engine)


def test_stats_are_the_runners():
    engine = mock_engine()
    _run(engine, [[1, 2, 3], [4, 5]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    st, rs = engine.stats(), engine.runner.stats()
    assert st["real_tokens"] == rs.real_tokens == 5 + 2 * 3                 # prompts, then 3 decode steps of 2
    assert st["padding_tokens"] == rs.padding_tokens == 0 and st["compiles"] == 0
    assert set(rs.padding_by_bucket) == {"prefill(batch=2)", "decode(batch=2)"}
