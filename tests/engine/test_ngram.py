"""engine/ngram.propose on hand-made sequences: the longest n-gram first, the most recent match, k and the
context's end bounding the drafts, and nothing when no n-gram of the allowed sizes recurs."""
from __future__ import annotations

from kiln.engine.ngram import propose


def test_longest_ngram_wins_over_a_shorter_more_recent_one():
    # tail (1, 2, 3): as a 3-gram it occurs at 0 (followed by 4, 5); its 2-gram (2, 3) also at 6 (followed by 9)
    ctx = [1, 2, 3, 4, 5, 6, 2, 3, 9, 1, 2, 3]
    assert propose(ctx, 2, 3, 1) == [4, 5]
    assert propose(ctx, 2, 2, 1) == [9, 1]          # n_max 2: the 2-gram's most recent match, at 6
    assert propose(ctx, 5, 3, 3) == [4, 5, 6, 2, 3]


def test_most_recent_match_and_overlap_with_the_tail():
    assert propose([7, 8, 1, 7, 8, 2, 7, 8], 1, 2, 2) == [2]      # (7, 8) at 0 and 3: 3 is the more recent
    assert propose([5, 5, 5, 5], 3, 2, 2) == [5]                  # match at 1 (overlaps the tail): 1 token left
    assert propose([4, 6, 4, 6], 4, 2, 2) == [4, 6]               # match at 0: two tokens follow before the tail


def test_no_match_or_too_short():
    assert propose([1, 2, 3, 4], 3, 3, 1) == []                   # nothing recurs
    assert propose([1, 2, 3, 1], 3, 3, 2) == []                   # only a 1-gram recurs; n_min is 2
    assert propose([1, 2, 3, 1], 3, 3, 1) == [2, 3, 1]
    assert propose([1], 3, 3, 1) == []
    assert propose([1, 2, 1, 2], 0, 2, 1) == []                   # k = 0
