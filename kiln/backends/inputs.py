"""Host-side inputs of one step, built once in numpy for every backend.

    SchedulerOutput.rows ──> prepare_step(rows, batch=B, seq_len=T, table_width=NBT) ──> StepInputs
                         ──> sampling_tensors(rows, batch=B, history_len=C)          ──> SamplingTensors

A compiling backend (jax) pads B, T and NBT to its compiled bucket; an eager one (torch) passes the real
number of rows and the longest row's length, so it computes no padding rows. Padding rows and padded
positions point at the reserved null block 0 (slot 0), which no request owns and attention masks.
`SamplingTensors` are the per-row sampling parameters; both the JAX sampler (kernels/sampling) and the torch
sampler (backends/torch/sampler) read them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from kiln.engine.sampling_params import SamplingParams
    from kiln.engine.scheduler_output import ScheduledRow

MAX_LOGIT_BIAS = 32
"""Most logit_bias entries one request may carry (the width of SamplingTensors.bias_ids)."""

MAX_STOP_IDS = 16
"""Most eos + stop_token_ids suppressed while min_tokens is not reached (the width of SamplingTensors.stop_ids)."""


def resolve_bitmask(mask):
    """A row's token_bitmask as an array: the engine may hand a Future of it, filled while the model runs."""
    return mask.result() if hasattr(mask, "result") else mask


def is_plain_greedy(row: ScheduledRow) -> bool:
    """A row the bare argmax serves exactly (no penalty, bias or active min_tokens)."""
    sp = row.sampling_params
    return sp.greedy and not sp.has_penalties and not sp.logit_bias and row.output_index >= sp.min_tokens \
        and row.token_bitmask is None


def logprobs_wanted(rows: Sequence[ScheduledRow]) -> int:
    """1 + the most top logprobs any row asked for (the sampled token's own counts), or 0 when none asked."""
    asked = [r.sampling_params.logprobs for r in rows if r.sampling_params.logprobs is not None]
    return max(asked) + 1 if asked else 0


@dataclasses.dataclass
class StepInputs:
    """One step's model inputs, padded to [B, T] (rows >= num_rows and positions >= lens[b] are padding)."""
    tokens: np.ndarray       # [B, T] i32
    positions: np.ndarray    # [B, T] i32
    slots: np.ndarray        # [B, T] i32 block * block_size + offset; 0 (the null block) for padding
    tables: np.ndarray       # [B, NBT] i32 block tables, 0 padded
    starts: np.ndarray       # [B] i32 tokens already cached before this step (the context of a decode)
    lens: np.ndarray         # [B] i32 new tokens of each row (0 for padding rows)
    num_rows: int            # real rows

    @property
    def computed_tokens(self) -> int:
        """Positions a model step over these arrays computes: B x T."""
        return self.tokens.size


