"""The in-graph sampler on tiny, hand-computable vocabularies."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kiln.engine.sampling_params import SamplingParams
from kiln.kernels.sampling import (
    MAX_LOGIT_BIAS,
    SampleOutput,
    SamplingTensors,
    apply_penalties,
    build_sampling_tensors,
    sample,
)

V = 8  # vocab
B = 8  # batch bucket
C = 8  # history length
EOS = 7

sample_jit = jax.jit(sample, static_argnames="num_logprobs")
penalties_jit = jax.jit(apply_penalties)


def tensors(
    params: Sequence[SamplingParams | None],
    histories: Sequence[Sequence[int]] | None = None,
    prompt_lens: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    batch_size: int = B,
) -> SamplingTensors:
    n = len(params)
    return build_sampling_tensors(
        params,
        histories or [[]] * n,
        prompt_lens or [0] * n,
        eos_ids=[(EOS,)] * n,
        steps=steps or [0] * n,
        seeds=seeds or list(range(n)),
        batch_size=batch_size,
        history_len=C,
    )


def run(logits: np.ndarray, params: Sequence[SamplingParams | None], num_logprobs: int = 0, **kw) -> SampleOutput:
    """Sample rows of `logits` (broadcast to the batch) and return numpy outputs."""
    t = tensors(params, **kw)
    rows = t.temperature.shape[0]
    full = np.broadcast_to(np.asarray(logits, np.float32), (rows, V)) if np.ndim(logits) == 1 else logits
    out = sample_jit(jnp.asarray(full), t, num_logprobs=num_logprobs)
    return SampleOutput(*(np.asarray(x) for x in out))


def log_probs(probs: Sequence[float]) -> np.ndarray:
    """Logits with the given probabilities over the first len(probs) tokens, -inf elsewhere."""
    p = np.zeros(V, np.float64)
    p[: len(probs)] = probs
    with np.errstate(divide="ignore"):
        return np.log(p).astype(np.float32)  # [V]


LOGITS = np.array([2.0, -2.0, 1.0, 0.5, -1.0, 0.0, 3.0, -0.5], np.float32)  # [V]


def penalised(p: SamplingParams, history: list[int], prompt_len: int) -> np.ndarray:
    t = tensors([p], [history], [prompt_len], batch_size=1)
    return np.asarray(penalties_jit(jnp.asarray(LOGITS[None]), t))[0]


def test_repetition_penalty_prompt_and_output() -> None:
    # prompt [0, 1], output [2, 0]: tokens 0, 1, 2 are seen
    got = penalised(SamplingParams(repetition_penalty=2.0), [0, 1, 2, 0], prompt_len=2)
    want = LOGITS.copy()
    want[0], want[1], want[2] = 2.0 / 2, -2.0 * 2, 1.0 / 2
    np.testing.assert_array_equal(got, want)


def test_frequency_penalty_counts_output_only() -> None:
    # prompt [3, 3, 4], output [3, 5, 5, 5]: counts over the output are 3:1, 5:3
    got = penalised(SamplingParams(frequency_penalty=0.5), [3, 3, 4, 3, 5, 5, 5], prompt_len=3)
    want = LOGITS.copy()
    want[3] -= 0.5 * 1
    want[5] -= 0.5 * 3
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_presence_penalty_output_only() -> None:
    got = penalised(SamplingParams(presence_penalty=-1.5), [4, 3, 5, 5, 5], prompt_len=2)
    want = LOGITS.copy()
    want[5] += 1.5
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_all_penalties_together() -> None:
    p = SamplingParams(repetition_penalty=1.25, frequency_penalty=0.5, presence_penalty=1.0)
    got = penalised(p, [6, 1, 1, 4], prompt_len=1)  # prompt [6], output [1, 1, 4]
    want = LOGITS.copy()
    want[6] = 3.0 / 1.25
    want[1] = -2.0 * 1.25 - 0.5 * 2 - 1.0
    want[4] = -1.0 * 1.25 - 0.5 * 1 - 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_penalties_change_greedy_choice_only_in_their_row() -> None:
    greedy = SamplingParams(temperature=0.0)
    penal = SamplingParams(temperature=0.0, presence_penalty=2.0)
    out = run(LOGITS, [greedy, penal], histories=[[6, 6], [6, 6]], prompt_lens=[0, 0])
    assert out.tokens[0] == 6  # no penalty: argmax
    assert out.tokens[1] == 0  # 3.0 - 2.0 < 2.0


def test_logit_bias() -> None:
    out = run(LOGITS, [SamplingParams(temperature=0.0, logit_bias={6: -100.0}),
                       SamplingParams(temperature=0.0, logit_bias={1: 5.5, 4: 3.0})])
    assert out.tokens[:2].tolist() == [0, 1]  # 2.0 is next best; -2 + 5.5 = 3.5 beats 3.0


def test_min_tokens_suppresses_eos_and_stop_ids() -> None:
    logits = np.array([0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 9.0], np.float32)  # EOS (7) is the argmax
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[3])
    out = run(logits, [p, p, p], steps=[0, 1, 2])
    assert out.tokens[:3].tolist() == [2, 2, EOS]  # eos and stop id 3 masked until 2 tokens are out
    ignore = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)
    assert run(logits, [ignore]).tokens[0] == EOS


def test_greedy_and_top_k_1_take_argmax() -> None:
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_k=1)] + [
        SamplingParams(temperature=2.0, top_k=1, seed=s) for s in range(6)
    ]
    out = run(LOGITS, params, seeds=list(range(100, 108)))
    assert (out.tokens == 6).all()


def test_top_k_1_in_kernel_without_host_greedy_rewrite() -> None:
    t = tensors([SamplingParams(temperature=2.0)] * B)._replace(top_k=np.ones(B, np.int32))
    out = sample_jit(jnp.asarray(np.broadcast_to(LOGITS, (B, V))), t)
    assert (np.asarray(out.tokens) == 6).all()


def draws(logits: np.ndarray, p: SamplingParams, rounds: int = 8) -> np.ndarray:
    """Sample `rounds * B` tokens with distinct seeds."""
    toks = [run(logits, [p] * B, seeds=list(range(r * B, (r + 1) * B))).tokens for r in range(rounds)]
    return np.concatenate(toks)


PROBS = [0.5, 0.25, 0.15, 0.1]


def test_top_p_keeps_exactly_the_nucleus() -> None:
    toks = draws(log_probs(PROBS), SamplingParams(top_p=0.7))  # mass before token 2 is 0.75 >= 0.7
    assert set(toks.tolist()) == {0, 1}


def test_top_p_applies_after_top_k_renormalisation() -> None:
    # over the top 3, probs are 0.556, 0.278, 0.167: mass before token 2 is 0.833 >= 0.8
    toks = draws(log_probs(PROBS), SamplingParams(top_k=3, top_p=0.8))
    assert set(toks.tolist()) == {0, 1}
    toks = draws(log_probs(PROBS), SamplingParams(top_p=0.8))  # without top-k: 0.75 < 0.8 keeps token 2
    assert set(toks.tolist()) == {0, 1, 2}


def test_top_k() -> None:
    assert set(draws(log_probs(PROBS), SamplingParams(top_k=2)).tolist()) == {0, 1}


def test_min_p() -> None:
    # threshold 0.4 * 0.5 = 0.2: tokens 0 and 1 survive
    assert set(draws(log_probs(PROBS), SamplingParams(min_p=0.4)).tolist()) == {0, 1}
    # with temperature 2 the probs flatten to ~0.38, 0.27, 0.21, 0.17: all but token 3 survive 0.5 * 0.38
    assert set(draws(log_probs(PROBS), SamplingParams(min_p=0.5, temperature=2.0)).tolist()) == {0, 1, 2}


def test_temperature_sampling_matches_distribution() -> None:
    n = 4096
    t = tensors([SamplingParams(temperature=0.5)] * n, seeds=list(range(n)), batch_size=n)
    logits = np.broadcast_to(log_probs(PROBS), (n, V))
    toks = np.asarray(sample_jit(jnp.asarray(logits), t).tokens)
    freq = np.bincount(toks, minlength=V)[:4] / n
    want = np.array(PROBS) ** 2 / np.sum(np.array(PROBS) ** 2)  # temperature 0.5 squares the probs
    np.testing.assert_allclose(freq, want, atol=0.03)


def test_seeded_row_is_independent_of_the_batch() -> None:
    rng = np.random.default_rng(0)
    row = rng.normal(size=V).astype(np.float32)  # [V]
    p = SamplingParams(temperature=1.0, seed=1234)
    for step in range(4):
        alone = run(row[None], [p], seeds=[1234], steps=[step], batch_size=1).tokens[0]
        others = [
            SamplingParams(temperature=0.7, top_k=3),
            SamplingParams(temperature=0.0),
            SamplingParams(top_p=0.5, repetition_penalty=1.3, frequency_penalty=0.4),
            SamplingParams(min_p=0.2, logit_bias={2: 4.0}),
            None,
            SamplingParams(temperature=1.3, presence_penalty=1.0, min_tokens=4),
        ]
        batch_logits = rng.normal(size=(B, V)).astype(np.float32)  # [B, V]
        batch_logits[3] = row
        params = others[:3] + [p] + others[3:]
        hist = [[1, 2, 3]] * len(params)
        out = run(batch_logits, params, histories=hist, prompt_lens=[1] * len(params),
                  seeds=[7, 8, 9, 1234, 10, 11, 12], steps=[step] * len(params))
        assert out.tokens[3] == alone


def test_seed_and_step_vary_the_draw() -> None:
    flat = np.zeros(V, np.float32)
    p = SamplingParams(temperature=1.0)
    by_seed = run(flat, [p] * B, seeds=list(range(B))).tokens
    by_step = run(flat, [p] * B, seeds=[5] * B, steps=list(range(B))).tokens
    same = run(flat, [p] * B, seeds=[5] * B, steps=[3] * B).tokens
    assert len(set(by_seed.tolist())) > 1 and len(set(by_step.tolist())) > 1
    assert len(set(same.tolist())) == 1


@pytest.mark.parametrize("k", [0, 3])
def test_logprobs_are_raw_log_softmax(k: int) -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(B, V)).astype(np.float32)  # [B, V]
    params = [SamplingParams(temperature=0.8, repetition_penalty=1.5, logit_bias={0: 3.0})] * 4 + [
        SamplingParams(temperature=0.0)
    ] * 4
    out = run(logits, params, num_logprobs=k, histories=[[0, 1, 2]] * B)
    ref = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))  # [B, V]
    np.testing.assert_allclose(out.logprobs, ref[np.arange(B), out.tokens], atol=1e-6)
    assert out.top_ids.shape == out.top_logprobs.shape == (B, k)
    assert out.top_ids.dtype == np.int32 and out.tokens.dtype == np.int32
    order = np.argsort(-ref, axis=-1)[:, :k]
    np.testing.assert_array_equal(out.top_ids, order)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(ref, order, axis=-1), atol=1e-6)


def test_build_sampling_tensors_padding_and_history() -> None:
    plain = SamplingParams(temperature=0.9, top_k=-1)
    penal = SamplingParams(frequency_penalty=1.0, logit_bias={3: 1.0, 5: -2.0})
    t = build_sampling_tensors(
        [plain, penal], [[1, 2, 3], list(range(10))], [2, 6], eos_ids=[(EOS,), (EOS,)], steps=[1, 4],
        seeds=[2**32 + 5, -1],
        batch_size=4, history_len=C,
    )
    assert t.temperature.tolist() == pytest.approx([0.9, 1.0, 0.0, 0.0])  # padding rows are greedy
    assert t.top_k.tolist() == [0, 0, 0, 0] and t.repetition_penalty.tolist() == [1, 1, 1, 1]
    assert t.seeds.dtype == np.uint32 and t.seeds.tolist() == [5, 2**32 - 1, 0, 0]
    assert (t.history[0] == -1).all()  # no penalties: history left empty
    assert t.history[1].tolist() == list(range(2, 10))  # the last C tokens
    assert t.prompt_lens.tolist() == [0, 4, 0, 0]  # prompt length shifted by the 2 dropped tokens
    assert t.bias_ids[1, :3].tolist() == [3, 5, -1] and t.bias_values[1, :2].tolist() == [1.0, -2.0]
    assert t.bias_ids.shape == (4, MAX_LOGIT_BIAS)
    assert not t.min_tokens_active.any()


def test_min_tokens_suppresses_each_rows_own_eos() -> None:
    """Row 0 ignores EOS, row 1 has its own eos ids {3, 4}, row 2 the model's EOS: each row's set, no other."""
    p = SamplingParams(temperature=0.0, min_tokens=2)
    t = build_sampling_tensors([SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True), p, p],
                               [[]] * 3, [0] * 3, eos_ids=[(EOS,), (3, 4), (EOS,)], steps=[0] * 3, seeds=[0] * 3,
                               batch_size=B, history_len=C)
    assert t.stop_ids[0].tolist() == [-1] * 16 and t.stop_ids[1, :3].tolist() == [3, 4, -1]
    assert t.stop_ids[2, :2].tolist() == [EOS, -1]
    logits = np.zeros((B, V), np.float32)
    logits[:, [3, EOS]] = 5.0                          # the eos candidates are the most likely tokens
    out = sample_jit(jnp.asarray(logits), t, num_logprobs=0)
    assert np.asarray(out.tokens)[:3].tolist() == [3, EOS, 3]


def test_build_rejects_too_many_bias_entries() -> None:
    p = SamplingParams(logit_bias={i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)})
    with pytest.raises(ValueError, match="logit_bias may hold at most"):
        tensors([p])
    with pytest.raises(ValueError, match="do not fit"):
        tensors([None] * (B + 1))


def test_fast_argmax_matches_jnp_argmax_including_ties():
    from kiln.kernels.sampling import argmax
    x = jnp.asarray(np.random.default_rng(0).integers(0, 5, (16, 1000)).astype(np.float32))  # many ties
    x = x.at[3].set(-jnp.inf).at[3, 7].set(0.0)
    np.testing.assert_array_equal(np.asarray(argmax(x)), np.asarray(jnp.argmax(x, axis=-1)))


@pytest.mark.parametrize("scale", [0.3, 3.0])    # peaked rows close within the candidates, flat ones fall back
def test_candidate_truncation_equals_full_sort(scale):
    from kiln.kernels.sampling import TOP_CANDIDATES, apply_top_k_top_p, truncate_top_k_top_p
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(8, 5000)).astype(np.float32) / scale)
    top_k = jnp.asarray([0, 1, 5, 50, TOP_CANDIDATES, TOP_CANDIDATES + 1, 0, 20], jnp.int32)
    top_p = jnp.asarray([0.9, 1.0, 0.5, 0.95, 1.0, 0.8, 0.3, 1.0], jnp.float32)
    fast = jax.jit(truncate_top_k_top_p)(logits, top_k, top_p)
    full = jax.jit(apply_top_k_top_p)(logits, top_k, top_p)
    np.testing.assert_array_equal(np.isfinite(np.asarray(fast)), np.isfinite(np.asarray(full)))
