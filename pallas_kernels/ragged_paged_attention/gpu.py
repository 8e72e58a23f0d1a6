"""Ragged paged attention on CUDA GPUs: a Pallas kernel through the Triton lowering.

Where it sits: ``pallas_kernels.ragged_paged_attention`` dispatches here on GPU; the model's
attention layer calls it inside the jitted step. Semantics are ``reference.py``'s.

Work decomposition (all static shapes; the ragged structure lives in a small work list that
XLA computes on device from ``query_start_loc`` before the launch)::

    q rows:  | seq0: 9 rows          | seq1: 1 | seq2: 3 | padding rows  |
    items:   [s0 b0][s0 b1][s0 b2]    [s1 b0]   [s2 b0]   [pad][pad] [none ...]
             (block_q = 4 rows each; item = (first row, rows, seq, position of first row))
    grid:    (item, kv head, kv split)  -- num_items = cdiv(T, block_q) + max_seqs + 1 bounds it

One program takes ``block_q`` query rows x the ``G = num_q_heads / num_kv_heads`` q heads that
share a kv head, i.e. an ``[block_q * G, head_dim]`` tile, so every K/V byte a program loads is
used by all G heads (GQA costs no extra reads). It walks its sequence's pages in blocks of
``pages_per_block`` pages (``block_k = pages_per_block * page_size`` keys), gathering the rows
of those pages (``[P * page_size, kv_heads * head_dim]`` view of the pool: each key row of one
head is ``head_dim`` contiguous elements, 256 B for d=128 bf16: coalesced), and keeps an online
softmax in float32. Keys past the causal limit / window / sequence end are masked, and masked V
rows are zeroed before the PV product so NaN in unused pages cannot leak (``0 * NaN``).
Padding items write zeros into padding rows so the output is finite everywhere.

Decode launches need no work list: when every sequence's chunk fits one item (the decode class
of a two-launch plan, or a call of at most ``block_q`` tokens) the launch is *direct*. Its flat
grid runs over (live rank, kv head, split); each program counts the served sequences from
``query_start_loc`` in the kernel (one vector load), finds its sequence as the rank-th served one
(a cumsum), and idles past the live ones. The grid is bounded by the live programs over every
live count (``gpu_splits.direct_grid``), not by max_seqs x kv heads x splits (4096 programs, 3840
idle, for one sequence in the 16-row bucket). No XLA op runs before a direct launch.

Long contexts with few items (batch-1 decode) split each item's KV range over up to
``num_splits`` programs (FlashDecoding); each writes an unnormalised partial output with its
running max and sum, and a second small launch (grid item x kv head) merges them into the output
rows in place. The static ``num_splits`` is an upper bound sized by the bucket; how many splits a
call uses is decided on device from the live items (``active_splits``): the engine's 16-row
decode bucket holds one sequence or sixteen, and a static count cannot fill the GPU for the first
without over-splitting the second. Splits past the active count write nothing and the merge
reads only the active ones; an active split whose range is empty writes the neutral partial
(max = -1e30, sum = 0). An item with few KV blocks uses fewer splits (``min_blocks_per_split``),
so a short context is not cut into one-block programs with a wide merge. Split programs run 2
warps: more, smaller programs keep more page gathers in flight per SM (H200, KERNEL_NOTES_runs_1-9
run 8: 32 splits x 2 warps 33 us vs 16 x 4 warps 45 us).

A direct launch may have twins beside it (``GpuConfig``), every one over the same output with
its programs idle unless the live count is theirs (``gpu_splits.serves``): a wide twin (more keys
per step, fewer programs per SM; fp8 pools) takes the live counts whose rounds of programs it
finishes first, and a split twin (the arm ``DECODE_SPLIT_TWIN``) the few live sequences of a
large bucket that one program per (sequence, kv head) cannot spread over the SMs.

Why Triton and not Mosaic GPU: decode is memory-bound, and what matters is many independent
row gathers in flight (``num_stages`` pipelining of the page loads), which Triton's pointer loads
give directly; Mosaic GPU's TMA + wgmma wants rectangular tiles, which a gather of 16-row pages
is not. H200 (KERNEL_NOTES.md): 3.3 TB/s at 64 x 2048, 100% of the elementwise read+write
ceiling, 1.6x JAX's own Triton-lowered paged op (no Mosaic GPU paged kernel exists to compare).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import kv_format
from pallas_kernels.int8_f16 import int8_to_f16
from pallas_kernels.ragged_paged_attention import gpu_splits as sp
from pallas_kernels.ragged_paged_attention import reference
from pallas_kernels.ragged_paged_attention.gpu_config import GpuConfig, GpuPlan, default_config
from pallas_kernels.ragged_paged_attention.gpu_splits import active_splits
from pallas_kernels.ragged_paged_attention.work import work_items

__all__ = ["GpuConfig", "GpuPlan", "active_splits", "default_config", "ragged_paged_attention"]
F16_MAX = 65504.0
FP8_MAX = 448.0   # e4m3's largest finite value


def _to_dot(x: jax.Array, dot_dtype, int8_bits: bool) -> jax.Array:
    """A K / V tile of a quantized pool in the dots' dtype (``GpuConfig.int8_f16_bits``)."""
    if int8_bits and x.dtype == jnp.int8 and jnp.dtype(dot_dtype) == jnp.float16:
        return int8_to_f16(x)
    return x.astype(dot_dtype)


