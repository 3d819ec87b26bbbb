"""What the engine returns: vLLM-shaped RequestOutput / CompletionOutput (cumulative, not deltas)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class CompletionOutput:
    index: int                                  # which of the n samples
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None   # per token: {token_id: logprob} (sampled + top-N)
    finish_reason: str | None = None            # stop | length | abort
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0                  # prompt tokens served by the prefix cache


@dataclasses.dataclass
class SampleDelta:
    """What one sample gained since the last delta: for streaming front-ends."""
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finishing: bool          # this delta carries the finish (finish_reason is set on the sample)
    first: bool              # the first delta of this sample
    text_offset: int         # characters of the sample's text sent before this delta


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
