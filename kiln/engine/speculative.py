"""Speculative decoding, engine side: which requests draft, how many drafts fit, and which drafts are accepted.

    after a step, per request that sampled (propose) ─> drafts(...) (engine/ngram.propose, trimmed) ─> Request.draft_token_ids
    scheduler decode row ─> with_drafts(row, drafts): token_ids = [last token] + drafts, num_draft = len(drafts)
    runner ─> StepResult.spec_tokens[i]: the row's token sampled at each of its num_draft + 1 last positions
    engine ─> accepted(drafts, sampled) ─> the tokens to append, each through the detokenizer and stop checks

Verification. The runner samples position j of a verify row exactly as a plain decode would sample output
`output_index + j` after the drafts before it: the same processed logits and the same seeded uniform
(seed, output_index + j). Draft j is accepted while it equals that sample; the first sample that differs is
emitted in its place and ends the step (all accepted: the last position's sample is the bonus token). For a
greedy row the sample is the argmax. For a sampled row this is rejection sampling in its n-gram form, with the
draft distribution a point mass on d: d is accepted with probability p(d) (the sample equals d), and otherwise
the emitted token is distributed as p with d removed and renormalised (the sample conditioned on != d), so
every emitted token is distributed as p. Coupling it to the plain decode's uniform keeps it reproducible per
(seed, output_index), and the outputs equal the unspeculated run's whenever the logits do.

Not speculated (the request decodes one token a step): structured outputs (the grammar's mask at position
j + 1 depends on draft j being accepted, which the step cannot know) and requests asking for logprobs (one
logprob entry per row and step in StepResult). Penalties, logit bias and min_tokens are exact: each position
is sampled with its own output index and the history extended by the drafts before it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from kiln.config import SpeculativeConfig
from kiln.engine import ngram
from kiln.engine.request import Request
from kiln.engine.scheduler_output import ScheduledRow

VLLM_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")


def speculative_config(value: SpeculativeConfig | Mapping | None) -> SpeculativeConfig:
    """vLLM's `speculative_config` dict ({"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max":
    N, "prompt_lookup_min": M}) as a SpeculativeConfig; a missing lookup bound takes the other's value (vLLM)."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value or SpeculativeConfig()
    if not isinstance(value, Mapping):
        raise ValueError(f"speculative_config must be a dict, got {type(value).__name__}")
    unknown = sorted(set(value) - set(VLLM_KEYS))
    if unknown:
        raise ValueError(f"speculative_config has unknown key(s) {', '.join(map(repr, unknown))}; kiln reads "
                         f"{', '.join(VLLM_KEYS)}")
    kw = {k: v for k, v in value.items() if v is not None}
    if "method" not in kw:
        raise ValueError("speculative_config needs 'method' (kiln has 'ngram')")
    lo, hi = kw.get("prompt_lookup_min"), kw.get("prompt_lookup_max")
    if (lo is None) != (hi is None):
        kw["prompt_lookup_min" if lo is None else "prompt_lookup_max"] = hi if lo is None else lo
    return SpeculativeConfig(**kw)


def eligible(req: Request) -> bool:
    """Whether this request may decode drafts (see the module doc for the ones that may not)."""
    sp = req.sampling_params
    return sp.structured_outputs is None and sp.logprobs is None and req.pooling is None


def drafts(req: Request, spec: SpeculativeConfig, max_model_len: int) -> list[int]:
    """The drafts for req's next decode step: n-gram proposals, at most K, and never more than the request
    can still emit minus the one token the step always adds (max_tokens, max_model_len)."""
    if not spec.enabled or not eligible(req):
        return []
    sp, n_out = req.sampling_params, len(req.output_token_ids)
    room = max_model_len - req.num_tokens - 1
    if sp.max_tokens is not None:
        room = min(room, sp.max_tokens - n_out - 1)
    k = min(spec.num_speculative_tokens, room)
    if k < 1:
        return []
    return ngram.propose(req.all_token_ids, k, spec.prompt_lookup_max, spec.prompt_lookup_min)


def propose(requests: Mapping[str, Request], rows: Sequence[ScheduledRow], spec: SpeculativeConfig,
            max_model_len: int) -> None:
    """After a step: every request that just sampled gets its drafts for its next decode step."""
    for row in rows:
        req = requests.get(row.request_id)
        if row.sample and req is not None and not req.is_finished:
            req.draft_token_ids = drafts(req, spec, max_model_len)


def with_drafts(row: ScheduledRow, draft_ids: Sequence[int]) -> ScheduledRow:
    """A decode row that also verifies these drafts (its block table must already cover them)."""
    if not draft_ids:
        return row
    return dataclasses.replace(row, token_ids=list(row.token_ids) + list(draft_ids), num_draft=len(draft_ids))


def accepted(draft_ids: Sequence[int], sampled: Sequence[int]) -> list[int]:
    """The tokens a verified row emits: sampled[j] for every draft j that equals it, then the first sample that
    differs (or, all drafts accepted, the bonus sample at the last position). len(sampled) == len(drafts) + 1."""
    n = 0
    while n < len(draft_ids) and draft_ids[n] == sampled[n]:
        n += 1
    return list(sampled[:n + 1])


@dataclasses.dataclass
class SpecStats:
    """Drafts verified and accepted since the engine started (acceptance rate = accepted / drafted)."""
    drafted: int = 0
    accepted: int = 0
    verify_rows: int = 0

    def add(self, num_draft: int, num_accepted: int) -> None:
        self.drafted += num_draft
        self.accepted += num_accepted
        self.verify_rows += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0
