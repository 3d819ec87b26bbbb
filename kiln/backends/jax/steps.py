"""The functions the JAX runner compiles, one per graph family (compile/graph_key), pure over arrays:

    prefill(B, T)  tokens [B, T] ─> K/V written, logits [B, V] of each row's last real position
    score(B, T)    the same prefill, also scoring every position: prompt logprobs (the next prompt token's
                   logprob and the top-MAX_LOGPROBS, [B, T] / [B, T, K]) and the final-normed hidden state pooled
                   for embeddings (sum over the real positions and the last one, [B, D] float32 each); one graph
                   per prefill bucket serves both, built by warmup only with --warmup-scoring
    decode(B, NB)  one token per row ─> logits [B, V]
    sample(B, 0|1) logits ─> tokens, logprobs, top-N (plain greedy, or every sampling parameter)
    with_greedy    prefill/decode with the plain-greedy sampler fused in (the runner's `fused_greedy`): a
                   greedy step is one executable; other samplers take the logits it also returns
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kiln.backends.jax import model as M
from kiln.engine.sampling_params import MAX_LOGPROBS
from kiln.kernels.sampling import SampleOutput, SamplingTensors, argmax, sample
from kiln.models.spec import ModelSpec


def top_logprobs(logits, want_top):
    """The top-MAX_LOGPROBS logprobs [B, K], only when some row asked (want_top: scalar bool)."""
    B = logits.shape[0]
    top_lp, top_ids = jax.lax.cond(
        want_top, lambda x: tuple(jax.lax.top_k(jax.nn.log_softmax(x, axis=-1), MAX_LOGPROBS)),
        lambda x: (jnp.zeros((B, MAX_LOGPROBS), jnp.float32), jnp.zeros((B, MAX_LOGPROBS), jnp.int32)), logits)
    return top_ids.astype(jnp.int32), top_lp


def greedy_sample(logits, want_top):
    """Plain greedy rows: the argmax, and logprobs when asked."""
    tokens = argmax(logits)                                                # [B]
    lp = jax.lax.cond(
        want_top, lambda x: jnp.take_along_axis(x, tokens[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(x, axis=-1),
        lambda x: jnp.zeros(x.shape[:1], jnp.float32), logits)             # [B]
    return SampleOutput(tokens, lp, *top_logprobs(logits, want_top))


def with_greedy(step, *args):
    """`step` (prefill or decode) with the plain-greedy sampler on its logits, in the same graph: the args are
    the step's, then want_top. -> (k_cache, v_cache, logits [B, V], SampleOutput)"""
    *args, want_top = args
    k_cache, v_cache, logits = step(*args)
    return k_cache, v_cache, logits, greedy_sample(logits, want_top)


def general_sample(logits, st: SamplingTensors, want_top):
    """Every sampling parameter, per row (kernels/sampling.py)."""
    out = sample(logits, st, num_logprobs=0, want_logprobs=want_top)     # [B] tokens and logprobs
    top_ids, top_lp = top_logprobs(logits, want_top)
    return out._replace(top_ids=top_ids, top_logprobs=top_lp)            # [B, K]


def prefill_step(spec: ModelSpec, scale: float, params, k_cache, v_cache, tokens, positions, slots,
                  block_tables, prefix_lens, q_lens):
    attend = M.attend_fn(block_tables, prefix_lens, q_lens, scale, decode=False)
    h, k_cache, v_cache = M.forward(spec, params, k_cache, v_cache, tokens, positions, slots, attend)
    last = jnp.take_along_axis(h, jnp.maximum(q_lens - 1, 0)[:, None, None], axis=1)[:, 0]  # [B, D]
    return k_cache, v_cache, M.lm_head(params, last)                      # logits [B, V]


def _prompt_scores(params, h, targets):
    """Per position the logprob of targets [B, T] (the next prompt token; -1: none) and the top-MAX_LOGPROBS,
    under the raw logits of every position ([B, T, V] in memory)."""
    logits = M.lm_head(params, h)                                         # [B, T, V]
    lse = jax.nn.logsumexp(logits, axis=-1)                               # [B, T]
    tgt = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0] - lse   # [B, T]
    top_v, top_i = jax.lax.top_k(logits, MAX_LOGPROBS)                    # [B, T, K]
    return tgt, top_i.astype(jnp.int32), top_v - lse[..., None]


def _no_scores(params, h, targets):
    B, T = targets.shape
    return (jnp.zeros((B, T), jnp.float32), jnp.zeros((B, T, MAX_LOGPROBS), jnp.int32),
            jnp.zeros((B, T, MAX_LOGPROBS), jnp.float32))


def score_step(spec: ModelSpec, scale: float, params, k_cache, v_cache, tokens, positions, slots,
               block_tables, prefix_lens, q_lens, targets, want_lp):
    """A prefill that also scores the prompt: when want_lp (a scalar bool: some row asked for prompt logprobs)
    the logprob of every position's target and its top-K (`_prompt_scores`; skipped otherwise, as embeddings
    need no logits past the last), and always the final-normed hidden state summed over each row's real
    positions and at its last one (embeddings)."""
    attend = M.attend_fn(block_tables, prefix_lens, q_lens, scale, decode=False)
    h, k_cache, v_cache = M.forward(spec, params, k_cache, v_cache, tokens, positions, slots, attend)
    tgt, top_i, top_lp = jax.lax.cond(want_lp, _prompt_scores, _no_scores, params, h, targets)
    last_i = jnp.maximum(q_lens - 1, 0)[:, None, None]                    # [B, 1, 1]
    last_h = jnp.take_along_axis(h, last_i, axis=1)[:, 0]                 # [B, D]
    hf = h.astype(jnp.float32)                                            # [B, T, D]
    real = jnp.arange(h.shape[1])[None, :, None] < q_lens[:, None, None]  # [B, T, 1]
    h_sum = jnp.sum(jnp.where(real, hf, 0.0), axis=1)                     # [B, D]
    return k_cache, v_cache, M.lm_head(params, last_h), tgt, top_i, top_lp, h_sum, last_h.astype(jnp.float32)


def decode_step(spec: ModelSpec, scale: float, params, k_cache, v_cache, tokens, positions, slots,
                 block_tables, context_lens):
    attend = M.attend_fn(block_tables, context_lens, jnp.ones_like(context_lens), scale, decode=True)
    h, k_cache, v_cache = M.forward(spec, params, k_cache, v_cache, tokens, positions, slots, attend)
    return k_cache, v_cache, M.lm_head(params, h[:, 0])                   # logits [B, V]
