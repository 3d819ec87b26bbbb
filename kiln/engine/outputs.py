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
    prompt_logprobs: list[dict[int, float] | None] | None = None   # per prompt token (None for the first):
                                                # {token_id: logprob} of it and the top-N, when asked


@dataclasses.dataclass
class EmbeddingOutput:
    embedding: list[float]                      # [hidden size], pooled (and L2-normalised unless asked not to)


@dataclasses.dataclass
class EmbeddingRequestOutput:
    """vLLM's shape: `out.outputs.embedding`. `outputs.embedding` is empty until finished (and if aborted)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool
    finish_reason: str | None = None            # stop (pooled) | abort | error
