"""The n-gram (prompt-lookup) proposer: on the host, and on the device over token histories."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jserve.spec import token_history
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


@pytest.mark.parametrize("min_n,max_n,k", [(1, 3, 3), (2, 5, 4), (1, 1, 2), (3, 3, 6)])
def test_device_lookup_proposes_what_the_host_proposer_does(min_n, max_n, k):
    """``token_history.propose`` over padded histories (stale tokens past each length) gives
    the host proposer's drafts, -1 past them, for random sequences over a small vocabulary
    (many matches) and the hand-made cases above."""
    rng = np.random.default_rng(min_n * 100 + max_n * 10 + k)
    width = 40
    seqs = [rng.integers(0, 4, rng.integers(1, width + 1)).tolist() for _ in range(60)]
    seqs += [[1, 2, 3, 9, 8, 7, 5, 2, 3, 6, 1, 2, 3], [4, 5, 6, 4, 7, 4], [5], [5, 5], [1, 2, 1],
             list(range(10, 30)) + [7] + list(range(10, 16))]
    rows = rng.integers(0, 4, (len(seqs), width)).astype(np.int32)   # stale tails
    for i, sq in enumerate(seqs):
        rows[i, :len(sq)] = sq
    lengths = np.array([len(sq) for sq in seqs], np.int32)
    got = np.asarray(jax.jit(token_history.propose, static_argnums=(2, 3, 4))(
        jnp.asarray(rows), jnp.asarray(lengths), k, min_n, max_n))
    host = NgramProposer(min_n, max_n)
    for i, sq in enumerate(seqs):
        want = host.propose(sq, k)
        assert got[i].tolist() == want + [-1] * (k - len(want)), (sq, got[i])


def test_step_records_tokens_and_proposes_from_each_slots_history():
    """``record`` puts a step's tokens at (slot, position), padding dropped; ``step_drafts``
    records each sampling row's emitted token and proposes from its slot's row; the rows'
    drafts verified stop at the first missing one."""
    from jserve.spec.verify_step import verified_drafts

    hist = jnp.zeros((3, 16), jnp.int32)     # 2 slots + the null row
    row_slot = jnp.array([1, 0, -1], jnp.int32)
    qsl = jnp.array([0, 5, 6, 6], jnp.int32)   # row 0: 5 tokens, row 1: 1 token, row 2: padding
    slots = token_history.token_slots(row_slot, qsl, 8)
    assert slots.tolist() == [1, 1, 1, 1, 1, 0, -1, -1]
    hist = token_history.record(hist, slots, jnp.array([0, 1, 2, 3, 4, 7, 0, 0]),
                                jnp.array([6, 7, 8, 6, 7, 9, 5, 5]))
    assert np.asarray(hist)[1, :5].tolist() == [6, 7, 8, 6, 7] and int(hist[0, 7]) == 9
    assert not np.asarray(hist)[2].any()     # padding tokens went nowhere
    hist, drafts = token_history.step_drafts(
        hist, row_slot, jnp.array([1, 0, 0]), jnp.array([5, 8, 0]), jnp.array([8, 4, 4]), 3, 1, 3)
    assert np.asarray(hist)[1, :6].tolist() == [6, 7, 8, 6, 7, 8]
    assert int(hist[0, 8]) == 0               # a row that does not sample records nothing
    assert np.asarray(drafts).tolist() == [[6, 7, 8], [-1, -1, -1], [-1, -1, -1]]
    assert verified_drafts(jnp.array([[4, 5, -1], [4, -1, 6], [1, 2, 3]]),
                           jnp.array([3, 3, 2])).tolist() == [2, 1, 2]


def test_history_writer_writes_each_slots_tokens():
    """A step's history uploads: each row's ids from position 0 of its slot, packed into as few
    calls as fit one full history; other slots and positions untouched."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    w = token_history.HistoryWriter(3, 8, sharding)
    assert w.buckets == (8,)   # max_model_len below the first bucket
    hist = w.zeros()
    w.compile(hist)
    hist = hist.at[1].set(9)
    hist = w(hist, [(0, [4, 5, 6]), (2, list(range(8)))])   # 11 ids: two calls
    h = np.asarray(hist)
    assert h[0].tolist() == [4, 5, 6, 0, 0, 0, 0, 0] and h[1].tolist() == [9] * 8
    assert h[2].tolist() == list(range(8)) and not h[3].any()
    assert token_history.HistoryWriter(256, 32768, sharding).buckets == (256, 1024, 4096, 16384, 32768)
    with pytest.raises(ValueError, match="max_model_len"):
        w(hist, [(0, [1] * 9)])
