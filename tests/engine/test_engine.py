"""The engine core end to end on the default model, against Hugging Face transformers as the reference.

One `kiln.LLM` is built per module; the tiny-token-budget and tiny-KV-cache variants are further engines over
the same loaded weights (same spec, params and tokenizer; their own config, scheduler, runner and KV cache),
so the module pays for one model load. HF greedy references (fp32, same prompt token ids) are computed once.
Every runner's `execute` is wrapped to record the SchedulerOutputs it ran, so tests can show which path
(prefix hit, chunked prefill, preemption) was taken and which graphs were needed.
"""
from __future__ import annotations

import dataclasses

import pytest

import kiln
from kiln.backends.inputs import is_plain_greedy
from kiln.backends.platform import jax_platform
from kiln.compile.graph_key import GraphKey
from kiln.engine.build import build_config
from kiln.engine.llm_engine import LLMEngine
from kiln.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

MAX_LEN = 512
NEW = 24                       # new tokens per greedy request
# token-level prefix shared by prompts 8..15: > 3 blocks of 16, and prompt + question stays <= 64 tokens
PREFIX = ("You are a careful assistant. You answer questions about geography, history, cooking and science "
          "in short, clear sentences, and you always explain the reason behind each answer so that a "
          "student can follow. When you are not sure, you say so plainly and honestly.")
QUESTIONS = [" What is the capital of France?", " Why is the sky blue?", " How do I boil an egg?",
             " Who built the pyramids?", " What makes bread rise?", " Why do leaves change colour?",
             " How far away is the Moon?", " What is photosynthesis?"]
