"""Buckets: the static shapes graphs are compiled for. Data plus one lookup.

A dimension's bucket list comes from (min, step, max): powers of two from min up to step (the ramp-up),
then multiples of step up to max; max is always in the list. A size maps to the smallest bucket that holds
it (`bisect`); a size above max has no bucket and must be split (chunked prefill) or rejected.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools


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


def pick(buckets: tuple[int, ...], n: int) -> int:
    """The smallest bucket >= n."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"size {n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """Prefill graphs over (batch, seq_len) and decode graphs over (batch, num_blocks)."""
    prompt_bs: tuple[int, ...]
    prompt_seq: tuple[int, ...]
    decode_bs: tuple[int, ...]
    decode_blocks: tuple[int, ...]
    max_prompt_tokens: int          # a prefill bucket's batch x seq_len never exceeds this

    def prefill_buckets(self) -> list[tuple[int, int]]:
        """Every (batch, seq_len) whose padded tokens fit the step budget."""
        return [(b, s) for b, s in itertools.product(self.prompt_bs, self.prompt_seq)
                if b * s <= self.max_prompt_tokens]

    def max_prefill_seq(self, batch: int) -> int:
        """The longest seq_len bucket a prefill of `batch` rows may use (0: none fits the budget)."""
        b = pick(self.prompt_bs, batch)
        return max((s for s in self.prompt_seq if b * s <= self.max_prompt_tokens), default=0)

    def required_buckets(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The graphs that hold every admissible step: for each prefill batch size its longest seq_len
        within the budget, and the largest decode bucket."""
        prefill = [(b, self.max_prefill_seq(b)) for b in self.prompt_bs if self.max_prefill_seq(b)]
        return prefill, [(self.decode_bs[-1], self.decode_blocks[-1])]

    def decode_buckets(self) -> list[tuple[int, int]]:
        return list(itertools.product(self.decode_bs, self.decode_blocks))

    def prefill_bucket(self, batch: int, seq_len: int) -> tuple[int, int]:
        return pick(self.prompt_bs, batch), pick(self.prompt_seq, seq_len)

    def decode_bucket(self, batch: int, num_blocks: int) -> tuple[int, int]:
        return pick(self.decode_bs, batch), pick(self.decode_blocks, num_blocks)
