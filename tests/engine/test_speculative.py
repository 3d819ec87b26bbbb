"""Speculative decoding in the engine, on the MockRunner, whose continuation is hand-computable: greedy
next = (3 * last + pos + 1) % V, sampled rows add (seed * 1000003 + output_index * 7919) % V (backends/mock).

An oracle proposer (in place of engine/ngram.propose) drafts that exact continuation, with chosen positions
made wrong, so that accepts, rejects and the bonus token are known in advance: outputs must equal the
hand-computed sequence (and so the unspeculated run), stops and max_tokens inside accepted drafts must end the
request exactly there, and the acceptance counters must count what the oracle made right."""
from __future__ import annotations

import pytest

from kiln import SamplingParams
from kiln.engine import ngram
from kiln.engine.build import build_config
from tests.mock_engine import mock_engine, mock_spec
from tests.tiny import VOCAB

SPEC = {"method": "ngram", "num_speculative_tokens": 3}
PROMPT = [11, 22, 33, 44, 55]


def continuation(ctx: list[int], n: int, prompt_len: int, seed: int | None = None) -> list[int]:
    """The mock's next n tokens after ctx: greedy, or sampled with this seed (output index from prompt_len)."""
    out, ctx = [], list(ctx)
    for _ in range(n):
        tok = (3 * ctx[-1] + len(ctx)) % VOCAB                       # last at pos len - 1: 3 * last + pos + 1
        if seed is not None:
            tok = (tok + seed * 1000003 + (len(ctx) - prompt_len) * 7919) % VOCAB
        out.append(tok)
        ctx.append(tok)
    return out


@pytest.fixture
def oracle(monkeypatch):
    """Make ngram.propose draft the true continuation; `wrong` positions (0-based within the drafts) are off
    by one. Returns a dict the test sets: wrong, seed, prompt_len."""
    conf = {"wrong": (), "seed": None, "prompt_len": len(PROMPT)}

    def propose(context, k, n_max, n_min):
        d = continuation(context, k, conf["prompt_len"], conf["seed"])
        return [(t + 1) % VOCAB if j in conf["wrong"] else t for j, t in enumerate(d)]
    monkeypatch.setattr(ngram, "propose", propose)
    return conf


def run(engine, prompt, sp):
    rid = engine.add_request(prompt, sp)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished and out.request_id == rid:
                return out.outputs[0]


def test_greedy_all_accepted_equals_the_hand_computed_sequence(oracle):
    e = mock_engine(speculative_config=SPEC)
    out = run(e, PROMPT, SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True))
    assert out.token_ids == continuation(PROMPT, 17, len(PROMPT))
    assert out.finish_reason == "length"
    # the prefill samples 1; then each verify step emits 3 drafts + the bonus token: 4 steps to 17, the last
    # verifying the 3 drafts that fit before max_tokens (17 - 13 - 1 = 3)
    assert e.num_steps == 1 + 4
    st = e.stats()
    assert (st["spec_draft_tokens"], st["spec_accepted_tokens"]) == (12, 12)
    assert [len(r.token_ids) for s in e.runner.steps for r in s.rows][1:] == [4, 4, 4, 4]


def test_a_rejected_draft_is_replaced_by_the_target_token(oracle):
    oracle["wrong"] = (1,)                       # draft 0 right, draft 1 wrong: 2 tokens per verify step
    e = mock_engine(speculative_config=SPEC)
    out = run(e, PROMPT, SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True))
    assert out.token_ids == continuation(PROMPT, 9, len(PROMPT))
    assert e.num_steps == 1 + 4                  # 1 + 2 + 2 + 2 + 2
    st = e.stats()                               # drafts 3, 3, 3, then 1 (9 - 7 - 1): draft 0 accepted each time
    assert (st["spec_draft_tokens"], st["spec_accepted_tokens"]) == (10, 4)


def test_sampled_rows_are_reproducible_and_equal_the_unspeculated_run(oracle):
    oracle["seed"], oracle["wrong"] = 1234, (2,)
    sp = SamplingParams(temperature=0.8, seed=1234, max_tokens=12, ignore_eos=True)
    plain = run(mock_engine(), PROMPT, sp)
    e = mock_engine(speculative_config=SPEC)
    out = run(e, PROMPT, sp)
    assert out.token_ids == plain.token_ids == continuation(PROMPT, 12, len(PROMPT), seed=1234)
    assert e.stats()["spec_accepted_tokens"] > 0


def test_stop_token_inside_accepted_drafts_ends_the_request_there(oracle):
    seq = continuation(PROMPT, 20, len(PROMPT))
    stop = seq[5]
    assert stop not in seq[:5]
    e = mock_engine(speculative_config=SPEC)
    out = run(e, PROMPT, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop]))
    assert out.token_ids == seq[:6] and out.finish_reason == "stop" and out.stop_reason == stop
    assert e.stats()["spec_accepted_tokens"] >= 4     # seq[5] was an accepted draft of the second verify step


