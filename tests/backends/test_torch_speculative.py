"""Speculative decoding on the torch backend, against independent references.

Greedy: a tiny random Llama in float32, n-gram speculation on, must produce transformers' float32 greedy tokens
on repetitive prompts, with drafts accepted (the verify steps ran and some of them were right).
Sampled: the verify path (backends/verify.expand, the torch sampler's seeded draw per position, then
engine/speculative.accepted) over many seeds must emit tokens distributed as the hand-computed target
softmax, accept the draft with probability p(draft), and after a rejection follow p with the draft removed and
renormalised (chi-square bounds; the seeds are fixed, so the test is deterministic)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.backends import inputs as I
from kiln.backends import verify
from kiln.backends.base import StepResult
from kiln.backends.torch import sampler
from kiln.engine.scheduler_output import ScheduledRow
from kiln.engine.speculative import accepted
from tests.backends.test_model_vs_hf import LAZY, hf_greedy
from tests.tiny import load_hf, save_tiny_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("spec-llama"), "llama-gqa")
    return folder, load_hf(folder)


def test_greedy_with_speculation_matches_transformers(tiny_llama):
    folder, hf = tiny_llama
    llm = LLM(model=str(folder), backend="torch", dtype="float32", max_model_len=160, kv_cache_gib=0.01,
              max_num_seqs=4, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                                  "prompt_lookup_max": 3, "prompt_lookup_min": 1}, **LAZY)
    prompts = [[5, 17, 33, 81, 120, 7] * 5, [200, 3, 3, 9, 44] * 4 + [200, 3]]
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    outs = llm.generate(prompts, sp)            # both rows in one batch: verify steps of two rows
    for p, o in zip(prompts, outs):
        want = hf_greedy(hf, p, 40)
        assert o.outputs[0].token_ids == want, f"prompt of {len(p)}: kiln {o.outputs[0].token_ids} != {want}"
    st = llm.engine.stats()
    assert st["spec_draft_tokens"] > 0 and st["spec_accepted_tokens"] > 0, st
    assert llm.engine.num_steps < 2 * 40      # fewer steps than one token per step per row


def test_verify_rows_beside_prefill_chunks_match_transformers(tiny_llama):
    """Speculating rows in the same (mixed) steps as a long prompt's chunks: still transformers' greedy tokens."""
    folder, hf = tiny_llama
    llm = LLM(model=str(folder), backend="torch", dtype="float32", max_model_len=160, kv_cache_gib=0.01,
              max_num_seqs=4, max_num_batched_tokens=16, long_prefill_token_threshold=16,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2,
                                  "prompt_lookup_min": 1}, **LAZY)
    kinds = []
    execute = llm.engine.runner.execute
    llm.engine.runner.execute = lambda step: kinds.append((step.kind, any(r.num_draft for r in step.rows))) \
        or execute(step)
    prompts = [[5, 17, 33, 81] * 2, [9, 4, 9, 4, 9], list(range(100, 228))]   # the third: chunks in ~12 steps
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(prompts, sp)
    assert ("mixed", True) in kinds, kinds
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 24), len(p)


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 4)])
def test_rejection_rule_emits_the_target_distribution(temperature, top_k):
    V, N, draft = 6, 20000, 1
    logits0 = np.array([1.0, 0.4, -0.3, 0.9, -1.5, 0.0], np.float32)      # position 0: verifies the draft
    logits1 = np.array([0.0, 2.0, 0.5, -1.0, 0.3, 1.1], np.float32)       # position 1: the bonus token
    def target(lg):                                                       # the hand-computed p (top-k, /T)
        z = lg / temperature
        if top_k:
            z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
        e = np.exp(z - z.max())
        return e / e.sum()
    p0, p1 = target(logits0), target(logits1)
    sp = SamplingParams(temperature=temperature, top_k=top_k)
    rows = [ScheduledRow(f"r{i}", [3, draft], 10, [1], True, sp, seed=i, output_index=4, prompt_len=8, history=[],
                         eos_token_ids=(), num_draft=1) for i in range(N)]
    virtual = verify.expand(rows)                                         # [2N]: position 0, 1 of each row
    assert [v.output_index for v in virtual[:2]] == [4, 5]
    logits = torch.from_numpy(np.tile(np.stack([logits0, logits1]), (N, 1)))   # [2N, V]
    st = I.sampling_tensors(virtual, batch=len(virtual), history_len=1, vocab_size=V)
    out = sampler.sample(logits, st)
    res = verify.regroup(rows, StepResult(out.tokens.tolist(), out.logprobs.tolist(), None))
    emitted = [accepted([draft], s) for s in res.spec_tokens]
    first = np.bincount([e[0] for e in emitted], minlength=V)
    ok = np.array([len(e) == 2 for e in emitted])
    # the first emitted token ~ p0 (dof <= 5: the 1e-4 tail is below 26)
    assert _chi2(first, p0) < 26
    # the draft is accepted with probability p0(draft): within 4 sigma
    assert abs(ok.mean() - p0[draft]) < 4 * np.sqrt(p0[draft] * (1 - p0[draft]) / N)
    # after a rejection: p0 without the draft, renormalised
    rest = np.delete(p0, draft) / (1 - p0[draft])
    assert _chi2(np.delete(np.bincount([e[0] for e, a in zip(emitted, ok) if not a], minlength=V), draft),
                 rest) < 26
    # after an acceptance, the bonus token ~ p1
    assert _chi2(np.bincount([e[1] for e, a in zip(emitted, ok) if a], minlength=V), p1) < 26