SHORT = ["The capital of Italy is", "def fibonacci(n):", "Once upon a time, in a small village,",
         "1, 2, 3, 4,", "Water boils at", "The three primary colours are", "Hello! My name is",
         "In 1969, the first person to walk on the Moon was"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
# no warmup (graphs compile lazily, exactly the bucket each step needs; every compile is logged) and no
# on-disk graph cache, so compile_log shows exactly what this module's workloads needed
NO_WARMUP = dict(warmup=False, graph_cache=False)


def _record(llm):
    """Wrap the runner's execute so every SchedulerOutput it runs is kept on `llm.recorded`."""
    llm.recorded, llm.history = [], []           # recorded: cleared by tests; history: every step ever
    inner = llm.engine.runner.execute

    def execute(out):
        llm.recorded.append(out)
        llm.history.append(out)
        return inner(out)

    llm.engine.runner.execute = execute
    return llm


def _variant(base, **kwargs):
    """Another engine over `base`'s loaded weights, with its own config, scheduler, runner and KV cache.

    Decode steps always pad to 16 rows (one decode batch bucket), so the changing batch sizes of a
    preempting run do not each need a graph: decode is cheap to pad, prefill is not."""
    e = base.engine
    config = build_config(e.spec, model=e.config.model.model, platform=jax_platform(), dtype="float32",
                          backend=e.config.backend, max_model_len=MAX_LEN, max_num_seqs=16,
                          buckets={"decode_bs": (16, 16, 16)}, **NO_WARMUP, **kwargs)
    llm = kiln.LLM.__new__(kiln.LLM)
    llm.engine = LLMEngine(config, e.spec, e.runner.with_config(config=config), e.tokenizer)
    llm.tokenizer = e.tokenizer
    return _record(llm)


@pytest.fixture(scope="module", params=["jax", "torch"])
def llm(default_gguf, request):
    """The engine on each backend, float32: every test of this module runs on both."""
    return _record(kiln.LLM(model=str(default_gguf), backend=request.param, dtype="float32", max_model_len=MAX_LEN,
                            **NO_WARMUP))


@pytest.fixture(scope="module")
def chunked_llm(llm):
    return _variant(llm, max_num_batched_tokens=32)          # long prompts must be prefilled in chunks


@pytest.fixture(scope="module")
def tiny_kv_llm(llm):
    return _variant(llm, num_blocks=40)                      # 39 usable blocks: one 512-token sequence fits


@pytest.fixture(scope="module")
def prompts(llm):
    """16 prompts as token ids: 8 short, 8 sharing a > 3-block token prefix (at most 64 tokens each)."""
    enc = llm.tokenizer.encode
    prefix = enc(PREFIX)
    ids = [enc(t) for t in SHORT] + [prefix + enc(q, add_special_tokens=False) for q in QUESTIONS]
    assert len(ids) == 16 and len({tuple(p) for p in ids}) == 16
    assert len(prefix) > 3 * 16 and max(len(p) for p in ids) <= 64, (len(prefix), [len(p) for p in ids])
    return ids


@pytest.fixture(scope="module")
def hf(default_hf_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(default_hf_dir), dtype=torch.float32).eval()


def _hf_greedy(model, ids, n):
    """HF greedy continuation, token by token with its KV cache, never stopping at EOS (ignore_eos)."""
    import torch

    out_ids = []
    with torch.no_grad():
        res = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            tok = int(res.logits[0, -1].argmax())
            out_ids.append(tok)
            res = model(torch.tensor([[tok]]), past_key_values=res.past_key_values, use_cache=True)
    return out_ids


def _hf_logits(model, ids, cont):
    """HF fp32 logits [len(cont), V] predicting each token of `cont` after `ids` (one teacher-forced pass)."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids + cont[:-1]]), logits_to_keep=len(cont)).logits[0].float()


@pytest.fixture(scope="module")
def batch_greedy(llm, prompts):
    """kiln: the 16 prompts submitted together, greedy, on a fresh engine."""
    outs = llm.generate(prompts, GREEDY)
    assert max(len(o.rows) for o in llm.recorded) == 16                      # really one batch of 16
    return outs


@pytest.fixture(scope="module")
def hf_refs(hf, prompts, batch_greedy):
    """HF greedy continuations of the 16 prompts.

    Checked cheaply with one teacher-forced HF pass over prompt + candidate: if HF's argmax at every
    position is the candidate's next token, the candidate *is* HF's greedy continuation. Where it is not,
    HF's own token-by-token greedy run is the reference (and the equality tests will show the difference).
    """
    refs = []
    for p, out in zip(prompts, batch_greedy):
        cand = list(out.outputs[0].token_ids)
        ok = len(cand) == NEW and _hf_logits(hf, p, cand).argmax(-1).tolist() == cand
        refs.append(cand if ok else _hf_greedy(hf, p, NEW))
    return refs


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def _assert_equal_hf(got, refs, prompts):
    bad = [i for i, (g, r) in enumerate(zip(got, refs)) if g != r]
    assert not bad, "\n".join(f"prompt {i} ({len(prompts[i])} tokens): kiln {got[i]} != hf {refs[i]}" for i in bad)


def _assert_clean(llm):
    kv = llm.engine.scheduler.kv
    kv.check_invariants()
    assert kv.stats()["blocks_used"] == 0
    assert kv.num_free_blocks == llm.engine.config.cache.num_blocks - 1     # every block free (or cached)
    assert not llm.engine.has_unfinished() and not llm.engine.scheduler.has_work()


def _fresh(llm):
    """Forget prefix-cache contents so a run takes the uncached path."""
    assert llm.engine.scheduler.kv.reset_prefix_cache()
    llm.recorded.clear()


# -- greedy equality with HF -------------------------------------------------------------------------------
def test_batch_equals_hf_and_alone(llm, prompts, batch_greedy, hf_refs):
    outs = batch_greedy
    assert all(o.num_cached_tokens == 0 for o in outs)
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    _assert_equal_hf(_tokens(outs), hf_refs, prompts)
    for i in (0, 5, 8, 15):                                                  # short and long, each alone
        _fresh(llm)
        alone = llm.generate([prompts[i]], GREEDY)[0]
        assert all(len(o.rows) == 1 for o in llm.recorded)
        assert alone.outputs[0].token_ids == outs[i].outputs[0].token_ids == hf_refs[i]
    _assert_clean(llm)


def test_prefix_cache_hit_equals_hf(llm, prompts, hf_refs):
    kv = llm.engine.scheduler.kv
    _fresh(llm)
    first = llm.generate([prompts[8]], GREEDY)[0]
    assert first.num_cached_tokens == 0
    hits = kv.prefix_hits
    llm.recorded.clear()
    second = llm.generate([prompts[9]], GREEDY)[0]                           # shares the long prefix
    assert second.num_cached_tokens >= 3 * 16 and second.num_cached_tokens % 16 == 0
    assert kv.prefix_hits - hits == second.num_cached_tokens
    step = llm.recorded[0]
    assert step.kind == "prefill" and step.rows[0].start_pos == second.num_cached_tokens
    assert step.rows[0].token_ids == prompts[9][second.num_cached_tokens:]
    assert first.outputs[0].token_ids == hf_refs[8]
    assert second.outputs[0].token_ids == hf_refs[9]
    # all 16 again: every prompt now starts from cached blocks (those of an earlier run of itself)
    llm.recorded.clear()
    outs = llm.generate(prompts, GREEDY)
    assert [o.num_cached_tokens for o in outs] == [(len(p) - 1) // 16 * 16 for p in prompts]
    assert sum(o.num_cached_tokens for o in outs) > 0
    _assert_equal_hf(_tokens(outs), hf_refs, prompts)
    _assert_clean(llm)


def test_chunked_prefill_equals_hf(chunked_llm, prompts, hf_refs):
    llm = chunked_llm
    assert llm.engine.config.scheduler.max_num_batched_tokens == 32
    outs = llm.generate(prompts, GREEDY)
    _assert_equal_hf(_tokens(outs), hf_refs, prompts)
    assert all(o.num_tokens <= 32 for o in llm.recorded)          # decodes + prefill chunks within the budget
    assert any(o.kind == "mixed" for o in llm.recorded)
    # prompts prefilled in several chunks (in prefill or mixed steps): an early chunk does not sample, the next
    # starts where it ended
    chunks: dict[str, list] = {}
    for o in llm.recorded:
        for r in o.rows:
            if r.start_pos < r.prompt_len:                            # a prompt chunk, not a decode
                chunks.setdefault(r.request_id, []).append((r.start_pos, len(r.token_ids), r.sample))
    chunked = {rid: c for rid, c in chunks.items() if len(c) > 1}
    assert chunked, chunks                     # (later long prompts mostly hit the first one's cached blocks)
    for c in chunked.values():
        assert [s for _, _, s in c] == [False] * (len(c) - 1) + [True]
        assert all(c[i][0] + c[i][1] == c[i + 1][0] for i in range(len(c) - 1))
    _assert_clean(llm)


def test_preemption_equals_hf(tiny_kv_llm, prompts, hf_refs):
    llm = tiny_kv_llm
    outs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert any(o.preempted for o in llm.recorded)
    _assert_equal_hf(_tokens(outs), hf_refs, prompts)
    _assert_clean(llm)


# -- sampling ----------------------------------------------------------------------------------------------
def test_seeded_sampling_independent_of_batch(llm, prompts, hf_refs):
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True)
    _fresh(llm)
    alone = llm.generate([prompts[9]], seeded)[0].outputs[0].token_ids
    assert len(alone) == 16
    # 16 rows: the seeded request, greedy ones, top_k=1 ones, other seeds, and one n=2 request
    n2 = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    top1 = SamplingParams(temperature=0.9, top_k=1, seed=3, max_tokens=NEW, ignore_eos=True)
    batch = [(prompts[0], GREEDY), (prompts[1], top1), (prompts[9], seeded), (prompts[10], top1),
             (prompts[4], n2), (prompts[4], SamplingParams(temperature=1.0, seed=12, max_tokens=12, ignore_eos=True)),
             (prompts[12], SamplingParams(temperature=1.2, max_tokens=10, ignore_eos=True))]
    batch += [(prompts[i], SamplingParams(temperature=0.7, top_k=20, seed=100 + i, max_tokens=8 + i,
                                          ignore_eos=True)) for i in (2, 3, 5, 6, 11, 13, 14, 15)]
    _fresh(llm)
    outs = llm.generate([p for p, _ in batch], [sp for _, sp in batch])
    assert max(len(o.rows) for o in llm.recorded) == 16
    assert outs[2].outputs[0].token_ids == alone                             # same tokens inside a batch
    assert outs[0].outputs[0].token_ids == hf_refs[0]
    assert outs[1].outputs[0].token_ids == hf_refs[1] and outs[3].outputs[0].token_ids == hf_refs[10]
    two = outs[4].outputs                                                    # n=2: samples seeded 11 and 12
    assert [c.index for c in two] == [0, 1]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in two)
    assert two[0].token_ids != two[1].token_ids
    assert two[1].token_ids == outs[5].outputs[0].token_ids
    _assert_clean(llm)


def test_logprobs_match_hf(llm, hf, prompts, hf_refs):
    import torch

    out = llm.generate([prompts[11]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                    logprobs=3))[0].outputs[0]
    assert out.token_ids == hf_refs[11][:8]
    ref = torch.log_softmax(_hf_logits(hf, prompts[11], out.token_ids), -1)   # [8, V]
    assert len(out.logprobs) == 8
    for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        assert tok in entry and len(entry) in (3, 4)
        assert set(entry) == set(ref[i].topk(3).indices.tolist()) | {tok}
        for t, lp in entry.items():
            assert abs(lp - float(ref[i, t])) < 1e-3, (i, t, lp, float(ref[i, t]))
    assert abs(out.cumulative_logprob - sum(e[t] for t, e in zip(out.token_ids, out.logprobs))) < 1e-3


# -- stopping and aborting ---------------------------------------------------------------------------------
def test_stop_string_and_length(llm, prompts, hf_refs):
    full = llm.generate([prompts[8]], GREEDY)[0].outputs[0]
    assert full.finish_reason == "length" and full.stop_reason is None and len(full.token_ids) == NEW
    words = [w for w in full.text.split() if len(w) >= 3 and full.text.index(w) > 0]
    assert words, full.text
    stop = words[len(words) // 2]
    out = llm.generate([prompts[8]], SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True,
                                                    stop=[stop, "@@never@@"]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text
    assert out.text == full.text[:full.text.index(stop)]
    assert out.token_ids == hf_refs[8][:len(out.token_ids)] and len(out.token_ids) < NEW
    short = llm.generate([prompts[8]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    assert short.outputs[0].finish_reason == "length" and short.outputs[0].token_ids == hf_refs[8][:5]
    _assert_clean(llm)


def test_abort_mid_way_frees_blocks(llm, prompts):
    engine = llm.engine
    rid = engine.add_request(prompts[10], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    seen = []
    for _ in range(5):
        seen += engine.step()
    assert engine.scheduler.kv.stats()["blocks_used"] > 0
    assert seen and not seen[-1].finished and len(seen[-1].outputs[0].token_ids) >= 3
    out = engine.abort(rid)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.scheduler.kv.block_table(rid) == []
    assert engine.abort(rid) is None
    assert engine.step() == []
    _assert_clean(llm)


# -- static shapes -----------------------------------------------------------------------------------------
def _keys_for(config, out, compiled_kinds, fused_greedy) -> set[GraphKey]:
    """The model bucket the plan picks for one step and the sampler graph of that batch size (a lazily
    compiling runner compiles exactly these); with `fused_greedy` a plain-greedy step samples inside the model's
    graph and uses no sampler graph. A mixed step runs as its decode rows' step, then its prefill's."""
    if out.kind == "mixed":
        dec = [r for r in out.rows if len(r.token_ids) == 1 and not r.scores]
        pre = [r for r in out.rows if r not in dec]
        return set().union(*(_keys_for(config, dataclasses.replace(out, kind=k, rows=rows), compiled_kinds,
                                       fused_greedy) for k, rows in (("decode", dec), ("prefill", pre)) if rows))
    plan = config.buckets
    if out.kind == "prefill":
        b, s = plan.prefill_bucket(len(out.rows), max(len(r.token_ids) for r in out.rows))
    else:
        b, s = plan.decode_bucket(len(out.rows), max(len(r.block_table) for r in out.rows))
    greedy = all(is_plain_greedy(r) for r in out.rows)
    keys = {GraphKey(out.kind, b, s)} | (set() if greedy and fused_greedy else {GraphKey("sample", b, 0 if greedy else 1)})
    return {k for k in keys if k.kind in compiled_kinds}


def test_compiles_are_exactly_the_planned_buckets_used(llm, chunked_llm, tiny_kv_llm):
    # every step any test of this module ran was recorded since each engine was built
    for v in (llm, chunked_llm, tiny_kv_llm):
        cfg, runner = v.engine.config, v.engine.runner
        st = runner.stats()
        assert st.real_tokens > 0 and st.padding_tokens >= 0 and st.steps == len(v.history)
        assert st.real_tokens == sum(o.num_tokens for o in v.history)
        if runner.name == "torch":                      # eager model and sampler: nothing compiled, no padding rows
            assert st.compiles == 0
            up = lambda n: -(-n // 16) * 16
            seq = lambda o: up(max(len(r.token_ids) for r in o.rows)) if o.kind == "prefill" else 1
            computed = lambda o: up(o.num_tokens) if o.kind == "mixed" else len(o.rows) * seq(o)
            assert st.computed_tokens == sum(computed(o) for o in v.history)   # prefill, mixed: multiples of 16
            continue
        keys = [k for k, _ in runner.compile_log]
        assert len(keys) == len(set(keys)), "a bucket compiled twice"
        assert set(keys) == {k for k in runner.executables if k.kind in runner.compiled_kinds}
        prefill_ok, decode_ok = set(cfg.buckets.prefill_buckets()), set(cfg.buckets.decode_buckets())
        samplers = {(b, g) for b in cfg.buckets.prompt_bs + cfg.buckets.decode_bs for g in (0, 1)}
        for k in keys:
            assert (k.batch, k.size) in {"prefill": prefill_ok, "decode": decode_ok, "sample": samplers}[k.kind], k
        used = set().union(*(_keys_for(cfg, o, runner.compiled_kinds, runner.fused_greedy) for o in v.history))
        assert set(keys) == used                        # one compile per distinct bucket used, nothing else
        assert st.compiles == len(keys)


def test_same_workload_again_compiles_nothing(chunked_llm, prompts):
    runner = chunked_llm.engine.runner
    n = runner.stats().compiles
    _fresh(chunked_llm)
    chunked_llm.generate(prompts, GREEDY)
    assert runner.stats().compiles == n
    _assert_clean(chunked_llm)


def test_all_blocks_free_or_cached_at_the_end(llm, chunked_llm, tiny_kv_llm):
    for v in (llm, chunked_llm, tiny_kv_llm):
        _assert_clean(v)
        st = v.engine.stats()
        assert st["blocks_used"] == 0 and st["running"] == 0 and st["waiting"] == 0
