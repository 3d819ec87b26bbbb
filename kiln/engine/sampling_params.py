"""Per-request sampling parameters, with vLLM's field names, defaults and validation messages.

A `SamplingParams` is checked when it is built (and again by `LLMEngine.validate`, in case a field was set
afterwards), in two passes:

    _normalise   each field's type: an int field takes an int or an integral float, never a bool or a string;
                 a float field takes a real number, never a bool or a string; `stop` becomes a list of strings,
                 `stop_token_ids` a list of ints, `logit_bias` a dict of int -> float. Values become plain
                 Python ints and floats, so nothing wider than the sampler's int32/int64 or float32 reaches it.
    _verify      each field's range: NaN and infinity nowhere, integers within 64 bits (top_k within 32 bits),
                 and the limits below.

Every error is a ValueError whose message starts with the field name (the HTTP server derives the OpenAI `param`
from the first word) and states the limit. `validate_for_vocab` adds the checks that need the model (token ids
in range); `LLMEngine.validate` those that need the engine (prompt length, kernel slots).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kiln.structured.params import StructuredOutputsParams

MAX_LOGPROBS = 20
"""Largest number of top logprobs a request may ask for (besides the sampled token's)."""

GREEDY_TEMPERATURE_EPS = 1e-5
"""Temperatures below this are treated as greedy (vLLM's `_SAMPLING_EPS`)."""

MAX_N = 128
"""Most samples one request may ask for: OpenAI's documented maximum for `n`. vLLM caps `n` at
`VLLM_MAX_N_SEQUENCES` (default 16384); kiln is lower because every sample is a full sequence in the batch."""

MAX_TEMPERATURE = 2.0
"""OpenAI's range for `temperature` is [0, 2]; vLLM rejects values above it too (vllm-project/vllm#44965)."""

MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-4, 1e4
"""kiln's bounds on `repetition_penalty` (vLLM only asks for finite and > 0): logits are divided or multiplied by
it in float32, so a value beyond these would overflow to inf or 0 and turn logits into NaN."""

MAX_STOP_STRINGS = 4
"""Most stop strings per request: OpenAI's "up to 4 sequences", vLLM's `VLLM_MAX_STOP_STRINGS` default."""

MAX_STOP_STRING_CHARS = 256
"""Longest stop string, in characters (kiln's limit: the detokenizer holds back that much text while streaming)."""

MAX_STOP_TOKEN_IDS = 128
"""Most stop_token_ids per request (kiln's limit; each output token is checked against them)."""

MAX_TOP_K = 2**31 - 1
"""top_k is an int32 in the sampler; any value at or above the vocabulary size keeps every token."""

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""Range of every other integer field (seed, max_tokens, min_tokens, token ids before the vocabulary check)."""

_TOKEN_ID_STR = re.compile(r"[+-]?[0-9]{1,20}")  # a JSON object key holding a token id


def _show(value: Any) -> str:
    """A short, always-printable rendering of a client's value for an error message."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > 10_000:     # str() of an int this wide raises (sys.get_int_max_str_digits)
            return f"an integer of {value.bit_length()} bits"
        text = str(value)
        return text if len(text) <= 60 else f"{text[:20]}... ({len(text)} digits)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_int(name: str, value: Any) -> int:
    """`value` as a plain int; ValueError for bools, strings, fractions and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be an integer, got {_show(value)}.")
    if isinstance(value, numbers.Integral):
        return int(value)
    try:
        f = float(value)
    except (OverflowError, ValueError):   # a Fraction beyond float range
        f = math.nan
    if not f.is_integer():   # NaN and infinity included
        raise ValueError(f"{name} must be an integer, got {_show(value)}.")
    return int(f)


def _as_float(name: str, value: Any) -> float:
    """`value` as a finite plain float; ValueError for bools, strings, NaN, infinity and huge integers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {_show(value)}.")
    try:
        f = float(value)
    except OverflowError:    # an int beyond float range
        f = math.inf
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number, got {_show(value)}.")
    return f


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {_show(value)}.")
    return value


def _in_range(name: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {_show(value)}.")
    return value


def _token_id_key(key: Any) -> int:
    """A logit_bias key (an int, or a JSON object key such as "42") as a 64-bit int."""
    if isinstance(key, str):
        if not _TOKEN_ID_STR.fullmatch(key):
            raise ValueError(f"logit_bias keys must be token ids, got {_show(key)}.")
        key = int(key)
    return _in_range("logit_bias keys", _as_int("logit_bias keys", key), INT64_MIN, INT64_MAX)


def _stop_strings(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ValueError(f"stop must be a string or a list of strings, got {_show(stop)}.")
    return list(stop)


def _stop_token_ids(ids: Any) -> list[int]:
    """Ints in first-seen order without duplicates (as vLLM does)."""
    if ids is None:
        return []
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"stop_token_ids must be a list of token ids, got {_show(ids)}.")
    out = [_in_range("stop_token_ids", _as_int("stop_token_ids", t), INT64_MIN, INT64_MAX) for t in ids]
    return list(dict.fromkeys(out))


def _logit_bias(bias: Any) -> dict[int, float] | None:
    if bias is None:
        return None
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must be an object of token id -> bias, got {_show(bias)}.")
    return {_token_id_key(k): _as_float("logit_bias values", v) for k, v in bias.items()}


_INT_FIELDS = ("n", "top_k", "min_tokens")
_OPTIONAL_INT_FIELDS = ("seed", "max_tokens", "logprobs", "prompt_logprobs")
_FLOAT_FIELDS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p")
_BOOL_FIELDS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")


@dataclass
class SamplingParams:
    """How to pick the tokens of one request. Defaults and meanings follow vLLM's `SamplingParams`.

    `top_k` of 0 or -1 turns top-k off (-1 is normalised to 0); `top_p` of 1 and `min_p` of 0 are off.
    `stop` is normalised to a list of strings and `stop_token_ids` to a list of ints (duplicates dropped).
    `logprobs` is the number of top logprobs returned besides the sampled token's (None: no logprobs at all).

    `max_tokens=None` means "until the context is full". A `max_tokens` beyond what the context leaves
    (prompt + max_tokens > max_model_len) is accepted and the request finishes with `length` when the context
    is full: the clamp of vLLM's `get_max_tokens` (vllm/entrypoints/utils.py), min(max_tokens,
    max_model_len - prompt length). Only the 64-bit range is enforced here.
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
    structured_outputs: StructuredOutputsParams | None = None   # the output must match this (structured/)
    prompt_logprobs: int | None = None     # per prompt token (after the first) its logprob and this many top ones

    def __post_init__(self) -> None:
        self.verify()

    def verify(self) -> None:
        """Normalise and check every field; idempotent. Raises ValueError naming the first bad field."""
        self._normalise()
        self._verify()

    def _normalise(self) -> None:
        """Check each field's type and turn it into plain Python values."""
        for name in _INT_FIELDS:
            setattr(self, name, _as_int(name, getattr(self, name)))
        for name in _OPTIONAL_INT_FIELDS:
            if getattr(self, name) is not None:
                setattr(self, name, _as_int(name, getattr(self, name)))
        for name in _FLOAT_FIELDS:
            setattr(self, name, _as_float(name, getattr(self, name)))
        for name in _BOOL_FIELDS:
            _as_bool(name, getattr(self, name))
        self.stop = _stop_strings(self.stop)
        self.stop_token_ids = _stop_token_ids(self.stop_token_ids)
        self.logit_bias = _logit_bias(self.logit_bias)
        self.structured_outputs = StructuredOutputsParams.of(self.structured_outputs)
        if self.structured_outputs is not None:
            self.structured_outputs.verify()
        if self.top_k == -1:
            self.top_k = 0

    def _verify(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {_show(self.n)}.")
        if self.n > MAX_N:
            raise ValueError(f"n must be at most {MAX_N}, got {_show(self.n)}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if not MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, "
                             f"{MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if self.temperature > MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be -1 or 0 (disable), or at least 1, got {_show(self.top_k)}.")
        if self.top_k > MAX_TOP_K:
            raise ValueError(f"top_k must be at most {MAX_TOP_K}, got {_show(self.top_k)}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.seed is not None:
            _in_range("seed", self.seed, INT64_MIN, INT64_MAX)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {_show(self.max_tokens)}.")
        if self.max_tokens is not None and self.max_tokens > INT64_MAX:
            raise ValueError(f"max_tokens must be at most {INT64_MAX}, got {_show(self.max_tokens)}.")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {_show(self.min_tokens)}.")
        if self.min_tokens > INT64_MAX:
            raise ValueError(f"min_tokens must be at most {INT64_MAX}, got {_show(self.min_tokens)}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}.")
        if self.min_tokens and self.structured_outputs is not None:
            # the grammar decides where the output ends: a short match would leave no allowed token at all
            raise ValueError(f"min_tokens must be 0 when structured_outputs is set, got {self.min_tokens}.")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {_show(self.logprobs)}.")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {_show(self.prompt_logprobs)}.")
        self._verify_stops()
        for token_id, bias in (self.logit_bias or {}).items():
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token_id}.")

    def _verify_stops(self) -> None:
        if any(not s for s in self.stop):
            raise ValueError("stop cannot contain an empty string.")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop may hold at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}.")
        longest = max((len(s) for s in self.stop), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters, got one of "
                             f"{longest}.")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids may hold at most {MAX_STOP_TOKEN_IDS} ids, "
                             f"got {len(self.stop_token_ids)}.")

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
