"""Split-KV bookkeeping of the GPU ragged paged attention kernel (``gpu.py``).

Where it sits: inside ``gpu.py``'s launches. How a direct decode launch maps its flat grid of
programs to (served sequence, kv head, split), how many KV splits a call and each item use, and
the second launch that merges the splits' partial outputs (FlashDecoding). Everything here runs
in the kernels (scalar and small vector ops on ``query_start_loc``) or, for a work-list launch,
as one XLA op (``active_splits``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

NEG = -1e30
SMS = 132   # an H100's / H200's
TARGET_PROGRAMS = 2 * SMS  # about two waves
# A direct launch and its wide twin (``GpuConfig.wide_pages_per_block``; fp8 pools at head_dim
# 128): programs an SM holds of each (168 / 255 registers at 64 / 128 keys per step,
# benchmarks/offline_attention.py) and a wide program's time in percent of a narrow one's where
# both need as many rounds (H100, 2026-12-06: 227 / 309 us at 16 x 8k, 484 / 645 at 64 x 8k).
NARROW_PER_SM, WIDE_PER_SM, WIDE_TIME_PCT = 3, 2, 74
# A direct launch's programs read num_seqs, query_start_loc and seq_lens in one round of loads
# and pick their item in registers (``direct_items``), not in three dependent rounds (num_seqs,
# then the masked query_start_loc vector, then the item's scalars). Off: the A/B
# (step_floor --ab attn-meta-three-rounds; H100, 2026-12-05, the 8B's batch-1 step -0.3%).
DIRECT_ONE_ROUND = True


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def decode_item(w, sl_ref, qsl_ref, nseq_ref, *, block_q: int, max_seqs: int):
    """Direct decode item ``w`` = sequence ``w`` (no work list): ``(first row, rows, seq or -1,
    position of the first row)``; rows = q_len when ``1 <= q_len <= block_q`` and ``w <
    num_seqs``, else 0 (the sequence belongs to the other launch, or to nobody)."""
    n = jnp.clip(nseq_ref[0], 0, max_seqs)
    start = qsl_ref[w]
    q_len = qsl_ref[w + 1] - start
    take = (w < n) & (q_len > 0) & (q_len <= block_q)
    return start, jnp.where(take, q_len, 0), jnp.where(take, w, -1), sl_ref[w] - q_len


def live_decode_mask(qsl_ref, nseq_ref, *, block_q: int, max_seqs: int):
    """``bool[S]`` (S = max_seqs padded to a power of two >= 16): which sequences a direct decode
    launch serves (``w < num_seqs`` and ``1 <= q_len <= block_q``), from one masked vector load of
    ``query_start_loc`` in the kernel (no XLA launch before it)."""
    n = jnp.clip(nseq_ref[0], 0, max_seqs)
    i = jnp.arange(max(pow2(max_seqs), 16), dtype=jnp.int32)
    ok = i < n
    a = plgpu.load(qsl_ref.at[jnp.minimum(i, max_seqs)], mask=ok, other=0)
    b = plgpu.load(qsl_ref.at[jnp.minimum(i + 1, max_seqs)], mask=ok, other=0)
    q_len = b - a
    return ok & (q_len > 0) & (q_len <= block_q)


def nth_live(live_mask, k, max_seqs: int):
    """Index of the ``k``-th (from 0) served sequence; ``max_seqs - 1`` when there are fewer."""
    cum = jnp.cumsum(live_mask.astype(jnp.int32))
    return jnp.minimum(jnp.sum((cum <= k).astype(jnp.int32)), max_seqs - 1)


def direct_items(meta, *, block_q: int, max_seqs: int):
    """A direct launch's served sequences: -> (how many, ``item(k)`` = ``decode_item`` of the
    ``k``-th served one). ``meta`` = (seq_lens, query_start_loc, num_seqs) refs."""
    sl_ref, qsl_ref, nseq_ref = meta
    if not DIRECT_ONE_ROUND:
        live_mask = live_decode_mask(qsl_ref, nseq_ref, block_q=block_q, max_seqs=max_seqs)
        return (jnp.sum(live_mask.astype(jnp.int32)),
                lambda k: decode_item(nth_live(live_mask, k, max_seqs), *meta, block_q=block_q,
                                      max_seqs=max_seqs))
    # Every load in one round: indices clamped in bounds, entries past num_seqs masked after.
    i = jnp.arange(max(pow2(max_seqs), 16), dtype=jnp.int32)
    n = jnp.clip(nseq_ref[0], 0, max_seqs)
    start = plgpu.load(qsl_ref.at[jnp.minimum(i, max_seqs)])
    q_len = plgpu.load(qsl_ref.at[jnp.minimum(i + 1, max_seqs)]) - start
    sl = plgpu.load(sl_ref.at[jnp.minimum(i, max_seqs - 1)])
    live_mask = (i < n) & (q_len > 0) & (q_len <= block_q)

    def item(k):
        w = nth_live(live_mask, k, max_seqs)
        at = i == w

        def pick(v):
            return jnp.sum(jnp.where(at, v, 0))

        take = pick(live_mask.astype(jnp.int32)) > 0
        rows = pick(q_len)
        return pick(start), jnp.where(take, rows, 0), jnp.where(take, w, -1), pick(sl) - rows

    return jnp.sum(live_mask.astype(jnp.int32)), item


def direct_grid(max_seqs: int, num_kv_heads: int, num_splits: int) -> int:
    """Programs of a direct launch: a bound on live x kv heads x splits over every live count
    (``splits_for`` keeps it under ``TARGET_PROGRAMS + live x kv heads``), not max_seqs x kv heads
    x splits: the engine's decode buckets hold far more rows than live sequences, and idle
    programs still take a slot (and their shared-memory pipeline buffers) on an SM."""
    full = max_seqs * num_kv_heads
    return min(full * num_splits, max(full, TARGET_PROGRAMS + full)) if num_splits > 1 else full


def wide_keys_win(programs):
    """Whether the wide launch finishes first for ``programs`` live programs (traced int32 ->
    bool): its rounds of ``SMS x WIDE_PER_SM`` at ``WIDE_TIME_PCT`` against the narrow one's rounds
    of ``SMS x NARROW_PER_SM``. 40 x 8 kv heads: 2 rounds against 1, narrow; 16 or 64 x 8: wide."""
    narrow = (programs + SMS * NARROW_PER_SM - 1) // (SMS * NARROW_PER_SM)
    wide = (programs + SMS * WIDE_PER_SM - 1) // (SMS * WIDE_PER_SM)
    return wide * WIDE_TIME_PCT < narrow * 100


def serves(gate: tuple[str, ...], live, num_kv_heads: int):
    """Whether a gated direct launch serves ``live`` sequences (traced bool; every condition
    holds): "narrow" / "wide" (``wide_keys_win`` false / true), "few" / "many" (``live x kv
    heads`` below / at least ``TARGET_PROGRAMS``: a split twin's share and its unsplit launch's)."""
    programs = live * num_kv_heads
    wide, few = wide_keys_win(programs), programs < TARGET_PROGRAMS
    holds = {"narrow": ~wide, "wide": wide, "few": few, "many": ~few}
    ok = jnp.bool_(True)
    for g in gate:
        ok = ok & holds[g]
    return ok


def twin_live(rows: int, num_kv_heads: int) -> int:
    """The most sequences a split twin serves in a launch of ``rows`` items (its programs stay
    below ``TARGET_PROGRAMS``): what its partials are sized for."""
    return min(rows, (TARGET_PROGRAMS - 1) // num_kv_heads)


def item_kv_blocks(seq, nrows, pos0, *, block_k: int, sliding_window: int | None):
    """An item's visible keys ``[kv_lo, kv_hi)`` and their ``block_k`` blocks ``[blk_lo, blk_hi)``
    (empty for items without rows or without a sequence)."""
    kv_hi = jnp.where((seq >= 0) & (nrows > 0), pos0 + nrows, 0)
    kv_lo = jnp.int32(0) if sliding_window is None else jnp.maximum(pos0 - sliding_window + 1, 0)
    return kv_lo, kv_hi, kv_lo // block_k, (kv_hi + block_k - 1) // block_k


def item_splits(nblk, active, min_blocks: int):
    """Splits one item uses: the call's ``active`` count, fewer when its blocks are few."""
    return jnp.clip((nblk + min_blocks - 1) // min_blocks, 1, active)


def splits_for(live, num_kv_heads: int, num_splits: int):
    """KV splits for ``live`` sequences: enough for ~``TARGET_PROGRAMS`` programs, at most
    ``num_splits`` (scalar int32; traced on device or in-kernel)."""
    want = (TARGET_PROGRAMS + live * num_kv_heads - 1) // jnp.maximum(live * num_kv_heads, 1)
    return jnp.clip(want, 1, num_splits).astype(jnp.int32)


def zero_padding_rows(o_ref, qsl_ref, nseq_ref, cols, *, block_q: int, max_seqs: int, num_tokens: int):
    """Zeros into rows ``[query_start_loc[num_seqs], num_tokens)`` at ``cols`` [1, C], ``block_q``
    rows per store (direct launches own the whole output; with ``max_q_len`` the padding can
    span several tiles)."""
    r = jnp.arange(block_q, dtype=jnp.int32)
    start = qsl_ref[jnp.clip(nseq_ref[0], 0, max_seqs)]
    zeros = jnp.zeros((block_q, cols.shape[1]), o_ref.dtype)

    def tile(i, carry):
        rr = start + i * block_q + r
        plgpu.store(o_ref.at[rr[:, None], cols], zeros, mask=(rr < num_tokens)[:, None])
        return carry

    jax.lax.fori_loop(0, (num_tokens - start + block_q - 1) // block_q, tile, jnp.int32(0))


def merge_splits(op_ref, m_ref, l_ref, n, pr, qc, hc, head_dim: int, volatile: bool) -> jax.Array:
    """Merge the first ``n`` splits' partials of one (item, kv head): rows ``pr`` [bq, 1], output
    columns ``qc`` [1, G * D], head columns ``hc`` [1, G] -> normalised rows [bq, G * D] (float32).

    ``volatile``: bypass L1 (the fused path reads partials other programs wrote in this launch).
    """
    bq, gd = pr.shape[0], qc.shape[1]
    m_rows = bq * hc.shape[1]

    def part(sp):
        o_s = plgpu.load(op_ref.at[sp, pr, qc], volatile=volatile)
        m_s = plgpu.load(m_ref.at[sp, pr, hc], volatile=volatile)
        l_s = plgpu.load(l_ref.at[sp, pr, hc], volatile=volatile)
        return o_s.reshape(m_rows, head_dim), m_s.reshape(m_rows), l_s.reshape(m_rows)

    m_all = jax.lax.fori_loop(0, n, lambda sp, m: jnp.maximum(m, part(sp)[1]),
                              jnp.full((m_rows,), NEG, jnp.float32))  # fmt: skip

    def add(sp, carry):
        num, den = carry
        o_s, m_s, l_s = part(sp)
        wgt = jnp.exp(m_s - m_all)
        return num + o_s * wgt[:, None], den + l_s * wgt

    zero = (jnp.zeros((m_rows, head_dim), jnp.float32), jnp.zeros((m_rows,), jnp.float32))
    num, den = jax.lax.fori_loop(0, n, add, zero)
    return (num / jnp.maximum(den, 1e-30)[:, None]).reshape(bq, gd)


def combine_kernel(*refs, block_q: int, head_dim: int, num_splits: int, direct: bool, aliased: bool,
                    max_seqs: int, num_kv_heads: int, num_tokens: int, block_k: int,
                    sliding_window: int | None, min_blocks: int, gate: tuple[str, ...] = ()):
    """Grid (item, q head): merge the call's active splits into the item's output rows. With
    ``aliased`` the output is ``base`` (other rows keep their values); without (direct launches
    over the whole output) program 0 also writes the padding rows' zeros.

    All splits are loaded at once as one ``[S, block_q, D]`` tile (S = splits padded to a power of
    two, masked past the active count) and reduced in registers: a loop over splits would chain
    one global-memory round trip per split (what made the fused merge slow, KERNEL_NOTES_runs_1-9 run 3).
    """
    refs = list(refs)
    meta = [refs.pop(0) for _ in range(3 if direct else 1)]
    active_ref = None if direct else refs.pop(0)
    op_ref, m_ref, l_ref = refs[:3]
    o_ref = refs[-1]  # (base, when aliased, sits before it)
    w, hq = pl.program_id(0), pl.program_id(1)
    if direct:  # program w merges the w-th served sequence (partials are indexed by that rank)
        live, item = direct_items(meta, block_q=block_q, max_seqs=max_seqs)
        if gate:  # a split twin's merge: idle where its launch did not serve
            live = jnp.where(serves(gate, live, num_kv_heads), live, 0)
        row0, nrows, seq, pos0 = item(w)
        nrows = jnp.where(w < live, nrows, 0)
        active = splits_for(live, num_kv_heads, num_splits)
    else:
        row0, nrows, seq, pos0 = (meta[0][w, c] for c in range(4))
        active = active_ref[0]
    _, _, blk_lo, blk_hi = item_kv_blocks(seq, nrows, pos0, block_k=block_k, sliding_window=sliding_window)
    active = item_splits(jnp.maximum(blk_hi - blk_lo, 0), active, min_blocks)
    s_pad = pow2(num_splits)
    sp = jnp.arange(s_pad, dtype=jnp.int32)
    valid = sp < active
    spc = jnp.minimum(sp, num_splits - 1)  # masked lanes still index in bounds
    r = jnp.arange(block_q, dtype=jnp.int32)
    pr = w * block_q + r
    d = hq * head_dim + jnp.arange(head_dim, dtype=jnp.int32)
    # Only the item's live rows of its active splits are read (the rest is uninitialised memory).
    v2 = valid[:, None] & (r < nrows)[None, :]
    v3 = jnp.broadcast_to(v2[:, :, None], (s_pad, block_q, head_dim))
    hcol = jnp.full((1, 1), hq, jnp.int32)
    m_s = plgpu.load(m_ref.at[spc[:, None], pr[None, :], hcol], mask=v2, other=NEG)
    l_s = plgpu.load(l_ref.at[spc[:, None], pr[None, :], hcol], mask=v2, other=0.0)
    o_s = plgpu.load(op_ref.at[spc[:, None, None], pr[None, :, None], d[None, None, :]], mask=v3, other=0.0)
    m_s = jnp.where(v2, m_s, NEG)
    m_all = jnp.max(m_s, axis=0)  # [bq]
    wgt = jnp.where(v2, jnp.exp(m_s - m_all[None, :]), 0.0)  # [S, bq]
    num = jnp.sum(jnp.where(v3, o_s, 0.0) * wgt[:, :, None], axis=0)  # [bq, D]
    den = jnp.sum(jnp.where(v2, l_s, 0.0) * wgt, axis=0)
    out = num / jnp.maximum(den, 1e-30)[:, None]
    rr = (row0 + r)[:, None]
    plgpu.store(o_ref.at[rr, d[None, :]], out.astype(o_ref.dtype), mask=(r < nrows)[:, None])
    if direct and not aliased:

        @pl.when(w == 0)
        def _pad():
            zero_padding_rows(o_ref, meta[1], meta[2], d[None, :], block_q=block_q, max_seqs=max_seqs,
                               num_tokens=num_tokens)  # fmt: skip


def active_splits(items: jax.Array, num_kv_heads: int, num_splits: int) -> jax.Array:
    """``int32[1]``: KV splits this call uses, from the live items (rows > 0) on device: enough
    for ~2 waves of an H100/H200's 132 SMs (264 programs), at most ``num_splits``. A batch-1
    decode in a 16-row bucket gets all 16 splits; 16 live sequences get 3."""
    live = jnp.sum(items[:, 1] > 0).astype(jnp.int32)
    return splits_for(live, num_kv_heads, num_splits)[None]


