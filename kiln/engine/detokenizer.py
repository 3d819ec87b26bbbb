"""Incremental detokenization with stop strings.

Byte-level BPE tokens need not end on a character boundary ('😀' may be two tokens), and some tokenizers only
render a token correctly next to its neighbours. So, like vLLM and TGI, we keep two offsets into the ids:

    ids[prefix_offset:read_offset]   already emitted; decoded again only as context
    ids[read_offset:]                not yet emitted

Each step decodes `ids[prefix_offset:]` and `ids[prefix_offset:read_offset]`; the text beyond the shorter one is
new, and is emitted only if it does not end with U+FFFD (an incomplete UTF-8 sequence). Then both offsets move
forward. The offsets start inside the last few prompt tokens, so the first output token decodes with its left
context (leading-space handling then matches a full decode).

Stop strings: the stable text is searched for them; on a match the text is cut (before the stop string, or
after it with `include_stop_str_in_output`) and `stopped_by` is set. So that text once returned is never cut
later, the last `max(len(stop)) - 1` characters are held back until more text shows they are safe, or until
`flush()` at the end of the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

INITIAL_OFFSET = 5
"""How many prompt tokens seed the decode window (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)."""

REPLACEMENT_CHAR = "\ufffd"


class DecodingTokenizer(Protocol):
    """What the detokenizer needs from a tokenizer (a transformers tokenizer or kiln's wrapper)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns one request's output token ids into text deltas, honouring stop strings.

    `add_tokens(ids)` returns the text that became stable (and safe from stop-string truncation);
    `flush()` returns whatever is still held back once the request is finished. The concatenation of all
    returned deltas equals `output_text` after `flush()`.
    """

    def __init__(
        self,
        tokenizer: DecodingTokenizer,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop: list[str] = [stop] if isinstance(stop, str) else list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        # The decode window: a tail of the prompt, then the output ids not yet behind prefix_offset.
        self._ids: list[int] = list(prompt_ids[-INITIAL_OFFSET:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        # Characters kept back from the caller until we know no stop string will cut them.
        self._holdback = 0 if include_stop_str_in_output else max(self._max_stop_len - 1, 0)
        self.output_text = ""  # all stable text so far (cut at the stop string once stopped)
        self._num_emitted = 0  # len(output_text) already returned to the caller
        self.stopped_by: str | None = None
        self.num_output_tokens = 0

    @property
    def finished(self) -> bool:
        """True once a stop string was found; later tokens are ignored."""
        return self.stopped_by is not None

    def add_tokens(self, new_ids: Sequence[int]) -> str:
        """Append output token ids; return the text delta that is now stable and safe to stream."""
        if self.finished or not new_ids:
            return ""
        self.num_output_tokens += len(new_ids)
        self._ids.extend(int(i) for i in new_ids)
        self._append_text(self._decode_new(final=False))
        return self._emit(final=False)

    def flush(self) -> str:
        """Release the held-back text (and any trailing incomplete character) at the end of the request."""
        if not self.finished:
            self._append_text(self._decode_new(final=True))
        return self._emit(final=True)

    def _decode_new(self, final: bool) -> str:
        """Text of ids[read_offset:] given its left context; empty if it is not yet stable (unless final)."""
        if self._read_offset >= len(self._ids):
            return ""
        skip = self.skip_special_tokens
        prefix_text = self.tokenizer.decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=skip)
        new_text = self.tokenizer.decode(self._ids[self._prefix_offset :], skip_special_tokens=skip)
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        # Advance the window and drop ids that are no longer needed as context.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return new_text[len(prefix_text) :]

    def _append_text(self, delta: str) -> None:
        """Add stable text; cut it and set stopped_by if a stop string now appears."""
        if not delta:
            return
        old_len = len(self.output_text)
        self.output_text += delta
        if not self.stop:
            return
        # A new match must end inside the delta, so it starts at most max_stop_len - 1 characters before it.
        search_from = max(old_len - self._max_stop_len + 1, 0)
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.output_text.find(s, search_from)
            if idx >= 0 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is not None:
            idx, s = best
            self.stopped_by = s
            self.output_text = self.output_text[: idx + len(s) if self.include_stop_str_in_output else idx]

    def _emit(self, final: bool) -> str:
        """Return the part of output_text not yet returned, minus the hold-back unless final or stopped."""
        end = len(self.output_text)
        if not (final or self.finished):
            end -= self._holdback
        if end <= self._num_emitted:
            return ""
        delta = self.output_text[self._num_emitted : end]
        self._num_emitted = end
        return delta
