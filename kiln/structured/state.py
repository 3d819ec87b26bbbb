"""The engine's structured-output state: one grammar matcher per constrained sample, and the hooks LLMEngine
calls at admission, before each step, on each sampled token and when a sample ends.

    validate(params)        compile (or find in the cache) the request's grammar: ValueError for a bad one
    add(sample id, params)  a fresh matcher for the sample
    fill(rows)              rows that sample and are constrained get `token_bitmask`: a Future of their
                            next-token mask, filled by a worker thread while the step's model part runs
    accept(sample id, tok)  advance; True when the grammar has terminated (the sample is done); RuntimeError for
                            a token the grammar refuses (only a sampler that ignored the mask can produce one)
    remove(sample id)

A row's mask needs the token the previous step sampled, so it cannot be computed earlier than the step; but
the model step does not need it, only the sampler after it: `fill` hands the rows Futures, one worker thread
fills them (xgrammar releases the GIL) while the runner runs the model, and the runner's sampler waits for them
(backends/inputs.resolve_bitmask). Every pending fill is waited for before a matcher moves on (`accept`).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

from kiln.structured.grammar import Grammars, Matcher


class StructuredState:
    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]):
        self.grammars = Grammars(hf_tokenizer, vocab_size, stop_token_ids)
        self._matchers: dict[str, Matcher] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def validate(self, params) -> None:
        if params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)

    def add(self, sample_id: str, params) -> None:
        if params.structured_outputs is not None:
            self._matchers[sample_id] = self.grammars.matcher(params.structured_outputs)

    def fill(self, rows) -> None:
        if not self._matchers:
            return
        self._settle()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kiln-grammar")
        for r in rows:
            m = self._matchers.get(r.request_id)
            if m is not None and r.sample:
                r.token_bitmask = self._pool.submit(m.fill)
                self._pending.append(r.token_bitmask)

    def _settle(self) -> None:
        """Wait for the fills in flight (a matcher is never advanced while its mask is being filled)."""
        for f in self._pending:
            f.exception()
        self._pending.clear()

    def accept(self, sample_id: str, token: int) -> bool:
        self._settle()
        m = self._matchers.get(sample_id)
        if m is None:
            return False
        if not m.accept(token):
            raise RuntimeError(f"token {token} does not follow the request's grammar (structured_outputs)")
        return m.terminated

    def remove(self, sample_id: str) -> None:
        self._matchers.pop(sample_id, None)

    def __len__(self) -> int:
        return len(self._matchers)
