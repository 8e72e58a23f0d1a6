"""Work lists for the ragged paged attention kernels: the ragged batch cut into fixed-size items.

Where it sits: computed by XLA on device from ``query_start_loc`` right before a kernel launch
(GPU and TPU); the kernel's grid runs over a static upper bound of items::

    q rows:  | seq0: 9 rows          | seq1: 1 | seq2: 3 | padding rows  |
    items:   [s0 b0][s0 b1][s0 b2]    [s1 b0]   [s2 b0]   [pad][pad] [none ...]
             item = (first q row, rows, seq or -1 for padding, position of its first row)

Everything is compare-and-count (no ``searchsorted`` loop: on GPU an XLA while loop costs a
launch per step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _num_items(num_tokens: int, max_seqs: int, block_q: int, q_min: int, q_max: int | None) -> int:
    """Static bound on the items of sequences with ``q_min < q_len <= q_max`` (+ padding items)."""
    if q_max is not None and q_max <= block_q:  # one item per sequence; padding goes elsewhere
        return min(max_seqs, num_tokens)
    n_seqs = min(max_seqs, num_tokens // (q_min + 1))
    return -(-num_tokens // block_q) + n_seqs + 1


def work_items(
    num_tokens: int,
    block_q: int,
    seq_lens: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
    *,
    q_min: int = 0,
    q_max: int | None = None,
) -> jax.Array:
    """``int32[num_items, 4]`` rows of (first q row, rows, seq or -1 for padding, first position).

    Covers the sequences with ``q_min < q_len <= q_max`` in ``block_q``-row items. When ``q_max``
    is None the rows after ``query_start_loc[num_seqs]`` are covered too, by padding items
    (seq -1) that write zeros. Items with 0 rows do nothing. Everything is compare-and-count
    (no ``searchsorted`` loop: on GPU an XLA while loop costs a launch per step).
    """
    max_seqs = seq_lens.shape[0]
    num_items = _num_items(num_tokens, max_seqs, block_q, q_min, q_max)
    n = jnp.clip(num_seqs[0], 0, max_seqs)
    starts = query_start_loc[:-1]
    q_len = query_start_loc[1:] - starts
    take = (jnp.arange(max_seqs) < n) & (q_len > q_min)
    if q_max is not None:
        take &= q_len <= q_max
    q_len = jnp.where(take, q_len, 0)
    end = query_start_loc[n]
    pad_rows = (num_tokens - end) if q_max is None else jnp.int32(0)
    counts = jnp.concatenate([-(-q_len // block_q), (-(-pad_rows // block_q))[None]])
    starts = jnp.concatenate([starts, end[None]])
    lens = jnp.concatenate([q_len, jnp.asarray(pad_rows, jnp.int32)[None]])
    first_pos = jnp.concatenate([seq_lens - q_len, jnp.zeros((1,), jnp.int32)])
    cum = jnp.cumsum(counts)
    w = jnp.arange(num_items, dtype=jnp.int32)
    owner = jnp.sum(cum[None, :] <= w[:, None], axis=1, dtype=jnp.int32)  # = searchsorted(cum, w, "right")
    has = owner <= max_seqs
    o = jnp.minimum(owner, max_seqs)
    blk = w - (cum[o] - counts[o])
    row0 = starts[o] + blk * block_q
    rows = jnp.where(has, jnp.clip(lens[o] - blk * block_q, 0, block_q), 0)
    seq = jnp.where(o == max_seqs, -1, o)
    pos0 = first_pos[o] + blk * block_q
    return jnp.stack([row0, rows, seq, pos0], axis=1).astype(jnp.int32)


def item_rows(items: jax.Array, block_q: int, num_tokens: int) -> jax.Array:
    """``int32[num_items * block_q]``: the q row of each item row, ``num_tokens`` where unused."""
    r = jnp.arange(block_q, dtype=jnp.int32)
    dest = jnp.where(r[None, :] < items[:, 1:2], items[:, 0:1] + r[None, :], num_tokens)
    return dest.reshape(-1)