def prepare_step(rows: Sequence[ScheduledRow], *, block_size: int, batch: int, seq_len: int,
                 table_width: int) -> StepInputs:
    """The padded arrays of `rows` (batch >= len(rows), seq_len >= each row's tokens, table_width >= each table)."""
    tokens = np.zeros((batch, seq_len), np.int32)
    positions = np.zeros((batch, seq_len), np.int32)
    slots = np.zeros((batch, seq_len), np.int32)                  # padding writes land in null block 0
    tables = np.zeros((batch, table_width), np.int32)
    starts = np.zeros(batch, np.int32)
    lens = np.zeros(batch, np.int32)
    for i, r in enumerate(rows):
        n = len(r.token_ids)
        pos = np.arange(r.start_pos, r.start_pos + n)
        table = np.asarray(r.block_table, np.int32)
        tokens[i, :n] = r.token_ids
        positions[i, :n] = pos
        slots[i, :n] = table[pos // block_size] * block_size + pos % block_size
        tables[i, :len(table)] = table
        starts[i], lens[i] = r.start_pos, n
    return StepInputs(tokens, positions, slots, tables, starts, lens, len(rows))


def prompt_targets(rows: Sequence[ScheduledRow], *, batch: int, seq_len: int) -> np.ndarray:
    """[B, T] i32: position j of row i is scored against the prompt token after it (token_ids[j + 1], then
    next_token_id after the chunk); -1 where there is none or the row did not ask for prompt logprobs."""
    out = np.full((batch, seq_len), -1, np.int32)
    for i, r in enumerate(rows):
        if r.sampling_params.prompt_logprobs is None:
            continue
        n = len(r.token_ids)
        out[i, :n - 1] = r.token_ids[1:]
        out[i, n - 1] = r.next_token_id
    return out


def prompt_logprob_entries(rows: Sequence[ScheduledRow], targets: np.ndarray, target_lp: np.ndarray,
                           top_ids: np.ndarray, top_lp: np.ndarray) -> list:
    """StepResult.prompt_logprobs from [B, T] target logprobs and [B, T, K] top ones."""
    out = []
    for i, r in enumerate(rows):
        k = r.sampling_params.prompt_logprobs
        if k is None:
            out.append(None)
            continue
        out.append([None if targets[i, j] < 0 else
                    (float(target_lp[i, j]), list(zip(top_ids[i, j, :k].tolist(), top_lp[i, j, :k].tolist())))
                    for j in range(len(r.token_ids))])
    return out


def pooled_hidden(rows: Sequence[ScheduledRow], h_sum: np.ndarray, h_last: np.ndarray) -> list | None:
    """StepResult.hidden from [B, D] sums over each row's real positions and [B, D] last positions: (sum, last)
    float32 for the rows with pooling set, None for the others; None when no row pools."""
    if not any(r.pooling is not None for r in rows):
        return None
    return [None if r.pooling is None else (np.asarray(h_sum[i], np.float32), np.asarray(h_last[i], np.float32))
            for i, r in enumerate(rows)]


# -- sampling parameters ----------------------------------------------------------------------------------
class SamplingTensors(NamedTuple):
    """Per-row sampling parameters for one batch (a pytree: numpy on the host, jax arrays in a JAX graph)."""
    temperature: np.ndarray  # [B] f32, 0 = greedy
    top_k: np.ndarray  # [B] i32, 0 = off
    top_p: np.ndarray  # [B] f32, 1 = off
    min_p: np.ndarray  # [B] f32, 0 = off
    presence_penalty: np.ndarray  # [B] f32, 0 = off
    frequency_penalty: np.ndarray  # [B] f32, 0 = off
    repetition_penalty: np.ndarray  # [B] f32, 1 = off
    seeds: np.ndarray  # [B] u32 per-request seed
    steps: np.ndarray  # [B] i32 tokens generated so far (the draw's counter)
    bias_ids: np.ndarray  # [B, MAX_LOGIT_BIAS] i32 logit-bias token ids, -1 = unused
    bias_values: np.ndarray  # [B, MAX_LOGIT_BIAS] f32
    history: np.ndarray  # [B, C] i32 prompt then output token ids, -1 padded (only read when penalties are on)
    prompt_lens: np.ndarray  # [B] i32 history[b, :prompt_lens[b]] is the prompt, the rest output
    min_tokens_active: np.ndarray  # [B] bool, True while the row must not emit its stop_ids
    stop_ids: np.ndarray  # [B, MAX_STOP_IDS] i32 the row's eos + stop_token_ids, -1 = unused
    bitmask: np.ndarray  # [B, W] i32 allowed tokens (bit t % 32 of word t // 32), -1 = all; W = ceil(V / 32),
                         # 0 when the batch was built without a vocabulary size (then nothing is masked)


def check_supported(params: SamplingParams, num_eos_ids: int = 1) -> None:
    """Raise ValueError if a request needs more logit-bias or stop-id slots than the samplers have.

    Call it when a request is admitted, so that `build_sampling_tensors` never fails mid-step.
    """
    if params.logit_bias and len(params.logit_bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries, got {len(params.logit_bias)}.")
    num_stop = len(params.stop_token_ids or []) + (0 if params.ignore_eos else num_eos_ids)
    if params.min_tokens > 0 and num_stop > MAX_STOP_IDS:
        raise ValueError(
            f"min_tokens with more than {MAX_STOP_IDS} eos + stop_token_ids is not supported, got {num_stop}."
        )


def build_sampling_tensors(params_list: Sequence[SamplingParams | None], histories: Sequence[Sequence[int] | None],
                           prompt_lens: Sequence[int], eos_ids: Sequence[Sequence[int]], steps: Sequence[int],
                           seeds: Sequence[int], batch_size: int, history_len: int, vocab_size: int = 0,
                           bitmasks: Sequence[np.ndarray | None] = ()) -> SamplingTensors:
    """Pack the batch's parameters into numpy arrays padded to `batch_size` rows.

    Row i uses `params_list[i]` (None: a padding row, greedy with no penalties); `histories[i]` is its prompt
    then output ids (read only if the row has penalties; the last `history_len` are kept), `steps[i]` the
    number of tokens it generated so far and `seeds[i]` its seed (the engine draws one when params.seed is None).
    `eos_ids[i]` are row i's own end-of-sequence ids, suppressed with its stop_token_ids while min_tokens is not
    reached (unless ignore_eos). `bitmasks[i]` [ceil(vocab_size / 32)] i32 (or None) is row i's grammar mask.
    """
    n = len(params_list)
    if n > batch_size:
        raise ValueError(f"{n} rows do not fit a batch of {batch_size}.")
    B = batch_size
    temperature, top_k, top_p = np.zeros(B, np.float32), np.zeros(B, np.int32), np.ones(B, np.float32)
    min_p, presence, frequency = np.zeros(B, np.float32), np.zeros(B, np.float32), np.zeros(B, np.float32)
    repetition = np.ones(B, np.float32)
    seed_arr, step_arr = np.zeros(B, np.uint32), np.zeros(B, np.int32)
    bias_ids, bias_values = np.full((B, MAX_LOGIT_BIAS), -1, np.int32), np.zeros((B, MAX_LOGIT_BIAS), np.float32)
    history, prompt_len_arr = np.full((B, history_len), -1, np.int32), np.zeros(B, np.int32)
    min_tokens_active, stop_ids = np.zeros(B, np.bool_), np.full((B, MAX_STOP_IDS), -1, np.int32)
    bitmask = np.full((B, (vocab_size + 31) // 32), -1, np.int32)
    for i, m in enumerate(bitmasks):
        m = resolve_bitmask(m)
        if m is not None:
            if bitmask.shape[1] != len(m):
                raise ValueError(f"row {i}'s token bitmask has {len(m)} words; the batch has {bitmask.shape[1]}")
            bitmask[i] = m

    for i, p in enumerate(params_list):
        if p is None:
            continue
        check_supported(p, len(eos_ids[i]))
        temperature[i] = 0.0 if p.greedy else p.temperature
        top_k[i], top_p[i], min_p[i] = p.top_k, p.top_p, p.min_p
        seed_arr[i] = seeds[i] & 0xFFFFFFFF
        step_arr[i] = steps[i]
        if p.logit_bias:
            nb = len(p.logit_bias)
            bias_ids[i, :nb] = list(p.logit_bias.keys())
            bias_values[i, :nb] = list(p.logit_bias.values())
        if steps[i] < p.min_tokens:
            ids = list(p.stop_token_ids or []) + ([] if p.ignore_eos else list(eos_ids[i]))
            min_tokens_active[i] = True
            stop_ids[i, :len(ids)] = ids
        if p.has_penalties:
            presence[i], frequency[i], repetition[i] = p.presence_penalty, p.frequency_penalty, p.repetition_penalty
            hist = histories[i] or ()
            cut = max(len(hist) - history_len, 0)  # keep the most recent history_len tokens
            history[i, :len(hist) - cut] = hist[cut:]
            prompt_len_arr[i] = max(prompt_lens[i] - cut, 0)

    return SamplingTensors(temperature, top_k, top_p, min_p, presence, frequency, repetition, seed_arr, step_arr,
                           bias_ids, bias_values, history, prompt_len_arr, min_tokens_active, stop_ids, bitmask)


def sampling_tensors(rows: Sequence[ScheduledRow], *, batch: int, history_len: int,
                     vocab_size: int = 0) -> SamplingTensors:
    """`build_sampling_tensors` for scheduled rows, each with its own eos ids, seed, output index and mask."""
    return build_sampling_tensors([r.sampling_params for r in rows], [r.history for r in rows],
                                  [r.prompt_len for r in rows], [r.eos_token_ids for r in rows],
                                  [r.output_index for r in rows], [r.seed for r in rows], batch, history_len,
                                  vocab_size, [r.token_bitmask for r in rows])
