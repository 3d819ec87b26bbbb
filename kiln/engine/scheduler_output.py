"""The only contract between the scheduler and a runner: plain data, no device objects."""
from __future__ import annotations

import dataclasses
from typing import Any

from kiln.engine.sampling_params import SamplingParams


@dataclasses.dataclass
class ScheduledRow:
    request_id: str
    token_ids: list[int]          # the tokens whose K/V this step computes (a prefill chunk, or 1 for decode)
    start_pos: int                # position of token_ids[0] = tokens already in the cache for this request
    block_table: list[int]        # block ids covering positions [0, start_pos + len(token_ids))
    sample: bool                  # True when the chunk reaches the sequence end: sample the next token
    sampling_params: SamplingParams
    seed: int                     # per-request seed; the sampler keys on (seed, output_index)
    output_index: int             # how many tokens this request has generated so far
    prompt_len: int               # history[:prompt_len] is prompt, the rest output (penalties)
    history: list[int]            # prompt + output ids when the request uses penalties, else []
    eos_token_ids: tuple[int, ...]  # suppressed while min_tokens is not reached
    token_bitmask: Any = None     # np.ndarray [ceil(V/32)] i32, or a Future of one (backends/inputs.
                                  # resolve_bitmask): the tokens the row's grammar allows next (bit t of word
                                  # t // 32), set by the engine for sampled structured rows; None: all
    next_token_id: int = -1       # prompt logprobs: the prompt token after this chunk (-1: the chunk ends the
                                  # prompt, or the row did not ask); position j's target is token_ids[j + 1]
    pooling: str | None = None    # embeddings: "last" | "mean"; the runner returns StepResult.hidden for the row
    num_draft: int = 0            # speculative decoding (engine/speculative): the last num_draft of token_ids
                                  # are drafts; the row samples at each of its last num_draft + 1 positions
                                  # (StepResult.spec_tokens), position j as output output_index + j

    @property
    def scores(self) -> bool:
        """Whether the row needs more than its last position's logits (prompt logprobs or pooling)."""
        return self.pooling is not None or self.sampling_params.prompt_logprobs is not None


@dataclasses.dataclass
class SchedulerOutput:
    kind: str                     # "prefill" (chunks of new tokens over any cached prefix), "decode" (one
                                  # token per row), or "mixed": decode rows first, then prefill chunks
    rows: list[ScheduledRow]      # in batch order
    preempted: list[str] = dataclasses.field(default_factory=list)  # request ids preempted this step

    @property
    def num_decode_rows(self) -> int:
        """Rows of one token (decodes; in a mixed step also a 1-token prefill chunk, computed the same way)."""
        return sum(len(r.token_ids) == 1 for r in self.rows)

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.rows)
