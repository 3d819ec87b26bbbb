"""Fault isolation of one step: run the rows; on an error run each half again, down to single rows.

    execute_isolating(runner, sched, rows, budget, vocab) ─> ({row: RowResult}, {row: exception})

A row's K/V write and its seeded draw are the same on a retry, so rows that succeed keep their results; rows
with a token outside the vocabulary fail alone. The whole step spends at most `budget[0]` runner calls.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, NamedTuple

from kiln.backends.base import ModelRunner, StepResult


class RowResult(NamedTuple):
    token: int
    logprob: float
    top: list | None                  # top-N (token, logprob) when some row asked
    prompt_logprobs: list | None      # StepResult.prompt_logprobs[row]
    hidden: Any = None                # StepResult.hidden[row]: (sum [D], last [D]) for a pooling row
    spec: list[int] | None = None     # StepResult.spec_tokens[row]: a verify row's num_draft + 1 samples


def _check(result: StepResult, n: int) -> None:
    if len(result.tokens) != n or len(result.logprobs) != n or (result.top is not None and len(result.top) != n) \
            or (result.hidden is not None and len(result.hidden) != n):
        raise RuntimeError(f"runner returned {len(result.tokens)} tokens for {n} rows")


def execute_isolating(runner: ModelRunner, sched, idx: list[int], budget: list[int], vocab: int,
                      cause: BaseException | None = None) -> tuple[dict[int, RowResult], dict[int, BaseException]]:
    """Run rows `idx` of `sched` (a SchedulerOutput); on an error run each half again, down to single rows.

    Rows left when the budget runs out fail with `cause` (the error of the larger part they were in). Returns
    ({row index: RowResult}, {row index: exception}) covering every index.
    """
    if budget[0] <= 0 and cause is not None:
        return {}, dict.fromkeys(idx, cause)
    budget[0] -= 1
    step = sched if len(idx) == len(sched.rows) else dataclasses.replace(
        sched, rows=[sched.rows[i] for i in idx], preempted=[])
    try:
        result: StepResult = runner.execute(step)
        _check(result, len(idx))
    except Exception as e:  # noqa: BLE001 - isolated below
        if len(idx) == 1:
            return {}, {idx[0]: e}
        result, error = None, e    # retried outside the except block, so tracebacks do not chain
    if result is None:
        ok_a, bad_a = execute_isolating(runner, sched, idx[:len(idx) // 2], budget, vocab, error)
        ok_b, bad_b = execute_isolating(runner, sched, idx[len(idx) // 2:], budget, vocab, error)
        return {**ok_a, **ok_b}, {**bad_a, **bad_b}
    results, failures = {}, {}
    for j, i in enumerate(idx):
        try:
            token = operator.index(result.tokens[j])
            if not 0 <= token < vocab:
                raise RuntimeError(f"runner returned token {token}, outside the vocabulary [0, {vocab})")
            hidden = None if result.hidden is None else result.hidden[j]
            if sched.rows[i].pooling is not None and hidden is None:
                raise RuntimeError("runner returned no hidden state for an embedding row")
            spec = _spec_tokens(result, j, sched.rows[i].num_draft, vocab)
            results[i] = RowResult(token, result.logprobs[j], None if result.top is None else result.top[j],
                                   None if result.prompt_logprobs is None else result.prompt_logprobs[j], hidden,
                                   spec)
        except Exception as e:  # noqa: BLE001 - this row only
            failures[i] = e
    return results, failures


def _spec_tokens(result: StepResult, j: int, num_draft: int, vocab: int) -> list[int] | None:
    """Row j's verify samples, checked: num_draft + 1 tokens in the vocabulary (None for a row without drafts)."""
    if not num_draft:
        return None
    spec = None if result.spec_tokens is None else result.spec_tokens[j]
    if spec is None or len(spec) != num_draft + 1:
        raise RuntimeError(f"runner returned {None if spec is None else len(spec)} verify tokens for a row with "
                           f"{num_draft} drafts")
    spec = [operator.index(t) for t in spec]
    if not all(0 <= t < vocab for t in spec):
        raise RuntimeError(f"runner returned a verify token outside the vocabulary [0, {vocab})")
    return spec
