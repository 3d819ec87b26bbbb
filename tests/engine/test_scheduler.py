"""Scheduler unit tests with no device: a fake spec, hand-fed Requests, results simulated on the host.

`_Sim` plays the engine: schedule(), then on_step_done(), then one fake sampled token per row with
`sample=True`, finishing a request when it reaches its max_tokens.
"""
from __future__ import annotations

import random

import pytest

from kiln.engine.build import build_config
from kiln.engine.request import Request, Status
from kiln.engine.sampling_params import SamplingParams
from kiln.engine.scheduler import Scheduler
from kiln.models.spec import ModelSpec

SPEC = ModelSpec.from_hf_config({
    "architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 16, "intermediate_size": 32,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    "max_position_embeddings": 1024, "eos_token_id": 2})


def make_sched(**kw) -> Scheduler:
    kw.setdefault("block_size", 4)
    kw.setdefault("num_blocks", 64)
    kw.setdefault("max_model_len", 128)
    return Scheduler(build_config(SPEC, dtype="float32", backend="mock", platform="cpu", free_bytes=2**34, **kw))


def make_req(rid: str, n_prompt: int, max_tokens: int = 8, base: int = 0) -> Request:
    # distinct token ids per request (base) so prefix caching only hits where a test wants it
    prompt = [(base + i) % 997 + 3 for i in range(n_prompt)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), seed=0)


def split(out):
    """(decode rows, prefill rows) of a step: a mixed step's decodes come first (a 1-token first chunk would
    count as a decode here; the checks below hold for either)."""
    n_dec = len(out.rows) if out.kind == "decode" else 0 if out.kind == "prefill" else \
        next(i for i, r in enumerate(out.rows) if len(r.token_ids) > 1 or i == len(out.rows) - 1)
    return out.rows[:n_dec], out.rows[n_dec:]


class _Sim:
    """Drives a Scheduler like LLMEngine.step does, checking the step's contract every time."""

    def __init__(self, sched: Scheduler):
        self.s = sched
        self.outs = []
        self.finished: dict[str, Request] = {}
        self.tok = 500

    def add(self, req: Request) -> Request:
        self.s.add_request(req)
        return req

    def step(self):
        s = self.s
        out = s.schedule()
        if out is None:
            return None
        self.check_output(out)
        s.on_step_done(out)
        for row in out.rows:
            if not row.sample:
                continue
            req = s.requests[row.request_id]
            req.output_token_ids.append(self.tok)
            self.tok = self.tok % 997 + 3
            if len(req.output_token_ids) >= req.sampling_params.max_tokens:
                self.finished[req.request_id] = s.finish(req.request_id, "length")
        s.kv.check_invariants()
        self.outs.append(out)
        return out

    def check_output(self, out):
        s, cfg = self.s, self.s.config
        assert out.rows, "schedule() returned an empty step"
        ids = [r.request_id for r in out.rows]
        assert len(ids) == len(set(ids)), "a request appears twice in one step"
        bs = cfg.cache.block_size
        for r in out.rows:
            req = s.requests[r.request_id]
            assert req.status is Status.RUNNING
            assert r.start_pos == req.num_computed_tokens
            assert r.token_ids == req.all_token_ids[r.start_pos:r.start_pos + len(r.token_ids)]
            assert len(r.block_table) * bs >= r.start_pos + len(r.token_ids), "block table too short"
            assert 0 not in r.block_table, "null block handed to a request"
            assert r.sample == (r.start_pos + len(r.token_ids) == req.num_tokens)
            assert r.output_index == len(req.output_token_ids)
        assert out.kind in ("prefill", "decode", "mixed")
        decodes, prefills = split(out)
        assert (out.kind == "mixed") == bool(decodes and prefills)
        if decodes:                                                    # decode rows first, one token each
            assert all(len(r.token_ids) == 1 and r.sample for r in decodes)
            assert len(decodes) <= cfg.buckets.decode_bs[-1]
            cfg.buckets.decode_bucket(len(decodes), max(len(r.block_table) for r in decodes))
        if prefills:
            longest = max(len(r.token_ids) for r in prefills)
            assert len(prefills) * longest <= cfg.scheduler.max_num_batched_tokens, "budget ignores padding"
            assert longest <= cfg.buckets.prompt_seq[-1]
            assert len(prefills) <= cfg.buckets.prompt_bs[-1]
            b, t = cfg.buckets.prefill_bucket(len(prefills), longest)      # has a bucket ...
            assert b * t <= cfg.scheduler.max_num_batched_tokens, "padded bucket over the token budget"
            if cfg.scheduler.long_prefill_token_threshold:
                assert longest <= cfg.scheduler.long_prefill_token_threshold
        if len(decodes) <= cfg.scheduler.max_num_batched_tokens:
            assert out.num_tokens <= cfg.scheduler.max_num_batched_tokens, "decodes + chunks over the budget"
        assert len(s.running) <= cfg.scheduler.max_num_seqs

    def run(self, max_steps: int = 10_000):
        for _ in range(max_steps):
            if not self.s.has_work():
                return
            assert self.step() is not None, "work left but nothing schedulable (deadlock)"
        raise AssertionError("did not finish")

    def assert_clean(self):
        kv = self.s.kv
        kv.check_invariants()
        assert kv.stats()["blocks_used"] == 0
        assert kv.num_free_blocks == self.s.config.cache.num_blocks - 1
        assert not self.s.running and not self.s.waiting and not self.s.requests


def test_a_newcomer_is_prefilled_beside_the_running_decodes():
    sim = _Sim(make_sched())
    sim.add(make_req("a", 10, max_tokens=6, base=0))
    sim.add(make_req("b", 7, max_tokens=6, base=100))
    out = sim.step()
    assert out.kind == "prefill" and [r.request_id for r in out.rows] == ["a", "b"]
    assert [len(r.token_ids) for r in out.rows] == [10, 7] and all(r.sample for r in out.rows)
    out = sim.step()
    assert out.kind == "decode" and [r.request_id for r in out.rows] == ["a", "b"]
    # a newcomer while a and b decode: one mixed step, decodes first, and nobody waits a step for it
    sim.add(make_req("c", 9, max_tokens=6, base=200))
    out = sim.step()
    assert out.kind == "mixed" and [r.request_id for r in out.rows] == ["a", "b", "c"]
    assert [(r.start_pos, len(r.token_ids)) for r in out.rows] == [(11, 1), (8, 1), (0, 9)]
    assert sim.step().kind == "decode"
    sim.run()
    assert set(sim.finished) == {"a", "b", "c"}
    assert all(len(r.output_token_ids) == 6 for r in sim.finished.values())
    sim.assert_clean()


def test_long_prompt_is_chunked_beside_decodes():
    sim = _Sim(make_sched(max_num_batched_tokens=16))
    short = sim.add(make_req("short", 5, max_tokens=10, base=0))
    sim.step()                                                     # prefill "short"
    long = sim.add(make_req("long", 50, max_tokens=3, base=300))
    chunks = []
    while long.num_computed_tokens < 50:
        out = sim.step()
        assert out.kind == "mixed" and [r.request_id for r in out.rows] == ["short", "long"]
        assert out.num_tokens <= 16                                # the decode counts in the budget
        r = out.rows[1]
        chunks.append((r.start_pos, len(r.token_ids), r.sample))
    assert chunks == [(0, 15, False), (15, 15, False), (30, 15, False), (45, 5, True)]
    assert len(short.output_token_ids) == 1 + 4                   # short decoded in every one of those steps
    sim.run()
    sim.assert_clean()


def test_long_prefill_threshold_caps_each_chunk():
    sim = _Sim(make_sched(max_num_batched_tokens=64, long_prefill_token_threshold=8))
    sim.add(make_req("run", 4, max_tokens=20, base=0))
    sim.step()
    for i in range(3):
        sim.add(make_req(f"long{i}", 30, max_tokens=2, base=100 * (i + 1)))
    out = sim.step()
    # without the cap long0 would take 32 of the 63 tokens left; with it the three share the step
    assert out.kind == "mixed" and [r.request_id for r in out.rows] == ["run", "long0", "long1", "long2"]
    assert [len(r.token_ids) for r in out.rows] == [1, 8, 8, 8]
    sim.run()                                                     # check_output asserts the cap every step
    assert max(len(r.token_ids) for o in sim.outs for r in o.rows) == 8
    assert len(sim.finished) == 4
    sim.assert_clean()
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        make_sched(long_prefill_token_threshold=-1)


def test_prefix_cache_hit_in_a_mixed_step():
    sim = _Sim(make_sched())
    shared = list(range(10, 30))                                   # 20 tokens = 5 blocks of 4
    a = sim.add(Request("a", shared + [40], SamplingParams(max_tokens=10, ignore_eos=True), seed=0))
    sim.step()
    sim.step()                                                     # a decodes; its 5 full blocks are cached
    b = sim.add(Request("b", shared + [41, 42], SamplingParams(max_tokens=2), seed=0))
    out = sim.step()
    assert out.kind == "mixed" and [r.request_id for r in out.rows] == ["a", "b"]
    assert out.rows[1].start_pos == 20 and out.rows[1].token_ids == [41, 42] and b.num_cached_tokens == 20
    assert sim.s.kv.block_table("b")[:5] == sim.s.kv.block_table("a")[:5]    # the same physical blocks
    assert a.status is Status.RUNNING
    sim.run()
    sim.assert_clean()


@pytest.mark.parametrize("budget", [16, 24, 40, 64])
def test_token_budget_counts_padding(budget):
    sim = _Sim(make_sched(max_num_batched_tokens=budget, num_blocks=256))
    rng = random.Random(budget)
    for i in range(12):
        sim.add(make_req(f"r{i}", rng.randint(1, 60), max_tokens=rng.randint(1, 5), base=i * 61))
    sim.run()                        # check_output asserts rows x longest chunk <= budget on every prefill
    prefills = [p for p in (split(o)[1] for o in sim.outs) if p]
    assert any(len(p) > 1 for p in prefills)
    assert max(len(p) * max(len(r.token_ids) for r in p) for p in prefills) <= budget
    assert len(sim.finished) == 12
    sim.assert_clean()


def test_max_num_seqs_respected():
    sim = _Sim(make_sched(max_num_seqs=2))
    for i in range(5):
        sim.add(make_req(f"r{i}", 6, max_tokens=4, base=i * 50))
    out = sim.step()
    assert out.kind == "prefill" and len(out.rows) == 2 and len(sim.s.waiting) == 3
    sim.run()                                        # check_output asserts len(running) <= max_num_seqs
    assert max(len(o.rows) for o in sim.outs) <= 2
    assert len(sim.finished) == 5
    sim.assert_clean()


def test_preempts_newest_and_resumes_by_recompute():
    # 8 usable blocks of 4 tokens; a (12 prompt) and b (12 prompt) take 3 blocks each after prefill; decoding
    # grows both until the pool runs dry and the newest (b) must give way.
    sim = _Sim(make_sched(num_blocks=9, max_model_len=32, enable_prefix_caching=False))
    a = sim.add(make_req("a", 12, max_tokens=12, base=0))
    b = sim.add(make_req("b", 12, max_tokens=12, base=100))
    while not any(o.preempted for o in sim.outs):
        sim.step()
    out = sim.outs[-1]
    assert out.preempted == ["b"] and [r.request_id for r in out.rows] == ["a"]
    assert b.status is Status.WAITING and b.num_computed_tokens == 0 and sim.s.waiting[0] is b
    assert b.num_preemptions == 1 and sim.s.num_preemptions == 1
    assert sim.s.kv.block_table("b") == []
    n_out_b = len(b.output_token_ids)
    assert n_out_b > 0
    # later b is prefilled again over prompt + its earlier outputs, then continues decoding
    sim.run()
    recompute = [r for o in sim.outs if o.kind == "prefill" for r in o.rows
                 if r.request_id == "b" and r.start_pos == 0 and len(r.token_ids) > 12]
    assert recompute and recompute[0].token_ids[:12] == b.prompt_token_ids
    assert len(recompute[0].token_ids) >= 12 + n_out_b
    assert len(a.output_token_ids) == 12 and len(b.output_token_ids) == 12
    assert a.finish_reason == b.finish_reason == "length"
    sim.assert_clean()


def test_a_partial_prefill_is_preempted_for_a_running_decode():
    # 8 usable blocks of 4: a (7 prompt) decodes; b (28 prompt) gets one 15-token chunk beside a's decode, then
    # no block is left for its next chunk: decodes go on alone until a needs a block, and b (the newest) gives
    # way mid-prefill; nothing is admitted in that step, and b recomputes from 0 once a is done
    sim = _Sim(make_sched(num_blocks=9, max_model_len=32, max_num_batched_tokens=16, enable_prefix_caching=False))
    a = sim.add(make_req("a", 7, max_tokens=20, base=0))
    sim.step()
    b = sim.add(make_req("b", 28, max_tokens=2, base=100))
    out = sim.step()
    assert out.kind == "mixed" and [(r.request_id, r.start_pos, len(r.token_ids)) for r in out.rows] == \
        [("a", 7, 1), ("b", 0, 15)]
    while not sim.outs[-1].preempted:
        out = sim.step()
        assert [r.request_id for r in out.rows] == ["a"] and b.num_computed_tokens in (15, 0)
    assert out.preempted == ["b"] and out.kind == "decode" and b.status is Status.WAITING
    assert b.num_computed_tokens == 0 and sim.s.kv.block_table("b") == []
    sim.run()
    again = [r for o in sim.outs for r in o.rows if r.request_id == "b" and r.start_pos == 0]
    assert len(again) == 2 and len(b.output_token_ids) == 2 and len(a.output_token_ids) == 20
    sim.assert_clean()


def test_preempted_request_hits_its_own_cached_blocks():
    sim = _Sim(make_sched(num_blocks=9, max_model_len=32))
    sim.add(make_req("a", 12, max_tokens=12, base=0))
    sim.add(make_req("b", 12, max_tokens=12, base=100))
    sim.run()
    assert sim.s.num_preemptions >= 1
    assert sim.s.kv.prefix_hits >= 0             # with caching on it still completes and leaks nothing
    sim.assert_clean()


def test_finish_and_abort_free_everything():
    sim = _Sim(make_sched(max_num_batched_tokens=16))
    sim.add(make_req("run", 8, max_tokens=50, base=0))
    sim.add(make_req("chunk", 40, max_tokens=50, base=100))
    sim.add(make_req("wait", 8, max_tokens=50, base=200))
    sim.step()
    sim.step()
    s = sim.s
    assert s.kv.block_table("run") and s.kv.block_table("chunk")
    assert s.requests["chunk"].num_computed_tokens < 40                # aborted mid-chunked-prefill
    r = s.finish("chunk", "abort")
    assert r.status is Status.FINISHED and r.finish_reason == "abort"
    assert s.kv.block_table("chunk") == [] and r not in s.running
    s.kv.check_invariants()
    assert s.finish("chunk", "abort") is None                         # twice: no-op
    s.finish("run", "stop", 7)
    assert s.requests.get("run") is None
    s.finish("wait", "abort")
    sim.assert_clean()
    assert s.schedule() is None


def test_prefix_cache_hit_starts_past_cached_blocks():
    sim = _Sim(make_sched())
    shared = list(range(10, 30))                                       # 20 tokens = 5 blocks of 4
    sim.add(Request("a", shared + [40], SamplingParams(max_tokens=2), seed=0))
    sim.run()
    b = sim.add(Request("b", shared + [41, 42], SamplingParams(max_tokens=2), seed=0))
    out = sim.step()
    assert out.kind == "prefill" and out.rows[0].start_pos == 20 and out.rows[0].token_ids == [41, 42]
    assert b.num_cached_tokens == 20
    sim.run()
    sim.assert_clean()


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_invariants(seed):
    rng = random.Random(seed)
    # the pool always holds at least one max_model_len sequence (16 blocks of 4), else nothing could finish
    sim = _Sim(make_sched(num_blocks=rng.choice([18, 20, 40]), max_num_batched_tokens=rng.choice([16, 32, 64]),
                          max_num_seqs=rng.choice([2, 4, 8]), max_model_len=64))
    s = sim.s
    shared = [rng.randrange(3, 900) for _ in range(24)]
    n = 0
    for _ in range(300):
        op = rng.random()
        if op < 0.3:
            plen = rng.randint(1, 40)
            prompt = (shared[:rng.choice([0, 8, 16, 24])] + [rng.randrange(3, 900) for _ in range(plen)])[:40]
            s.add_request(Request(f"q{n}", prompt, SamplingParams(max_tokens=rng.randint(1, 20)), seed=n))
            n += 1
        elif op < 0.8:
            sim.step()
        elif s.requests:
            rid = rng.choice(list(s.requests))
            s.finish(rid, rng.choice(["abort", "stop"]))
        s.kv.check_invariants()
        used = {b for rid in s.requests for b in s.kv.block_table(rid)}
        assert all(s.kv.block_table(r.request_id) == [] for r in s.waiting)
        assert len(used) <= s.config.cache.num_blocks - 1
    sim.run()
    assert sim.finished and all(r.status is Status.FINISHED for r in sim.finished.values())
    sim.assert_clean()


def test_chunked_prefill_flags_reach_the_scheduler_config():
    from kiln.entrypoints.args import engine_kwargs
    from kiln.entrypoints.cli import build_parser
    kw = engine_kwargs(build_parser().parse_args(
        ["serve", "--max-num-batched-tokens", "48", "--long-prefill-token-threshold", "12"]))
    s = make_sched(max_num_batched_tokens=kw["max_num_batched_tokens"],
                   long_prefill_token_threshold=kw["long_prefill_token_threshold"]).config.scheduler
    assert (s.max_num_batched_tokens, s.long_prefill_token_threshold) == (48, 12)
    assert engine_kwargs(build_parser().parse_args(["serve"]))["long_prefill_token_threshold"] == 0
