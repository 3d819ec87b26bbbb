"""Token sampling for the torch backend, in torch on the logits where the model left them: no copy to another
framework. Semantics are those of the reference, kiln/kernels/sampling.py (vLLM v1's order), row by row:

    raw logits [n, V] ──> logsumexp, top-N logprobs (only when some row asked)
        ├─ grammar bitmask (structured outputs: disallowed tokens -> -inf)                 process()
        ├─ logit bias, min_tokens (the row's own eos + stop ids -> -inf while active)
        ├─ penalties: repetition (prompt + output), frequency and presence (output)        [rows that have them]
        ├─ greedy rows: argmax (first index of the maximum)
        └─ other rows: / temperature, min_p, then top-k / top-p decided from a partial topk (CANDIDATE_WIDTHS;
           a full sort only for rows whose kept set is not among them), then an inverse-CDF draw over the
           kept tokens with one uniform per row, u = splitmix64(seed, output_index): a row's token depends
           only on its logits, its seed and its step, never on the rest of the batch.

A batch of plain greedy rows without logprobs is one argmax (`TorchRunner` checks that before calling here).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from kiln.backends.inputs import SamplingTensors
from kiln.engine.sampling_params import GREEDY_TEMPERATURE_EPS

CANDIDATE_WIDTHS = (256,)
"""Top-k / top-p look at this many most likely tokens of a row (then at each next width) before sorting the
whole row, as the reference's truncate_top_k_top_p: the kept set is the same, only the cost differs. One width:
torch's CPU topk costs about as much per call as its k, and the nucleus of top_p 0.95 at temperature 0.8 of
the default model stays within 256 tokens on W1 prompts (median 53, max 147 measured), so a second width costs
more than it saves."""

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class Sampled(NamedTuple):
    tokens: torch.Tensor     # [n] i64 sampled token ids
    logprobs: torch.Tensor   # [n] f32 their logprobs under the raw logits (0 when not asked)
    top_ids: torch.Tensor    # [n, K] i64 the K most likely tokens under the raw logits (K = num_logprobs)
    top_logprobs: torch.Tensor  # [n, K] f32


def uniforms(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """One uniform in [0, 1) per row from splitmix64 of (seed << 32 | step): counter based, batch independent."""
    with np.errstate(over="ignore"):
        z = (seeds.astype(np.uint64) << np.uint64(32)) | (steps.astype(np.uint64) & np.uint64(0xFFFFFFFF))  # [n]
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53   # [n]


def apply_penalties(x: torch.Tensor, history: np.ndarray, prompt_lens: np.ndarray, repetition: np.ndarray,
                    frequency: np.ndarray, presence: np.ndarray) -> torch.Tensor:
    """vLLM penalties on rows x [m, V]: repetition over prompt + output ids (history [m, C], -1 padded),
    frequency and presence over output ids (history[b, prompt_lens[b]:])."""
    m, V = x.shape
    hist = torch.from_numpy(history).long()                                        # [m, C]
    valid = hist >= 0
    idx = torch.where(valid, hist, V)                                              # [m, C] padding -> column V
    is_out = (torch.arange(hist.shape[1])[None] >= torch.from_numpy(prompt_lens).long()[:, None]) & valid
    counts = torch.zeros(m, V + 1).scatter_add_(1, idx, is_out.float())[:, :V]     # [m, V] output counts
    seen = torch.zeros(m, V + 1).scatter_(1, idx, 1.0)[:, :V] > 0                  # [m, V] in prompt or output
    rep = torch.from_numpy(repetition)[:, None]                                    # [m, 1]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - torch.from_numpy(frequency)[:, None] * counts
    return x - torch.from_numpy(presence)[:, None] * (counts > 0).float()          # [m, V]


def apply_bitmask(x: torch.Tensor, bitmask: np.ndarray) -> torch.Tensor:
    """Tokens a row's bitmask [n, W] i32 does not allow -> -inf on x [n, V], in place (rows of all -1 untouched)."""
    n, V = x.shape
    rows = np.nonzero((bitmask[:n] != -1).any(-1))[0] if bitmask.shape[-1] else np.zeros(0, np.int64)
    if rows.size:
        bits = torch.from_numpy(bitmask[rows])                                     # [g, W]
        allowed = ((bits[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).bool()   # [g, W, 32]
        allowed = allowed.reshape(len(rows), -1)[:, :V]                            # [g, V]
        r = torch.from_numpy(rows)
        x[r] = x[r].masked_fill(~allowed, float("-inf"))
    return x


def process(x: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """Grammar bitmask, logit bias, min_tokens suppression and penalties on x [n, V] (in place where it can);
    returns x."""
    n, V = x.shape
    apply_bitmask(x, st.bitmask)
    bias = st.bias_ids[:n]                                                         # [n, NB]
    r, j = np.nonzero(bias >= 0)
    if r.size:
        x.index_put_((torch.from_numpy(r), torch.from_numpy(bias[r, j]).long()),
                     torch.from_numpy(st.bias_values[:n][r, j]), accumulate=True)
    stop = np.where(st.min_tokens_active[:n, None], st.stop_ids[:n], -1)           # [n, NS] the row's own ids
    r, j = np.nonzero(stop >= 0)
    if r.size:
        x[torch.from_numpy(r), torch.from_numpy(stop[r, j]).long()] = float("-inf")
    pen = np.nonzero((st.repetition_penalty[:n] != 1.0) | (st.frequency_penalty[:n] != 0.0)
                     | (st.presence_penalty[:n] != 0.0))[0]
    if pen.size:
        rows = torch.from_numpy(pen)
        x[rows] = apply_penalties(x[rows], st.history[pen], st.prompt_lens[pen], st.repetition_penalty[pen],
                                  st.frequency_penalty[pen], st.presence_penalty[pen])
    return x


def temper(x: torch.Tensor, temperature: np.ndarray, min_p: np.ndarray) -> torch.Tensor:
    """Rows x [m, V] / temperature, then min_p: drop tokens less likely than min_p x the top token's."""
    scaled = x / torch.from_numpy(temperature)[:, None]                            # [m, V]
    if (min_p > 0).any():
        top = scaled.max(-1, keepdim=True).values                                  # [m, 1]
        floor = top + torch.from_numpy(np.log(np.maximum(min_p, 1e-30))).float()[:, None]
        floor = torch.where(torch.from_numpy(min_p > 0)[:, None], floor, float("-inf"))
        scaled = scaled.masked_fill(scaled < floor, float("-inf"))  # p/p_max >= min_p <=> s - s_max >= log min_p
    return scaled


def _nucleus(probs: torch.Tensor, top_k: np.ndarray, top_p: np.ndarray, vocab: int):
    """Over each row's K most likely tokens, probs [m, K] (descending, under the row's full softmax): how many
    the top-k then top-p rule keeps [m], and whether that is decided within the K (closed [m])."""
    K = probs.shape[1]
    k = torch.from_numpy(np.where(top_k > 0, top_k, vocab)).long()[:, None]       # [m, 1]
    p = torch.from_numpy(top_p).float()[:, None]                                   # [m, 1]
    in_k = torch.arange(K)[None] < k                                               # [m, K]
    k_within = k <= K                                                              # [m, 1] top-k set among the K
    probs = probs.masked_fill(~in_k, 0.0)
    mass = probs.sum(-1, keepdim=True)
    probs = torch.where(k_within, probs / mass, probs)                             # renormalised over top-k
    before = probs.cumsum(-1) - probs                                              # [m, K] exclusive cumulative
    keep = in_k & ((before < p) | (p >= 1.0))                                      # rank 0 always kept
    closed = k_within | (torch.from_numpy(top_k == 0)[:, None] & (p < 1.0) & (mass >= p))  # nucleus closes
    return keep.sum(-1), closed[:, 0]


class Candidates(NamedTuple):
    rows: torch.Tensor   # [g] which rows of the sampled set
    vals: torch.Tensor   # [g, K] logits (candidates descending, or the whole row)
    ids: torch.Tensor | None  # [g, K] their token ids (None: the whole row, ids = positions)
    keep: torch.Tensor   # [g, K] bool, the kept tokens


def _rows(x: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """x[rows] without a copy when rows are all of x's rows in order."""
    return x if len(rows) == len(x) and (rows == np.arange(len(x))).all() else x[torch.from_numpy(rows)]


def truncate(scaled: torch.Tensor, top_k: np.ndarray, top_p: np.ndarray) -> list[Candidates]:
    """Each row's kept tokens after top-k / top-p, as groups of rows: decided from the CANDIDATE_WIDTHS most
    likely tokens where the rule closes among them, else from a full sort; the whole row where neither is on.
    Ties with the last kept logit are kept (as the reference's threshold)."""
    m, V = scaled.shape
    needs = (top_k > 0) | (top_p < 1.0)                                            # [m]
    groups = []
    if (~needs).any():
        rows = np.nonzero(~needs)[0]
        whole = _rows(scaled, rows)
        groups.append(Candidates(torch.from_numpy(rows), whole, None, whole > float("-inf")))
    left = np.nonzero(needs)[0]                                                    # rows not decided yet
    if not left.size:
        return groups
    x = _rows(scaled, left)                                                        # [g, V]
    probs = torch.softmax(x, -1)                                                   # [g, V] one fused pass
    at = np.arange(len(left))                                                      # rows of x still open
    for width in (*CANDIDATE_WIDTHS, V):
        if not at.size:
            break
        xs = _rows(x, at)
        if width < V:
            vals, ids = xs.topk(width, -1)                                         # [a, K] descending
        else:                                                                      # the nucleus is wider
            vals, ids = xs.sort(-1, descending=True)
        pc = probs[torch.from_numpy(at)[:, None], ids]                              # [a, K] their probabilities
        count, closed = _nucleus(pc, top_k[left[at]], top_p[left[at]], V)
        done = closed.numpy()
        if done.any():
            sel = torch.from_numpy(np.nonzero(done)[0])
            v, i = vals[sel], ids[sel]
            keep = v >= v.gather(1, (count[sel] - 1)[:, None])                     # [g, K] a prefix: >= last kept
            cut = int(keep.sum(-1).max())                                          # the draw reads only the prefix
            groups.append(Candidates(torch.from_numpy(left[at[done]]), v[:, :cut], i[:, :cut], keep[:, :cut]))
        at = at[~done]
    return groups


def _inverse_cdf(vals: torch.Tensor, keep: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index [g] drawn from softmax(vals) over the kept entries [g, K] by inverse CDF with uniforms u [g]."""
    top = vals.max(-1, keepdim=True).values
    p = torch.exp(vals - top).masked_fill(~keep, 0.0)                              # [g, K] unnormalised
    cdf = p.double().cumsum(-1)                                                    # [g, K]
    target = (u * cdf[:, -1])[:, None]                                             # [g, 1]
    idx = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=vals.shape[1] - 1)  # first cdf > target
    bad = ~keep.gather(1, idx[:, None])[:, 0]                                      # rounding at the very end
    return torch.where(bad, vals.masked_fill(~keep, float("-inf")).argmax(-1), idx)


@torch.inference_mode()
def filtered_logits(logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
    """What the draw samples from, [n, V]: processed logits, and for sampled rows tempered, min_p and
    top-k / top-p filtered (-inf outside the kept set). For tests against the reference; sample() does not
    build it."""
    x = process(logits.clone(), st)
    n, V = x.shape
    rows = np.nonzero(st.temperature[:n] >= GREEDY_TEMPERATURE_EPS)[0]
    if rows.size:
        scaled = temper(_rows(x, rows), st.temperature[rows], st.min_p[rows])
        out = torch.full_like(scaled, float("-inf"))
        for g in truncate(scaled, st.top_k[rows], st.top_p[rows]):
            kept = g.vals.masked_fill(~g.keep, float("-inf"))
            if g.ids is None:
                out[g.rows] = kept
            else:
                out[g.rows] = out[g.rows].scatter(1, g.ids, kept)
        x[torch.from_numpy(rows)] = out
    return x


@torch.inference_mode()
def sample(logits: torch.Tensor, st: SamplingTensors, *, num_logprobs: int = 0) -> Sampled:
    """One token per row of logits [n, V] (float32) under the per-row parameters st (first n rows used).
    num_logprobs > 0: the sampled tokens' logprobs and the top num_logprobs of every row (raw logits)."""
    n, V = logits.shape
    temperature = st.temperature[:n]
    modifies = bool((st.bias_ids[:n] >= 0).any() or st.min_tokens_active[:n].any() or (st.bitmask[:n] != -1).any()
                    or (st.repetition_penalty[:n] != 1.0).any() or (st.frequency_penalty[:n] != 0.0).any()
                    or (st.presence_penalty[:n] != 0.0).any())
    raw = logits
    x = process(logits.clone() if modifies and num_logprobs else logits, st) if modifies else logits
    tokens = torch.zeros(n, dtype=torch.long)
    greedy = np.nonzero(temperature < GREEDY_TEMPERATURE_EPS)[0]
    if greedy.size:
        tokens[torch.from_numpy(greedy)] = _rows(x, greedy).argmax(-1)            # first index of the maximum
    rows = np.nonzero(temperature >= GREEDY_TEMPERATURE_EPS)[0]
    if rows.size:
        scaled = temper(_rows(x, rows), temperature[rows], st.min_p[rows])         # [m, V]
        u = torch.from_numpy(uniforms(st.seeds[:n][rows], st.steps[:n][rows]))    # [m]
        drawn = torch.empty(rows.size, dtype=torch.long)
        for g in truncate(scaled, st.top_k[rows], st.top_p[rows]):
            idx = _inverse_cdf(g.vals, g.keep, u[g.rows])
            drawn[g.rows] = idx if g.ids is None else g.ids.gather(1, idx[:, None])[:, 0]
        tokens[torch.from_numpy(rows)] = drawn
    if not num_logprobs:
        empty = torch.zeros(n, 0)
        return Sampled(tokens, torch.zeros(n), empty.long(), empty)
    lse = torch.logsumexp(raw, -1)                                                 # [n]
    top_vals, top_ids = raw.topk(min(num_logprobs, V), -1)                         # [n, K]
    token_lp = raw.gather(1, tokens[:, None])[:, 0] - lse
    return Sampled(tokens, token_lp, top_ids, top_vals - lse[:, None])

