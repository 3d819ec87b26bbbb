"""A hand-computable runner: the engine, the servers and the batch runner are tested on it without a model.

A row's next token is `next_token(last, pos, vocab)` = (3 * last + pos + 1) % vocab, where `last` is the row's
last scheduled token and `pos` its position. On top of that, with the engine's semantics:
- sampled rows (temperature > 0, not top_k 1) add `(seed * 1000003 + output_index * 7919) % vocab`, so a draw
  depends only on the row's own seed and step, never on the batch;
- a positive `logit_bias` entry wins outright (the largest bias, then the smallest id); a token with a negative
  bias is skipped (the next id is taken);
- while `output_index < min_tokens`, the row's eos ids and `stop_token_ids` are skipped the same way;
- a row's grammar bitmask (structured outputs) is obeyed the same way: a token it does not allow is skipped;
- the sampled token's logprob is `mock_logprob(token)` = -0.25 * (1 + token % 4), and the top-N list is the
  sampled token then the next ids, each 1.0 lower;
- a pooling row (embeddings) returns, for its chunk, the sum and the last of `mock_hidden(token)` =
  [(token + d) % 5 - 2 for d in range(hidden_size)] over its tokens (its final hidden state is its own token's).
- a verify row (speculative decoding: ScheduledRow.num_draft > 0) picks at each of its last num_draft + 1
  positions as the plain row of that position would (backends/verify.expand): StepResult.spec_tokens;
`fault` (a callable given the step) may raise to inject a failure; `step_seconds` slows every step down.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable

import numpy as np

from kiln.backends import verify
from kiln.backends.base import ModelRunner, RunnerStats, StepResult


def next_token(last: int, pos: int, vocab: int) -> int:
    return (3 * last + pos + 1) % vocab


def mock_logprob(token: int) -> float:
    return -0.25 * (1 + token % 4)


def mock_hidden(token: int, hidden_size: int) -> np.ndarray:
    """[hidden_size] float32: the mock's final hidden state at a position holding `token`."""
    return ((token + np.arange(hidden_size)) % 5 - 2).astype(np.float32)


class MockRunner(ModelRunner):
    name = "mock"

    def __init__(self, *, spec, config, tensors: dict[str, Any] | None = None):
        self.spec, self.config = spec, config
        self.vocab = spec.vocab_size
        self.fault: Callable[[Any], None] | None = None
        self.step_seconds = 0.0
        self.steps: collections.deque = collections.deque(maxlen=1024)   # the last SchedulerOutputs, for tests
        self._stats = RunnerStats()

    def _pick(self, row) -> int:
        sp, V = row.sampling_params, self.vocab
        last, pos = row.token_ids[-1], row.start_pos + len(row.token_ids) - 1
        tok = next_token(last, pos, V)
        if not sp.greedy:
            tok = (tok + row.seed * 1000003 + row.output_index * 7919) % V
        bias = sp.logit_bias or {}
        best = max(bias.values(), default=0.0)
        mask = row.token_bitmask.result() if hasattr(row.token_bitmask, "result") else row.token_bitmask
        ok = (lambda t: True) if mask is None else (lambda t: bool((int(mask[t >> 5]) >> (t & 31)) & 1))
        if best > 0 and any(ok(t) for t, b in bias.items() if b == best):
            tok = min(t for t, b in bias.items() if b == best and ok(t))
        banned = {t for t, b in bias.items() if b < 0}
        if row.output_index < sp.min_tokens:
            banned |= set(row.eos_token_ids) | set(sp.stop_token_ids or ())
        for _ in range(V):
            if tok not in banned and ok(tok):
                break
            tok = (tok + 1) % V
        return tok

    def with_config(self, *, config) -> MockRunner:
        return MockRunner(spec=self.spec, config=config)

    def execute(self, step) -> StepResult:
        if self.fault is not None:
            self.fault(step)
        if self.step_seconds:
            time.sleep(self.step_seconds)
        self.steps.append(step)
        want = max((r.sampling_params.logprobs or 0 for r in step.rows
                    if r.sampling_params.logprobs is not None), default=None)
        spec = [[self._pick(v) for v in verify.expand([r])] if r.num_draft else None for r in step.rows]
        tokens = [s[0] if s else self._pick(r) for s, r in zip(spec, step.rows)]
        top = None
        if want is not None:
            top = [[((t + j) % self.vocab, mock_logprob(t) - j) for j in range(max(want, 1))] for t in tokens]
        plp = None
        if step.kind != "decode" and any(r.sampling_params.prompt_logprobs is not None for r in step.rows):
            plp = [self._prompt_logprobs(r) for r in step.rows]
        hidden = None
        if any(r.pooling is not None for r in step.rows):
            D = self.spec.hidden_size
            hidden = [None if r.pooling is None else
                      (sum(mock_hidden(t, D) for t in r.token_ids), mock_hidden(r.token_ids[-1], D))
                      for r in step.rows]
        # no padding: every computed token is a real one
        self._stats.add_step(f"{step.kind}(batch={len(step.rows)})", step.num_tokens, step.num_tokens)
        return StepResult(tokens, [mock_logprob(t) for t in tokens], top, plp, hidden,
                          spec if any(spec) else None)

    def _prompt_logprobs(self, row):
        """Position j's target t (the next prompt token) scores mock_logprob(t); its top-k are t + m, each m
        lower."""
        k = row.sampling_params.prompt_logprobs
        if k is None:
            return None
        targets = list(row.token_ids[1:]) + [row.next_token_id]
        return [None if t < 0 else (mock_logprob(t), [((t + m) % self.vocab, mock_logprob(t) - m)
                                                      for m in range(k)]) for t in targets]

    def warmup(self, *, check_only: bool = False, show_progress: bool = True):
        from kiln.compile.warmup import WarmupReport
        return WarmupReport()

    def stats(self) -> RunnerStats:
        return dataclasses.replace(self._stats, padding_by_bucket=dict(self._stats.padding_by_bucket))
