"""The engine's bookkeeping per request: a parent (what the caller asked for) and its n samples.

    _Parent ── samples: [_Sample(Request, detokenizer, CompletionOutput)] ── output() ─> RequestOutput
           └─ pooling / pooled (embeddings) ─────────────────────────────── output() ─> EmbeddingRequestOutput

Sample i of request R is `R` for n=1, else `R#i`; an embedding request has one sample and no tokens.
"""
from __future__ import annotations

import dataclasses

from kiln.engine.detokenizer import IncrementalDetokenizer
from kiln.engine.outputs import CompletionOutput, EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from kiln.engine.pooling import Pooled, PoolingParams
from kiln.engine.request import Request
from kiln.engine.scheduler_output import ScheduledRow


@dataclasses.dataclass
class _Sample:
    """One of a parent's n samples: its scheduler request, detokenizer and output so far."""
    request: Request
    detok: IncrementalDetokenizer
    output: CompletionOutput


@dataclasses.dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_Sample]
    prompt_logprobs: list | None = None     # [prompt len]: None first, then {token: logprob} per position
    pooling: PoolingParams | None = None    # an embedding request
    pooled: Pooled = dataclasses.field(default_factory=Pooled)
    embedding: list[float] | None = None    # set once its prompt's last chunk ran

    def output(self) -> RequestOutput | EmbeddingRequestOutput:
        finished = all(s.output.finished for s in self.samples)
        if self.pooling is not None:
            return EmbeddingRequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                                          EmbeddingOutput(list(self.embedding or [])), finished,
                                          self.samples[0].output.finish_reason)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             [dataclasses.replace(s.output, token_ids=list(s.output.token_ids),
                                                  logprobs=None if s.output.logprobs is None
                                                  else list(s.output.logprobs)) for s in self.samples],
                             finished=finished,
                             num_cached_tokens=max(self.samples[0].request.num_cached_tokens, 0),
                             prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs))

    def record_prompt_logprobs(self, row: ScheduledRow, plp: list) -> None:
        """Record a prefill chunk's prompt logprobs: position j predicts prompt token start_pos + j + 1 (a
        recomputed chunk, after preemption, writes the same entries again)."""
        k = row.sampling_params.prompt_logprobs
        for j, entry in enumerate(plp):
            pos = row.start_pos + j + 1
            if entry is None or pos >= len(self.prompt_token_ids):
                continue
            lp, top = entry
            d = {self.prompt_token_ids[pos]: lp}
            d.update((t, v) for t, v in top[:k] if t not in d)
            self.prompt_logprobs[pos] = d

    def record_hidden(self, row: ScheduledRow, hidden) -> bool:
        """Add a chunk's pooled hidden states; True when it was the prompt's last chunk (the embedding is set)."""
        self.pooled.add(row.start_pos, len(row.token_ids), *hidden)
        if row.start_pos + len(row.token_ids) < len(self.prompt_token_ids):
            return False
        self.embedding = self.pooled.embedding(self.pooling)
        return True


def set_next_prompt_tokens(rows: list[ScheduledRow], child_to_parent: dict) -> None:
    """Prompt logprobs: each chunk's `next_token_id`, the prompt token after it (its last position's target)."""
    for r in rows:
        if r.sampling_params.prompt_logprobs is not None and r.start_pos + len(r.token_ids) < r.prompt_len:
            r.next_token_id = child_to_parent[r.request_id][0].prompt_token_ids[
                r.start_pos + len(r.token_ids)] if r.request_id in child_to_parent else -1
