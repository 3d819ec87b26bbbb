"""Token sampling inside the compiled step: pure jnp, one row of parameters per sequence.

Order of operations per row (vLLM v1's sampler):

    raw logits ──> logprobs (log_softmax of the raw logits: sampled token + top-K)
        │
        ├─ grammar bitmask (structured outputs: tokens a row's mask does not allow -> -inf)
        ├─ logit bias, min_tokens (stop/eos ids -> -inf while active)
        ├─ penalties: repetition (prompt + output), frequency and presence (output)   [lax.cond: any row]
        ├─ greedy rows: argmax
        └─ other rows [lax.cond: any]: / temperature, min_p [lax.cond], top-k + top-p [lax.cond, sort], then an
           inverse-CDF draw with one uniform from the key fold_in(key(seed), step), so a row's draw does not
           depend on the rest of the batch.

The host side, `SamplingTensors` and `build_sampling_tensors` (the batch's `SamplingParams` as padded numpy
arrays, each row with its own eos ids), lives in kiln/backends/inputs.py, shared with the torch sampler; it is
re-exported here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kiln.backends.inputs import (MAX_LOGIT_BIAS, MAX_STOP_IDS, SamplingTensors, build_sampling_tensors,
                                  check_supported)
from kiln.engine.sampling_params import GREEDY_TEMPERATURE_EPS  # one greedy threshold for host and graph

__all__ = ["MAX_LOGIT_BIAS", "MAX_STOP_IDS", "SampleOutput", "SamplingTensors", "apply_bitmask", "apply_min_p", "apply_penalties",
           "apply_top_k_top_p", "argmax", "build_sampling_tensors", "check_supported", "draw", "sample",
           "truncate_top_k_top_p", "TOP_CANDIDATES"]


class SampleOutput(NamedTuple):
    """What one sampling step returns."""

    tokens: jax.Array  # [B] i32 sampled token ids
    logprobs: jax.Array  # [B] f32 logprob of the sampled token under the raw logits
    top_ids: jax.Array  # [B, K] i32 top-K token ids (K = num_logprobs, may be 0)
    top_logprobs: jax.Array  # [B, K] f32 their logprobs


def _scatter_rows(x: jax.Array, ids: jax.Array, values: jax.Array, *, op: str) -> jax.Array:
    """x[b, ids[b, j]] (op)= values[b, j] for ids >= 0; negative ids are dropped."""
    batch, vocab = x.shape
    rows = jnp.arange(batch)[:, None]  # [B, 1]
    cols = jnp.where(ids >= 0, ids, vocab)  # [B, N] out of range -> dropped
    ref = x.at[rows, cols]
    return ref.add(values, mode="drop") if op == "add" else ref.set(values, mode="drop")


def apply_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """Tokens not allowed by a row's bitmask [B, W] i32 (bit t % 32 of word t // 32; all -1 = no mask) -> -inf."""
    batch, vocab = logits.shape
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)[None, None, :]) & 1  # [B, W, 32]
    allowed = bits.reshape(batch, -1)[:, :vocab] > 0  # [B, V]
    return jnp.where(allowed, logits, -jnp.inf)  # [B, V]


def apply_penalties(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    """vLLM penalties: repetition over prompt + output tokens, frequency and presence over output tokens."""
    hist = t.history  # [B, C] -1 padded, dropped by the scatters
    is_output = jnp.arange(hist.shape[1])[None, :] >= t.prompt_lens[:, None]  # [B, C]
    out_counts = _scatter_rows(jnp.zeros_like(logits), hist, is_output.astype(jnp.float32), op="add")  # [B, V]
    seen = _scatter_rows(jnp.zeros(logits.shape, jnp.bool_), hist, jnp.ones(hist.shape, jnp.bool_), op="set")  # [B, V]
    rep = t.repetition_penalty[:, None]  # [B, 1]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)  # [B, V]
    logits = logits - t.frequency_penalty[:, None] * out_counts  # [B, V]
    return logits - t.presence_penalty[:, None] * (out_counts > 0).astype(jnp.float32)  # [B, V]


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drop tokens whose probability is below min_p times the top token's."""
    probs = jax.nn.softmax(logits, axis=-1)  # [B, V]
    keep = probs >= min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)  # [B, V]
    return jnp.where(keep, logits, -jnp.inf)  # [B, V]


