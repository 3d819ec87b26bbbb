"""N-gram (prompt lookup) drafts: the context's last n tokens, found earlier in the context, propose the tokens
that followed them there.

    propose(context, k, n_max, n_min) ─> up to k draft tokens ([] when no n-gram of n_min..n_max recurs)

For n from n_max down to n_min, the context's final n-gram is searched for in the context before it; the most
recent earlier occurrence wins (generated text repeats what it produced last more often than what it produced
first), and the up-to-k tokens after it are the drafts. The search is numpy over a sliding window: O(len x n).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def propose(context: Sequence[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k drafts continuing `context` (prompt + output ids) by its most recent earlier n-gram match."""
    L = len(context)
    if k < 1 or L < n_min + 1:
        return []
    ids = np.asarray(context, np.int64)                                         # [L]
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        tail = ids[L - n:]                                                      # [n] the n-gram to match
        windows = np.lib.stride_tricks.sliding_window_view(ids[:L - 1], n)      # [L - n, n] starts 0..L-n-1
        hits = np.nonzero((windows == tail).all(-1))[0]                         # starts of earlier matches
        if hits.size:
            start = int(hits[-1]) + n                                           # first token after the match
            return ids[start:start + k].tolist()
    return []