def test_stop_string_inside_accepted_drafts(oracle):
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = run(mock_engine(), PROMPT, sp)
    text = plain.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    want = run(mock_engine(), PROMPT, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]))
    assert want.finish_reason == "stop" and len(want.token_ids) < 40
    e = mock_engine(speculative_config=SPEC)
    got = run(e, PROMPT, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop]))
    assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == \
        (want.text, want.token_ids, "stop", stop)
    assert got.text == text[:text.index(stop)]
    assert e.num_steps < len(got.token_ids)


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 6])
def test_max_tokens_is_exact(oracle, max_tokens):
    e = mock_engine(speculative_config=SPEC)
    out = run(e, PROMPT, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    assert out.token_ids == continuation(PROMPT, max_tokens, len(PROMPT))
    drafts = [r.num_draft for s in e.runner.steps for r in s.rows]
    assert all(1 + len(PROMPT) + sum(drafts[:i + 1]) + i <= len(PROMPT) + max_tokens for i in range(len(drafts)))


def test_max_model_len_bounds_the_drafts(oracle):
    e = mock_engine(speculative_config=SPEC, max_model_len=24)
    out = run(e, PROMPT, SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    assert out.token_ids == continuation(PROMPT, 19, len(PROMPT)) and out.finish_reason == "length"
    for s in e.runner.steps:
        for r in s.rows:
            assert r.start_pos + len(r.token_ids) <= 24 - 1


def test_min_tokens_and_logit_bias_apply_at_every_verified_position(oracle):
    seq = continuation(PROMPT, 10, len(PROMPT))
    # the oracle drafts the unconstrained continuation: the bias makes token seq[3] + 0 lose at output 3
    sp = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=10, stop_token_ids=[seq[6]],
                        logit_bias={seq[3]: -5.0}, ignore_eos=True)
    plain = run(mock_engine(), PROMPT, sp)
    assert plain.token_ids[:3] == seq[:3] and plain.token_ids[3] != seq[3]
    e = mock_engine(speculative_config=SPEC)
    assert run(e, PROMPT, sp).token_ids == plain.token_ids


def test_logprob_and_structured_requests_do_not_draft(oracle):
    e = mock_engine(speculative_config=SPEC)
    out = run(e, PROMPT, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1))
    assert out.token_ids == continuation(PROMPT, 6, len(PROMPT)) and len(out.logprobs) == 6
    assert all(r.num_draft == 0 for s in e.runner.steps for r in s.rows)
    assert e.stats()["spec_draft_tokens"] == 0


def test_batched_requests_with_and_without_drafts(oracle):
    sp = SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True)
    e = mock_engine(speculative_config=SPEC)
    prompts = [PROMPT, [1, 2, 3], [200, 100, 50, 25]]
    ids = [e.add_request(p, sp if i != 1 else SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True,
                                                             logprobs=0)) for i, p in enumerate(prompts)]
    done = {}
    while e.has_unfinished():
        done.update((o.request_id, o.outputs[0].token_ids) for o in e.step() if o.finished)
    for rid, p in zip(ids, prompts):
        oracle["prompt_len"] = len(p)
        assert done[rid] == continuation(p, 11, len(p))
    assert e.scheduler.kv.stats()["blocks_used"] == 0


def test_speculation_is_refused_on_jax_and_checked():
    with pytest.raises(ValueError, match="backend jax"):
        build_config(mock_spec(), model="mock", platform="cpu", backend="jax", dtype="float32", free_bytes=2**34,
                     max_model_len=256, num_blocks=64, speculative_config=SPEC)
    for bad, what in (({"method": "eagle", "num_speculative_tokens": 2}, "ngram"),
                      ({"method": "ngram"}, "num_speculative_tokens"), ({"method": "ngram", "k": 2}, "unknown"),
                      ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5,
                        "prompt_lookup_max": 3}, "prompt_lookup_min")):
        with pytest.raises(ValueError, match=what):
            mock_engine(speculative_config=bad)
    conf = mock_engine(speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                           "prompt_lookup_max": 3}).config.speculative
    assert (conf.prompt_lookup_min, conf.prompt_lookup_max) == (3, 3)          # vLLM: the one given for both


def test_cli_flags_and_vllm_spelling_reach_the_engine(oracle):
    from kiln.entrypoints.args import engine_kwargs
    from kiln.entrypoints.cli import build_parser
    from kiln.serving.metrics import ServerMetrics
    parse = lambda *argv: engine_kwargs(build_parser().parse_args(["serve", *argv]))
    assert "speculative_config" not in parse()
    assert parse("--speculative", "ngram", "--num-speculative-tokens", "3", "--ngram-prompt-lookup-max", "5",
                 "--prompt-lookup-min", "2")["speculative_config"] == \
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5, "prompt_lookup_min": 2}
    kw = parse("--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}')
    e = mock_engine(speculative_config=kw["speculative_config"])
    assert (e.config.speculative.num_speculative_tokens, e.config.speculative.prompt_lookup_min) == (2, 3)
    oracle["wrong"] = (1,)
    run(e, PROMPT, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    text = "\n".join(f"{m.name} {s.value}" for m in ServerMetrics(e.stats).registry.collect() for s in m.samples)
    # drafts 2, 2, 2 (outputs 1 -> 3 -> 5 -> 7), then 0 (8 - 7 - 1): the first of each accepted
    assert "kiln_spec_draft_tokens 6.0" in text and "kiln_spec_accepted_tokens 3.0" in text
    assert "kiln_spec_acceptance_rate 0.5" in text
