"""Host-side helpers of a verify step (speculative decoding, engine/speculative.py), shared by the runners.

A row with ScheduledRow.num_draft = k holds [last token, d_1 .. d_k] and samples at each of those k + 1
positions. `expand` turns it into k + 1 single-position rows, position j as the plain decode row that output
`output_index + j` would be once d_1 .. d_j are accepted: its tokens up to position j, output index + j, the
penalty history extended by the drafts before it. The samplers then need nothing new: the same seeded draw,
penalties, bias and min_tokens apply per position.

    rows ──> expand(rows) ──> virtual rows [M]        (M = sum of num_draft + 1)
         ──> positions(rows, lens) ──> (row, position) of each virtual row in the [B, T] step
    StepResult of the virtual rows ──> regroup(rows, result) ──> the step's StepResult, spec_tokens set
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from kiln.backends.base import StepResult

if TYPE_CHECKING:
    from kiln.engine.scheduler_output import ScheduledRow


def expand(rows: Sequence[ScheduledRow]) -> list[ScheduledRow]:
    """Every row's sampled positions as single-position rows, in row order (a row without drafts: itself)."""
    out = []
    for r in rows:
        if not r.num_draft:
            out.append(r)
            continue
        base = len(r.token_ids) - r.num_draft                      # tokens up to and including the last real one
        drafts = list(r.token_ids[base:])
        for j in range(r.num_draft + 1):
            out.append(dataclasses.replace(
                r, token_ids=list(r.token_ids[:base + j]), output_index=r.output_index + j, num_draft=0,
                history=list(r.history) + drafts[:j] if r.history else r.history))
    return out


def positions(rows: Sequence[ScheduledRow], lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row index [M], position in the row [M]) of each virtual row of `expand(rows)`; lens [B] the rows'
    token counts in the step (a row samples at its last num_draft + 1 of them)."""
    b, t = [], []
    for i, r in enumerate(rows):
        k = r.num_draft
        b += [i] * (k + 1)
        t += list(range(int(lens[i]) - 1 - k, int(lens[i])))
    return np.asarray(b, np.int64), np.asarray(t, np.int64)


def regroup(rows: Sequence[ScheduledRow], res: StepResult) -> StepResult:
    """The StepResult of the virtual rows of `expand(rows)` [M] back per row: tokens, logprobs and top of each
    row's first sampled position (what a plain decode row gives), spec_tokens of its every position."""
    first, spec, at = [], [], 0
    for r in rows:
        n = r.num_draft + 1
        first.append(at)
        spec.append([int(t) for t in res.tokens[at:at + n]] if r.num_draft else None)
        at += n
    return StepResult([int(res.tokens[i]) for i in first], [res.logprobs[i] for i in first],
                      None if res.top is None else [res.top[i] for i in first], spec_tokens=spec)
