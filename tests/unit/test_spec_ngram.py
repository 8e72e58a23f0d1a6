"""The n-gram (prompt-lookup) proposer."""

from __future__ import annotations

import pytest

from jserve.spec.ngram import NgramProposer


def test_longest_most_recent_match_proposes_what_followed():
    p = NgramProposer(1, 3)
    seq = [1, 2, 3, 9, 8, 7, 5, 2, 3, 6, 1, 2, 3]
    # suffix "1 2 3" occurs at 0 (followed by 9 8 7); "2 3" also at 7 (followed by 6), but the
    # longest n wins
    assert p.propose(seq, 3) == [9, 8, 7]
    assert p.propose(seq, 1) == [9]
    # only a 1-gram matches: the most recent earlier "4"
    assert p.propose([4, 5, 6, 4, 7, 4], 2) == [7, 4]
    # min n 2: the 1-gram match does not count
    assert NgramProposer(2, 3).propose([4, 5, 6, 4, 7, 4], 2) == []


def test_short_sequences_and_truncated_tails():
    p = NgramProposer(1, 4)
    assert p.propose([5], 3) == []
    assert p.propose([5, 5], 3) == [5]          # the match's continuation is the last token
    assert p.propose([1, 2, 1], 5) == [2, 1]    # fewer than k follow: what there is
    assert p.propose([1, 2, 3], 0) == []
    assert p.propose([1, 2, 3], 4) == []        # no repeat


def test_copying_workload_drafts_the_copy():
    code = list(range(100, 140))
    seq = code + [7] + code[:10]               # halfway through re-typing the prompt
    assert NgramProposer(2, 5).propose(seq, 4) == code[10:14]


def test_bad_lookup_window_names_the_field():
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        NgramProposer(3, 2)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        NgramProposer(0, 2)
