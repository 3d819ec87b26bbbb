"""Per-request sampling parameters, with vLLM's field names, defaults and validation messages.

A `SamplingParams` is validated once, when it is built; `validate_for_vocab` adds the checks that need the
model (token ids in range). The kernel-side view of a batch of these is `kiln.kernels.sampling.SamplingTensors`.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20
"""Largest number of top logprobs a request may ask for (besides the sampled token's)."""

GREEDY_TEMPERATURE_EPS = 1e-5
"""Temperatures below this are treated as greedy (vLLM's `_SAMPLING_EPS`)."""


@dataclass
class SamplingParams:
    """How to pick the tokens of one request. Defaults and meanings follow vLLM's `SamplingParams`.

    `top_k` of 0 or -1 turns top-k off (-1 is normalised to 0); `top_p` of 1 and `min_p` of 0 are off.
    `stop` is normalised to a list of strings and `stop_token_ids` to a list of ints. `max_tokens=None`
    means "until the context is full". `logprobs` is the number of top logprobs returned besides the
    sampled token's (None: no logprobs at all).
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.logit_bias is not None:
            # JSON object keys arrive as strings; the kernel wants ints.
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.top_k == -1:
            self.top_k = 0
        self._verify()

    def _verify(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be -1 or 0 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}.")
        if any(not s for s in self.stop):
            raise ValueError("stop cannot contain an empty string.")
        for token_id, bias in (self.logit_bias or {}).items():
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token_id}.")

    @property
    def greedy(self) -> bool:
        """True when the request always takes the most likely token."""
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """True when any of the three penalties is not neutral (the kernel then needs the token history)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Raise ValueError if a logit_bias key or a stop_token_id is not a token id of this vocabulary."""
        for token_id in self.logit_bias or {}:
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"logit_bias token id {token_id} is out of vocabulary range [0, {vocab_size}).")
        for token_id in self.stop_token_ids or []:
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"stop_token_ids contains {token_id}, out of vocabulary range [0, {vocab_size}).")