def apply_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep the top_k most likely tokens, then the smallest nucleus of those whose mass reaches top_p.

    Implemented with one descending sort and a per-row threshold logit (ties at the threshold are kept).
    """
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    ranks = jnp.arange(vocab)[None, :]  # [1, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]  # [B, 1]
    in_k = ranks < k  # [B, V]
    probs = jax.nn.softmax(jnp.where(in_k, sorted_desc, -jnp.inf), axis=-1)  # [B, V] renormalised over top-k
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V] exclusive cumulative mass
    keep = in_k & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0))  # [B, V] rank 0 always kept
    num_keep = jnp.sum(keep, axis=-1, keepdims=True)  # [B, 1]
    threshold = jnp.take_along_axis(sorted_desc, num_keep - 1, axis=-1)  # [B, 1]
    return jnp.where(logits >= threshold, logits, -jnp.inf)  # [B, V]


def argmax(x: jax.Array) -> jax.Array:
    """Row-wise first index of the maximum, [B, V] -> [B] i32. Two plain reductions: XLA:CPU runs jnp.argmax's
    (value, index) pair reduction ~6x slower on a [64, 49152] batch of logits."""
    m = jnp.max(x, axis=-1, keepdims=True)  # [B, 1]
    idx = jnp.where(x == m, jnp.arange(x.shape[-1], dtype=jnp.int32)[None, :], x.shape[-1])  # [B, V]
    # rows of NaN logits match nothing: clamp to the vocabulary, so no token id past it ever leaves the sampler
    return jnp.minimum(jnp.min(idx, axis=-1), x.shape[-1] - 1).astype(jnp.int32)  # [B]


_CDF_BLOCK = 512

TOP_CANDIDATES = 256
"""Top-k / top-p look at this many most likely tokens (a partial top-k, not a sort of the vocabulary); a row
whose top-k is larger, or whose nucleus is not closed within them, sends the batch to the full sort."""


def truncate_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """`apply_top_k_top_p` without sorting the vocabulary when the kept set lies within TOP_CANDIDATES."""
    batch, vocab = logits.shape
    kc = min(TOP_CANDIDATES, vocab)
    vals, _ = jax.lax.top_k(logits, kc)  # [B, KC] descending
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)  # [B, 1]
    ranks = jnp.arange(kc)[None, :]  # [1, KC]
    k = jnp.where(top_k > 0, top_k, vocab)[:, None]  # [B, 1]
    in_k = ranks < k  # [B, KC]
    k_within = k <= kc  # [B, 1] top-k set fully among the candidates
    probs = jnp.exp(vals - lse)  # [B, KC] under the full softmax
    probs = jnp.where(in_k, probs, 0.0)
    probs = jnp.where(k_within, probs / jnp.sum(probs, axis=-1, keepdims=True), probs)  # renormalised over top-k
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, KC]
    p = top_p[:, None]
    keep = in_k & ((mass_before < p) | (p >= 1.0))  # [B, KC]
    # the nucleus of the full distribution (top-k off) closes among the candidates when their mass reaches p
    closed = k_within | ((top_k[:, None] == 0) & (p < 1.0) & (jnp.sum(probs, axis=-1, keepdims=True) >= p))
    needs = (top_k > 0) | (top_p < 1.0)  # [B]
    ok = jnp.all(~needs | closed[:, 0])
    threshold = jnp.take_along_axis(vals, jnp.sum(keep, axis=-1, keepdims=True) - 1, axis=-1)  # [B, 1]
    fast = jnp.where(needs[:, None] & (logits < threshold), -jnp.inf, logits)  # [B, V]
    return jax.lax.cond(ok, lambda: fast, lambda: apply_top_k_top_p(logits, top_k, top_p))


def draw(logits: jax.Array, seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """One token per row from softmax(logits) [B, V] by inverse CDF, with one uniform per row from the key
    fold_in(key(seed), step): a row's draw does not depend on the rest of the batch. The CDF is walked in two
    levels (block sums, then one block) instead of a cumulative sum over the whole vocabulary."""
    batch, vocab = logits.shape
    u = jax.vmap(lambda s, n: jax.random.uniform(jax.random.fold_in(jax.random.key(s), n)))(seeds, steps)  # [B]
    pad = (-vocab) % _CDF_BLOCK
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # [B, V] unnormalised
    probs = jnp.pad(probs, ((0, 0), (0, pad))).reshape(batch, -1, _CDF_BLOCK)  # [B, NBLK, BLK]
    block_mass = jnp.sum(probs, axis=-1)  # [B, NBLK]
    cum = jnp.cumsum(block_mass, axis=-1)  # [B, NBLK]
    target = u[:, None] * cum[:, -1:]  # [B, 1]
    # the first block, then the first token, whose cumulative mass passes the target (zero-mass ones never do)
    blk = jnp.minimum(jnp.sum(cum <= target, axis=-1), cum.shape[-1] - 1)  # [B]
    before = jnp.take_along_axis(cum - block_mass, blk[:, None], axis=-1)  # [B, 1]
    inner = jnp.take_along_axis(probs, blk[:, None, None], axis=1)[:, 0]  # [B, BLK]
    inner_cum = jnp.cumsum(inner, axis=-1) + before  # [B, BLK]
    pos = jnp.minimum(jnp.sum(inner_cum <= target, axis=-1), _CDF_BLOCK - 1)  # [B]
    token = blk * _CDF_BLOCK + pos  # [B]
    # rounding at a block edge could land on a padded or filtered-out token: take the top token instead
    return jnp.where(jnp.take_along_axis(jnp.pad(logits, ((0, 0), (0, pad)), constant_values=-jnp.inf),
                                         token[:, None], axis=-1)[:, 0] > -jnp.inf,
                     token, argmax(logits)).astype(jnp.int32)  # [B]


def sample(logits: jax.Array, t: SamplingTensors, *, num_logprobs: int = 0,
           want_logprobs: jax.Array | bool = True) -> SampleOutput:
    """Sample one token per row of `logits` [B, V] under the per-row parameters `t`.

    `num_logprobs` (static) is how many top logprobs to return per row; 0 skips the top-k entirely.
    `want_logprobs` (a traced bool) False skips the sampled tokens' logprobs (returned as 0).
    A batch of plain greedy rows (no penalty, bias or min_tokens) takes only the argmax.
    """
    logits = logits.astype(jnp.float32)  # [B, V]
    batch, vocab = logits.shape
    is_greedy = t.temperature < GREEDY_TEMPERATURE_EPS  # [B]
    any_penalty = jnp.any(
        (t.repetition_penalty != 1.0) | (t.frequency_penalty != 0.0) | (t.presence_penalty != 0.0)
    )
    plain = jnp.all(is_greedy) & ~any_penalty & jnp.all(t.bias_ids < 0) & ~jnp.any(t.min_tokens_active) \
        & jnp.all(t.bitmask == -1)

    def processed_tokens(logits):
        if t.bitmask.shape[-1]:  # static: a batch built with the vocabulary size carries masks
            logits = jax.lax.cond(jnp.any(t.bitmask != -1), apply_bitmask, lambda x, _: x, logits, t.bitmask)
        logits = _scatter_rows(logits, t.bias_ids, t.bias_values, op="add")  # [B, V]
        stop_ids = jnp.where(t.min_tokens_active[:, None], t.stop_ids, -1)  # [B, NS]
        logits = _scatter_rows(logits, stop_ids, jnp.full(stop_ids.shape, -jnp.inf), op="set")  # [B, V]
        logits = jax.lax.cond(any_penalty, apply_penalties, lambda x, _: x, logits, t)  # [B, V]
        greedy_tokens = argmax(logits)  # [B]

        def random_tokens(logits):
            temperature = jnp.where(is_greedy, 1.0, t.temperature)  # [B]
            scaled = logits / temperature[:, None]  # [B, V]
            min_p = jnp.where(is_greedy, 0.0, t.min_p)  # [B]
            scaled = jax.lax.cond(jnp.any(min_p > 0.0), apply_min_p, lambda x, _: x, scaled, min_p)  # [B, V]
            top_k = jnp.where(is_greedy, 0, t.top_k)  # [B]
            top_p = jnp.where(is_greedy, 1.0, t.top_p)  # [B]
            needs_sort = jnp.any(top_k > 0) | jnp.any(top_p < 1.0)
            scaled = jax.lax.cond(
                needs_sort, truncate_top_k_top_p, lambda x, *_: x, scaled, top_k, top_p
            )  # [B, V]
            return jnp.where(is_greedy, greedy_tokens, draw(scaled, t.seeds, t.steps))  # [B]

        # an all-greedy batch draws no random numbers at all
        return jax.lax.cond(jnp.all(is_greedy), lambda _: greedy_tokens, random_tokens, logits)  # [B]

    tokens = jax.lax.cond(plain, argmax, processed_tokens, logits)  # [B]
    token_logprobs = jax.lax.cond(
        want_logprobs,
        lambda x: jnp.take_along_axis(x, tokens[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(x, axis=-1),
        lambda x: jnp.zeros((batch,), jnp.float32), logits)  # [B] under the raw logits
    if num_logprobs > 0:
        top_logprobs, top_ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), num_logprobs)  # [B, K]
        top_ids = top_ids.astype(jnp.int32)  # [B, K]
    else:
        top_logprobs = jnp.zeros((batch, 0), jnp.float32)  # [B, 0]
        top_ids = jnp.zeros((batch, 0), jnp.int32)  # [B, 0]
    return SampleOutput(tokens, token_logprobs, top_ids, top_logprobs)
