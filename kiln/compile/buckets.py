"""Buckets: the static shapes graphs are compiled for. Data plus one lookup.

A dimension's bucket list comes from (min, step, max): powers of two from min up to step (the ramp-up),
then multiples of step up to max; max is always in the list. A size maps to the smallest bucket that holds
it (`pick`, a bisect); a size above max has no bucket and must be split (chunked prefill) or rejected.
`BucketPlan` (the plan of one engine) and `pick` are plain data and live in kiln/config.py.
"""
from __future__ import annotations

from kiln.config import BucketPlan, pick

__all__ = ["BucketPlan", "make_buckets", "pick"]


def make_buckets(lo: int, step: int, hi: int) -> tuple[int, ...]:
    if not 1 <= lo <= hi or step < 1:
        raise ValueError(f"bucket range needs 1 <= min <= max and step >= 1, got min={lo} step={step} max={hi}")
    out, b = [], lo
    while b < step and b < hi:                     # ramp-up: lo, 2*lo, 4*lo, ... below step
        out.append(b)
        b *= 2
    out += [m for m in range(step, hi + 1, step) if m >= lo]
    out.append(hi)
    return tuple(sorted(set(out)))
