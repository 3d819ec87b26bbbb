"""The torch sampler (backends/torch/sampler.py) against the reference semantics of kiln/kernels/sampling.py.

Processed logits and kept token sets are compared with the reference functions composed in vLLM's order; greedy
tokens and logprobs with the reference `sample`; draws by their empirical frequencies over many seeds against
the softmax of the reference's filtered logits (a chi-square bound), and by batch independence.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from kiln.backends.inputs import build_sampling_tensors
from kiln.backends.torch import sampler as TS
from kiln.engine.sampling_params import GREEDY_TEMPERATURE_EPS, SamplingParams
from kiln.kernels import sampling as R

V = 1000
EOS = 7


def _tensors(params, histories=None, prompt_lens=None, steps=None, seeds=None, eos=None):
    n = len(params)
    hist = histories or [[]] * n
    return build_sampling_tensors(params, hist, prompt_lens or [0] * n, eos or [(EOS,)] * n, steps or [0] * n,
                                  seeds or list(range(n)), n, max(max(len(h) for h in hist), 1))


def _logits(n, scale=3.0, seed=0):
    return np.random.default_rng(seed).normal(0, scale, (n, V)).astype(np.float32)   # [n, V]


def _reference_filtered(logits, st):
    """The reference pipeline up to the draw: bias, min_tokens, penalties; sampled rows / temperature, min_p,
    top-k + top-p (the exact full-sort version)."""
    t = jax.tree.map(jnp.asarray, st)
    x = R._scatter_rows(jnp.asarray(logits), t.bias_ids, t.bias_values, op="add")
    stop = jnp.where(t.min_tokens_active[:, None], t.stop_ids, -1)
    x = R._scatter_rows(x, stop, jnp.full(stop.shape, -jnp.inf), op="set")
    x = R.apply_penalties(x, t)
    greedy = t.temperature < GREEDY_TEMPERATURE_EPS
    s = x / jnp.where(greedy, 1.0, t.temperature)[:, None]
    s = R.apply_min_p(s, jnp.where(greedy, 0.0, t.min_p))
    s = R.apply_top_k_top_p(s, jnp.where(greedy, 0, t.top_k), jnp.where(greedy, 1.0, t.top_p))
    return np.asarray(jnp.where(greedy[:, None], x, s))


def _assert_same_logits(got, want):
    got = got.numpy()
    assert (np.isfinite(got) == np.isfinite(want)).all(), np.nonzero(np.isfinite(got) != np.isfinite(want))
    np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-5, atol=1e-5)


PARAMS = [
    SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.4),
    SamplingParams(temperature=0.0, logit_bias={3: 5.0, 10: -100.0, 999: 2.5}),
    SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[11, 12]),
    SamplingParams(temperature=0.7, top_k=40),
    SamplingParams(temperature=1.0, top_p=0.9),
    SamplingParams(temperature=1.3, min_p=0.05),
    SamplingParams(temperature=0.8, top_k=300, top_p=0.95),          # top-k beyond the 256 candidates
    SamplingParams(temperature=0.9, top_p=0.97, min_p=0.01, repetition_penalty=0.8, logit_bias={5: 3.0}),
    SamplingParams(temperature=1.0),                                  # nothing to truncate
    SamplingParams(temperature=0.6, top_k=5, min_tokens=2, ignore_eos=True, stop_token_ids=[4],
                   logit_bias={EOS: 50.0, 4: 50.0}),                  # eos kept (ignore_eos), stop id 4 not
]
HISTORIES = [[1, 2, 3, 3, 500, 3], [], [], [], [], [], [], [7, 8, 8, 9, 0], [], []]
PROMPT_LENS = [3, 0, 0, 0, 0, 0, 0, 2, 0, 0]


def test_filtered_logits_equal_the_reference():
    logits = _logits(len(PARAMS))
    logits[4] /= 6.0                                                  # a flat row: the nucleus spans > 256 tokens
    st = _tensors(PARAMS, HISTORIES, PROMPT_LENS, steps=[0, 0, 1, 0, 0, 0, 0, 0, 0, 1])
    got = TS.filtered_logits(torch.from_numpy(logits), st)
    want = _reference_filtered(logits, st)
    _assert_same_logits(got, want)
    kept = np.isfinite(want).sum(-1)
    assert kept[4] > TS.CANDIDATE_WIDTHS[-1] and kept[3] == 40 and kept[9] == 5 and kept[8] == V
    assert np.isneginf(want[2, [EOS, 11, 12]]).all() and np.isneginf(want[9, 4]) and np.isfinite(want[9, EOS])


def test_min_tokens_uses_each_rows_own_eos():
    p = SamplingParams(temperature=0.0, min_tokens=2)
    st = _tensors([p, p, SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)],
                  eos=[(EOS,), (20, 21), (EOS,)])
    x = TS.filtered_logits(torch.zeros(3, V), st).numpy()
    assert np.isneginf(x[0, EOS]) and np.isfinite(x[0, [20, 21]]).all()
    assert np.isneginf(x[1, [20, 21]]).all() and np.isfinite(x[1, EOS])
    assert np.isfinite(x[2]).all()                                    # ignore_eos: nothing suppressed
    _assert_same_logits(torch.from_numpy(x), _reference_filtered(np.zeros((3, V), np.float32), st))


def test_greedy_tokens_and_logprobs_equal_the_reference():
    params = [SamplingParams(temperature=0.0, logprobs=5, **kw) for kw in
              ({}, {"repetition_penalty": 1.5}, {"logit_bias": {17: 4.0}}, {"min_tokens": 2}, {"top_k": 1})]
    logits = _logits(len(params), seed=1)
    st = _tensors(params, [[1, 2, 3]] * len(params), [2] * len(params))
    got = TS.sample(torch.from_numpy(logits), st, num_logprobs=6)
    want = jax.tree.map(np.asarray, R.sample(jnp.asarray(logits), jax.tree.map(jnp.asarray, st), num_logprobs=6))
    assert got.tokens.tolist() == want.tokens.tolist()
    np.testing.assert_allclose(got.logprobs.numpy(), want.logprobs, rtol=1e-5, atol=1e-5)
    assert got.top_ids.tolist() == want.top_ids.tolist()
    np.testing.assert_allclose(got.top_logprobs.numpy(), want.top_logprobs, rtol=1e-5, atol=1e-5)
    lp = torch.log_softmax(torch.from_numpy(logits), -1)          # an independent check of the sampled logprobs
    np.testing.assert_allclose(got.logprobs.numpy(), lp.gather(1, got.tokens[:, None])[:, 0].numpy(), atol=1e-5)


def test_sampled_tokens_logprobs_are_under_the_raw_logits():
    params = [SamplingParams(temperature=0.8, top_p=0.9, logit_bias={3: 9.0}, logprobs=2)] * 4
    logits = _logits(4, seed=2)
    got = TS.sample(torch.from_numpy(logits.copy()), _tensors(params), num_logprobs=3)
    lp = torch.log_softmax(torch.from_numpy(logits), -1)
    np.testing.assert_allclose(got.logprobs.numpy(), lp.gather(1, got.tokens[:, None])[:, 0].numpy(), atol=1e-5)


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the tokens of positive probability, and its degrees of freedom."""
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, top_k=6),
                                    SamplingParams(temperature=1.0, top_p=0.8),
                                    SamplingParams(temperature=1.5, min_p=0.2),
                                    SamplingParams(temperature=2.0)],
                         ids=["top_k", "top_p", "min_p", "temperature"])
