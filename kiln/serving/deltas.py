"""Cumulative engine outputs -> what each sample gained since the last message (for streaming transports).

The engine returns every sample's whole text and tokens so far; a stream sends only what is new. One
DeltaTracker per request remembers, per sample key, how much was sent; `delta()` returns the rest.
"""
from __future__ import annotations

import dataclasses

from kiln.engine.outputs import CompletionOutput


@dataclasses.dataclass
class SampleDelta:
    """What one sample gained since the last delta."""
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finishing: bool          # this delta carries the finish (finish_reason is set on the sample)
    first: bool              # the first delta of this sample
    text_offset: int         # characters of the sample's text sent before this delta

    @property
    def empty(self) -> bool:
        return not (self.text or self.token_ids or self.finishing)


class DeltaTracker:
    """Cumulative CompletionOutputs -> per-sample deltas; `key` tells samples apart (e.g. choice index)."""

    def __init__(self):
        self._sent: dict[object, tuple[int, int, bool]] = {}   # key -> (chars, tokens, finished) sent

    def delta(self, key: object, c: CompletionOutput) -> SampleDelta:
        first = key not in self._sent
        n_text, n_tok, done = self._sent.get(key, (0, 0, False))
        self._sent[key] = (len(c.text), len(c.token_ids), c.finished)
        return SampleDelta(c.text[n_text:], c.token_ids[n_tok:],
                           None if c.logprobs is None else c.logprobs[n_tok:], c.finished and not done, first, n_text)