def _kernel(
    *refs,
    direct: bool,
    max_seqs: int,
    num_tokens: int,
    group: int,
    head_dim: int,
    page_size: int,
    block_q: int,
    pages_per_block: int,
    num_splits: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    quantized: bool,
    kv_compute: str | None,
    aliased: bool,
    per_item: bool,
    fused: bool,
    barriers: bool,
    min_blocks: int,
    num_kv_heads: int,
    gate: tuple[str, ...],
    int8_bits: bool,
):
    # Inputs: the work list int32[num_items, 4] (or, direct, seq_lens, query_start_loc, num_seqs),
    # page_table int32[max_seqs, pages_per_seq_padded], q [T, kvh * G * D], k and v
    # [P * page_size, kvh * D], then the optional ones popped below, then the outputs.
    rest = list(refs)
    meta = [rest.pop(0) for _ in range(3 if direct else 1)]
    page_table_ref, q_ref, k_ref, v_ref = (rest.pop(0) for _ in range(4))
    active_ref = rest.pop(0) if per_item and not direct else None  # int32[1]: splits in use (<= num_splits)
    ks_ref, vs_ref = (rest.pop(0), rest.pop(0)) if quantized else (None, None)
    if aliased:
        rest.pop(0)  # the previous launch's output: aliased to ours, rows we do not own stay as they are
    if fused:
        del rest[:2]  # base output and arrival counters: aliased to outputs 0 and 4
    outs = rest
    block_k = pages_per_block * page_size
    m_rows = block_q * group
    if direct:  # a flat grid over (live rank, kv head, split); programs past the live ones idle
        p = pl.program_id(0)
        live, item = sp.direct_items(meta, block_q=block_q, max_seqs=max_seqs)
        if gate:  # one of a narrow / wide pair or a split twin's pair: serve only its live counts
            live = jnp.where(sp.serves(gate, live, num_kv_heads), live, 0)
        call_splits = sp.splits_for(live, num_kv_heads, num_splits) if per_item else jnp.int32(1)
        w = p // (num_kv_heads * call_splits)  # the item's rank among the served sequences
        h = (p // call_splits) % num_kv_heads
        split = p % call_splits
        row0, nrows, seq, pos0 = item(w)
        nrows = jnp.where(w < live, nrows, 0)
    else:
        w, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        (items_ref,) = meta
        row0, nrows, seq, pos0 = (items_ref[w, c] for c in range(4))
    seq_c = jnp.maximum(seq, 0)

    r = jnp.arange(block_q, dtype=jnp.int32)
    rows = jnp.minimum(row0 + r, num_tokens - 1)
    row_ok = r < nrows
    qcols = pl.ds(h * group * head_dim, group * head_dim)
    q = q_ref[rows, qcols].reshape(m_rows, head_dim)
    dot_dtype = q.dtype
    qk8 = quantized and kv_compute == "float8" and k_ref.dtype == kv_format.FP8_BITS
    if qk8:   # q in e4m3 with a scale per row; K as stored
        qf = q.astype(jnp.float32)
        q_scale = jnp.maximum(jnp.max(jnp.abs(qf), axis=1), 1e-30) / FP8_MAX
        q8 = (qf / q_scale[:, None]).astype(kv_format.FP8)
    if quantized and kv_compute in ("float16", "float8"):
        dot_dtype = jnp.float16
        q = jnp.clip(q.astype(jnp.float32), -F16_MAX, F16_MAX).astype(jnp.float16)
    qpos = pos0 + jnp.arange(m_rows, dtype=jnp.int32) // group  # [M]

    # Visible keys of the item: [kv_lo, kv_hi); keys in [full_lo, pos0] are visible to every row.
    kv_lo, kv_hi, blk_lo, blk_hi = sp.item_kv_blocks(seq, nrows, pos0, block_k=block_k,
                                                   sliding_window=sliding_window)  # fmt: skip
    full_lo = jnp.int32(0) if sliding_window is None else jnp.maximum(pos0 + nrows - sliding_window, 0)
    nblk = jnp.maximum(blk_hi - blk_lo, 0)
    if not per_item:
        active = jnp.int32(1)
    elif direct:
        active = call_splits
    else:
        active = active_ref[0]
    if per_item and not fused:  # (the fused merge counts every split's arrival)
        active = sp.item_splits(nblk, active, min_blocks)
    per_split = (nblk + active - 1) // active
    b0 = blk_lo + split * per_split
    b1 = jnp.minimum(b0 + per_split, blk_hi)
    i_lo = jnp.clip((full_lo + block_k - 1) // block_k, b0, jnp.maximum(b1, b0))
    i_hi = jnp.clip((pos0 + 1) // block_k, i_lo, jnp.maximum(b1, i_lo))
    kcols = pl.ds(h * head_dim, head_dim)
    offs = jnp.arange(page_size, dtype=jnp.int32)

    def body(b, carry, masked: bool):
        acc, m_prev, l_prev = carry
        pages = page_table_ref[seq_c, pl.ds(b * pages_per_block, pages_per_block)]
        krow = (pages[:, None] * page_size + offs[None, :]).reshape(block_k)
        k = kv_format.values(k_ref[krow, kcols])   # fp8 pools hold uint8 bits: a register bitcast
        v = kv_format.values(v_ref[krow, kcols])
        kpos = b * block_k + jnp.arange(block_k, dtype=jnp.int32)
        if quantized:
            kscale = jnp.broadcast_to(ks_ref[pages, h][:, None], (pages_per_block, page_size)).reshape(
                block_k
            )
            vscale = jnp.broadcast_to(vs_ref[pages, h][:, None], (pages_per_block, page_size)).reshape(
                block_k
            )
            v = _to_dot(v, dot_dtype, int8_bits)
        if qk8:
            s = plgpu.dot(q8, k, trans_b=True) * (q_scale[:, None] * kscale[None, :])
        else:
            if quantized:
                k = _to_dot(k, dot_dtype, int8_bits)
            s = plgpu.dot(q, k, trans_b=True)  # [M, block_k] float32
            if quantized:
                s = s * kscale[None, :]
        s = s * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        if masked:
            mask = kpos[None, :] <= qpos[:, None]
            if sliding_window is not None:
                mask = mask & (kpos[None, :] > qpos[:, None] - sliding_window)
            s = jnp.where(mask, s, sp.NEG)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new[:, None])
        if masked:
            p = jnp.where(mask, p, 0.0)
        l_new = l_prev * alpha + jnp.sum(p, axis=1)
        if masked:
            live = kpos < kv_hi  # keys past the context may be garbage / NaN (and so may their scales)
            v = jnp.where(live[:, None], v, jnp.zeros_like(v))
            if quantized:
                vscale = jnp.where(live, vscale, 0.0)
        if quantized:
            p = p * vscale[None, :]
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l_new

    carry = (
        jnp.zeros((m_rows, head_dim), jnp.float32),
        jnp.full((m_rows,), sp.NEG, jnp.float32),
        jnp.zeros((m_rows,), jnp.float32),
    )
    carry = jax.lax.fori_loop(b0, i_lo, functools.partial(body, masked=True), carry)
    carry = jax.lax.fori_loop(i_lo, i_hi, functools.partial(body, masked=False), carry)
    acc, m_i, l_i = jax.lax.fori_loop(i_hi, b1, functools.partial(body, masked=True), carry)

    # Stores use array indices on every axis (Pallas interpret mode supports masked stores only so).
    store_mask = row_ok[:, None]
    rr = (row0 + r)[:, None]  # unclamped: masked rows may be out of range, never duplicates
    qc = (h * group * head_dim + jnp.arange(group * head_dim, dtype=jnp.int32))[None, :]
    if not per_item:
        (o_ref,) = outs
        out = acc / jnp.maximum(l_i, 1e-30)[:, None]
        out = out.reshape(block_q, group * head_dim).astype(o_ref.dtype)
        plgpu.store(o_ref.at[rr, qc], out, mask=store_mask)
        if direct and not aliased:

            @pl.when(p < num_kv_heads)  # program p zeroes kv head p's columns of the padding rows
            def _pad():
                cols = (p * group * head_dim + jnp.arange(group * head_dim, dtype=jnp.int32))[None, :]
                sp.zero_padding_rows(o_ref, meta[1], meta[2], cols, block_q=block_q, max_seqs=max_seqs,
                                   num_tokens=num_tokens)  # fmt: skip
    else:  # partials are indexed by (split, item row), not by token row: their size is items x block_q
        if fused:
            fin_ref, op_ref, m_ref, l_ref, cnt_ref = outs
        else:
            op_ref, m_ref, l_ref = outs
        pr = (w * block_q + r)[:, None]
        hc = (h * group + jnp.arange(group, dtype=jnp.int32))[None, :]

        @pl.when(split < active)  # splits past this call's count own no keys and write nothing
        def _store_partial():
            plgpu.store(op_ref.at[split, pr, qc], acc.reshape(block_q, group * head_dim), mask=store_mask)
            plgpu.store(m_ref.at[split, pr, hc], m_i.reshape(block_q, group), mask=store_mask)
            plgpu.store(l_ref.at[split, pr, hc], l_i.reshape(block_q, group), mask=store_mask)

        if fused:
            if barriers:  # (no-op in interpret mode, where programs run one after another)
                plgpu.debug_barrier()  # every thread's partial stores are issued before the release
            done = plgpu.atomic_add(cnt_ref, (w * pl.num_programs(1) + h,), jnp.int32(1))

            @pl.when(done == num_splits - 1)
            def _merge():
                if barriers:
                    plgpu.debug_barrier()

                out = sp.merge_splits(op_ref, m_ref, l_ref, num_splits, pr, qc, hc, head_dim, volatile=True)
                plgpu.store(fin_ref.at[rr, qc], out.astype(fin_ref.dtype), mask=store_mask)


def _launch(
    cfg: GpuConfig,
    meta: tuple[jax.Array, ...],
    base: jax.Array | None,
    pt: jax.Array,
    q2: jax.Array,
    k2: jax.Array,
    v2: jax.Array,
    scales: list[jax.Array],
    *,
    out_dtype,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    page_size: int,
    interpret: bool,
    gate: tuple[str, ...] = (),
    max_live: int | None = None,
    **static,
) -> jax.Array:
    """One pallas_call; returns ``[T, kvh * G * D]``.

    ``meta`` is ``(items,)`` (a work list) or ``(seq_lens, query_start_loc, num_seqs)``: a direct
    decode launch, one item per sequence, computed in the kernel (no XLA launches before it).
    Rows the items do not own come from ``base`` (written in place) or, when ``base`` is None,
    are left unwritten (work list: its padding items write them) or zeroed (direct). With splits
    the call uses ``active_splits`` of them (decided on device from the live items) and a second
    small launch merges the per-item partials into the output. A config with twins is several
    launches, each serving the live counts ``gate`` names (``gpu_splits.serves``): the split
    twin (``split_twin``) fewer than ``TARGET_PROGRAMS`` live programs, its partials sized for
    that many sequences at most (``max_live``); a wide twin (``wide_pages_per_block``) the counts
    ``wide_keys_win`` gives it.
    """
    if cfg.split_twin is not None or cfg.wide_pages_per_block:
        if len(meta) != 3:
            raise ValueError("GpuConfig.split_twin / wide_pages_per_block need a direct decode launch")
        common = dict(out_dtype=out_dtype, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                      page_size=page_size, interpret=interpret, **static)
        if cfg.split_twin is not None:
            base = _launch(dataclasses.replace(cfg, split_twin=None), meta, base, pt, q2, k2, v2, scales,
                           gate=(*gate, "many"), **common)
            return _launch(cfg.split_twin, meta, base, pt, q2, k2, v2, scales, gate=(*gate, "few"),
                           max_live=sp.twin_live(pt.shape[0], num_kv_heads), **common)
        narrow = dataclasses.replace(cfg, wide_pages_per_block=None)
        wide = dataclasses.replace(narrow, pages_per_block=cfg.wide_pages_per_block)
        base = _launch(narrow, meta, base, pt, q2, k2, v2, scales, gate=(*gate, "narrow"), **common)
        return _launch(wide, meta, base, pt, q2, k2, v2, scales, gate=(*gate, "wide"), **common)
    num_tokens, width = q2.shape
    hw = num_kv_heads * group
    direct = len(meta) == 3
    max_seqs = pt.shape[0]
    if pt.shape[1] % cfg.pages_per_block:
        pt = jnp.pad(pt, ((0, 0), (0, -pt.shape[1] % cfg.pages_per_block)))
    ns, bq = cfg.num_splits, cfg.block_q
    num_items = (max_live or max_seqs) if direct else meta[0].shape[0]
    per_item = ns > 1
    fused = per_item and cfg.fused_combine
    if fused and direct:
        raise ValueError("GpuConfig.fused_combine needs a work list (not a direct decode launch)")
    args = [*meta, pt, q2, k2, v2]
    active = None
    if per_item and not direct:
        active = jnp.full((1,), ns, jnp.int32) if fused else active_splits(meta[0], num_kv_heads, ns)
        args.append(active)
    args += scales
    aliases = {}
    if per_item:
        n_rows = num_items * bq
        out_shape = (
            jax.ShapeDtypeStruct((ns, n_rows, width), jnp.float32),
            jax.ShapeDtypeStruct((ns, n_rows, hw), jnp.float32),
            jax.ShapeDtypeStruct((ns, n_rows, hw), jnp.float32),
        )
        if fused:  # final rows + partials + per-(item, head) arrival counter (zeros, aliased in)
            if base is None:
                base = jnp.zeros((num_tokens, width), out_dtype)
            aliases = {len(args): 0, len(args) + 1: 4}
            args += [base, jnp.zeros((num_items * num_kv_heads,), jnp.int32)]
            out_shape = (
                jax.ShapeDtypeStruct((num_tokens, width), out_dtype),
                *out_shape,
                jax.ShapeDtypeStruct((num_items * num_kv_heads,), jnp.int32),
            )
    else:
        out_shape = jax.ShapeDtypeStruct((num_tokens, width), out_dtype)
        if base is not None:
            aliases = {len(args): 0}
            args.append(base)
    kernel = functools.partial(
        _kernel, direct=direct, max_seqs=max_seqs, num_tokens=num_tokens, group=group, head_dim=head_dim,
        page_size=page_size, block_q=bq, pages_per_block=cfg.pages_per_block, num_splits=ns,
        quantized=bool(scales), kv_compute=cfg.kv_compute, aliased=bool(aliases) and not fused,
        per_item=per_item, fused=fused,
        barriers=not interpret, min_blocks=cfg.min_blocks_per_split, num_kv_heads=num_kv_heads, gate=gate,
        int8_bits=cfg.int8_f16_bits, **static,
    )  # fmt: skip
    out = pl.pallas_call(
        kernel,
        grid=(sp.direct_grid(num_items, num_kv_heads, ns),) if direct else (num_items, num_kv_heads, ns),
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(*args)
    if not per_item:
        return out
    if fused:
        return out[0]
    if base is None and not direct:
        base = jnp.zeros((num_tokens, width), out_dtype)
    combine = functools.partial(
        sp.combine_kernel, block_q=bq, head_dim=head_dim, num_splits=ns, direct=direct,
        aliased=base is not None, max_seqs=max_seqs, num_kv_heads=num_kv_heads, num_tokens=num_tokens,
        block_k=cfg.pages_per_block * page_size, sliding_window=static["sliding_window"],
        min_blocks=cfg.min_blocks_per_split, gate=gate,
    )  # fmt: skip
    cargs = [*meta] + ([] if direct else [active]) + list(out)
    caliases = {}
    if base is not None:
        caliases = {len(cargs): 0}
        cargs.append(base)
    return pl.pallas_call(
        combine,
        grid=(num_items, hw),
        out_shape=jax.ShapeDtypeStruct((num_tokens, width), out_dtype),
        input_output_aliases=caliases,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="ragged_paged_attention_combine",
    )(*cargs)


def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    seq_lens: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    interpret: bool = False,
    config: GpuConfig | GpuPlan | None = None,
    max_q_len: int | None = None,
    decode_rows: int = 1,
) -> jax.Array:
    """GPU kernel with ``reference.ragged_paged_attention``'s signature and semantics.

    ``q: [num_tokens, num_q_heads, head_dim]``, pools ``[num_pages, page_size, num_kv_heads,
    head_dim]`` -> ``[num_tokens, num_q_heads, head_dim]``. ``config`` overrides the heuristic:
    a ``GpuConfig`` runs one launch over every sequence, a ``GpuPlan`` two (decode / prefill).
    ``max_q_len`` (static): a promise that no sequence has more query rows (the engine's decode
    steps pass 1). When it fits the decode class's tile, the call is one direct decode launch
    (plus its split merge) whatever the token count: no prefill launch, no work list.
    ``decode_rows`` (static): the heuristic's decode tile holds that many rows (``default_config``).
    """
    reference.validate_inputs(
        q, k_pages, v_pages, page_table, seq_lens, query_start_loc, num_seqs,
        sliding_window=sliding_window, soft_cap=soft_cap, k_scales=k_scales, v_scales=v_scales,
    )  # fmt: skip
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    max_seqs, pages_per_seq = page_table.shape
    if num_tokens == 0:
        return q
    if max_q_len is not None and (not isinstance(max_q_len, int) or max_q_len < 1):
        raise ValueError(f"max_q_len must be a positive int or None, got {max_q_len!r}")
    if not isinstance(decode_rows, int) or decode_rows < 1:
        raise ValueError(f"decode_rows must be a positive int, got {decode_rows!r}")
    if page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two for the GPU kernel, got {page_size}")
    kv_format.check_addressable(k_pages, "ragged_paged_attention")
    cfg = config or default_config(num_tokens, max_seqs, num_q_heads, num_kv_heads, page_size, pages_per_seq,
                                   decode_rows if max_q_len is None else min(decode_rows, max_q_len),
                                   kv_pool=_pool_kind(k_pages, k_scales), head_dim=head_dim)
    group = num_q_heads // num_kv_heads
    gp, dp = sp.pow2(group), sp.pow2(max(head_dim, 16))
    qx = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    if (gp, dp) != (group, head_dim):  # Triton tiles need power-of-two extents
        qx = jnp.pad(qx, ((0, 0), (0, 0), (0, gp - group), (0, dp - head_dim)))
    if dp != head_dim:
        pad = ((0, 0), (0, 0), (0, 0), (0, dp - head_dim))
        k_pages, v_pages = jnp.pad(k_pages, pad), jnp.pad(v_pages, pad)
    q2 = qx.reshape(num_tokens, num_kv_heads * gp * dp)
    k2 = k_pages.reshape(num_pages * page_size, num_kv_heads * dp)
    v2 = v_pages.reshape(num_pages * page_size, num_kv_heads * dp)
    scales = [] if k_scales is None else [k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)]
    meta = (seq_lens, query_start_loc, num_seqs)
    common = dict(
        out_dtype=q.dtype, num_kv_heads=num_kv_heads, group=gp, head_dim=dp, page_size=page_size,
        interpret=interpret, sm_scale=float(sm_scale), sliding_window=sliding_window, soft_cap=soft_cap,
    )  # fmt: skip
    if isinstance(cfg, GpuPlan) and max_q_len is not None and max_q_len <= cfg.decode.block_q:
        cfg = cfg.decode  # no sequence reaches the prefill class
    if isinstance(cfg, GpuConfig):
        # Every sequence of a call with at most block_q rows each is one item: no work list needed.
        fits = num_tokens <= cfg.block_q or (max_q_len is not None and max_q_len <= cfg.block_q)
        direct = fits and not cfg.fused_combine
        launch_meta = meta if direct else (work_items(num_tokens, cfg.block_q, *meta),)
        out = _launch(cfg, launch_meta, None, page_table, q2, k2, v2, scales, **common)
    else:
        dq = cfg.decode.block_q
        items = work_items(num_tokens, cfg.prefill.block_q, *meta, q_min=dq)
        out = _launch(cfg.prefill, (items,), None, page_table, q2, k2, v2, scales, **common)
        launch_meta = (work_items(num_tokens, dq, *meta, q_max=dq),) if cfg.decode.fused_combine else meta
        out = _launch(cfg.decode, launch_meta, out, page_table, q2, k2, v2, scales, **common)
    out = out.reshape(num_tokens, num_kv_heads, gp, dp)[:, :, :group, :head_dim]
    return out.reshape(num_tokens, num_q_heads, head_dim)


def _pool_kind(k_pages: jax.Array, k_scales: jax.Array | None) -> str | None:
    """``default_config``'s ``kv_pool``: None (unquantized), "fp8" (uint8 bits or e4m3) or "int8"."""
    if k_scales is None:
        return None
    return "int8" if k_pages.dtype == jnp.int8 else "fp8"