def test_draws_follow_the_filtered_distribution(params):
    """4000 seeds of one row (rows are independent, so one batch of 4000): the counts must fit the softmax of
    the reference's filtered logits. chi2 < df + 6 sqrt(2 df) is far in the tail of a true fit (p < 1e-5)."""
    n = 4000
    row = np.zeros(V, np.float32)
    row[:8] = [2.0, 1.6, 1.5, 1.0, 0.7, 0.2, -0.3, -1.0]               # 8 plausible tokens, the rest unlikely
    row[8:] = -6.0
    logits = np.broadcast_to(row, (n, V)).copy()
    st = _tensors([params] * n, seeds=list(range(1000, 1000 + n)))
    tokens = TS.sample(torch.from_numpy(logits), st).tokens.numpy()
    want = _reference_filtered(logits[:1], _tensors([params]))[0]
    probs = np.exp(want - want.max())
    probs /= probs.sum()
    if params.top_k or params.top_p < 1 or params.min_p:           # the rule keeps only some tokens
        assert set(np.unique(tokens)) <= set(np.nonzero(probs > 0)[0])
    counts = np.bincount(tokens, minlength=V).astype(np.float64)
    common = probs * n >= 5                                           # pool the rare tail into one cell
    counts = np.append(counts[common], counts[~common].sum())
    probs = np.append(probs[common], probs[~common].sum())
    stat, df = _chi_square(counts, probs)
    assert stat < df + 6 * np.sqrt(2 * df), (stat, df)


def test_a_rows_draw_depends_only_on_its_seed_and_step():
    logits = _logits(16, scale=1.0, seed=3)
    params = [SamplingParams(temperature=1.0, top_p=0.95)] * 8 + [SamplingParams(temperature=0.9)] * 8
    seeds, steps = list(range(50, 66)), [i % 3 for i in range(16)]
    batch = TS.sample(torch.from_numpy(logits.copy()), _tensors(params, seeds=seeds, steps=steps)).tokens.tolist()
    alone = [TS.sample(torch.from_numpy(logits[i:i + 1].copy()), _tensors([params[i]], seeds=[seeds[i]],
                                                                          steps=[steps[i]])).tokens.item()
             for i in range(16)]
    assert batch == alone
    again = TS.sample(torch.from_numpy(logits.copy()), _tensors(params, seeds=seeds, steps=steps)).tokens.tolist()
    assert again == batch
    # another step or another seed is another uniform: over 16 rows some token changes
    other = TS.sample(torch.from_numpy(logits.copy()), _tensors(params, seeds=seeds,
                                                                steps=[s + 1 for s in steps])).tokens.tolist()
    assert other != batch


def test_uniforms_are_uniform_and_counter_based():
    u = TS.uniforms(np.arange(20000, dtype=np.uint32), np.zeros(20000, np.int32))
    assert ((0 <= u) & (u < 1)).all()
    hist = np.histogram(u, bins=20, range=(0, 1))[0]
    assert abs(hist - 1000).max() < 150                              # 20 bins of 1000 +- ~4.7 sigma
    assert TS.uniforms(np.array([7], np.uint32), np.array([3], np.int32))[0] == \
        TS.uniforms(np.array([1, 7], np.uint32), np.array([0, 3], np.int32))[1]
