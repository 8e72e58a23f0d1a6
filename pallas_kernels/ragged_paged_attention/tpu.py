"""Ragged paged attention on TPUs: a Pallas Mosaic TPU kernel with manual page DMAs.

Where it sits: ``pallas_kernels.ragged_paged_attention`` dispatches here on TPU; the model's
attention layer calls it inside the jitted step. Semantics are ``reference.py``'s; tested on CPU
through the TPU interpret mode (``interpret=True`` passes ``pltpu.InterpretParams()``).

Data flow of one grid step (one work item = up to ``block_q`` query rows of one sequence, see
``work.py``; the grid runs over items, all kv heads inside)::

    HBM pool [P, page, kvh*d] --(one DMA per page: page x kvh*d contiguous)--> VMEM K/V slot s
    VMEM slots: [2, block_k, kvh*d]   block b+1 streams in while block b is computed
    per kv head h:  s = q_h [G*block_q, d] @ K_h^T [d, block_k]  -> online softmax -> acc_h

The item's query rows are gathered by XLA into ``[items, kvh, G*block_q, d]`` tiles (every
item owns its tile, so no store can clobber a neighbour's rows) and its output tiles are
scattered back to token rows after the kernel; for decode both are tiny next to the KV stream.

Block sizes, from the published chip parameters (``pltpu.get_tpu_info_for_chip``):
  * VMEM is 128 MiB on v5e/v6e, 64 MiB on v5p/v7 (of which the compiler's default scoped limit
    is 16-32 MiB). K+V double buffers cost ``2 x 2 x block_k x kvh x d x bytes``: with
    block_k = 512 keys, kvh = 8, d = 128, bf16 that is 4 MiB, a quarter of the smallest scoped
    limit, leaving room for Pallas' double-buffered q/o tiles and the f32 accumulators
    (``kvh x rows x d x 4`` B: 512 KiB for 128-row prefill tiles).
  * The MXU is 128 wide (v5e/v5p) or 256 wide (v6e/v7): block_k = 512 keys is a multiple of
    both, so the ``[rows, block_k]`` score tile and the ``[block_k, d]`` PV operand fill whole
    MXU passes; rows = G * block_q is a multiple of the 8 sublanes.
  * HBM streams at 0.8 (v5e) to 3.7 TB/s (v7); with the grid sequential on a TensorCore only
    one block is in flight while the previous is computed, so a block must be large enough to
    cover DMA latency: 512 keys x 8 heads x 128 x 2 B x 2 = 2 MiB per block, i.e. ~1.3 us of
    v6e bandwidth per block against ~1 us of DMA issue latency; smaller pages only mean more
    (32 per block for page 16), still contiguous, descriptors.
head_dim should be a multiple of 128 on hardware (lane-aligned per-head slices of a page row);
the interpret mode accepts any.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import kv_format
from pallas_kernels.ragged_paged_attention import reference
from pallas_kernels.ragged_paged_attention.work import item_rows, work_items

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Static launch parameters: query rows per item and pages per KV block."""

    block_q: int = 8
    pages_per_block: int = 32

    def __post_init__(self) -> None:
        for name in ("block_q", "pages_per_block"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TpuConfig.{name} must be a positive int, got {v!r}")


def default_config(
    num_tokens: int, max_seqs: int, group: int, page_size: int, pages_per_seq: int
) -> TpuConfig:
    """Rows G*block_q = 8 (one sublane tile) for decode-like buckets, 128 for prefill-like ones;
    block_k = 512 keys (see the module docstring), capped by the longest context."""
    rows = 128 if num_tokens >= 4 * max_seqs else 8
    block_q = max(1, rows // group)
    ppb = max(1, min(512 // page_size, pages_per_seq))
    return TpuConfig(block_q=block_q, pages_per_block=ppb)


def _kernel(
    items_ref,  # SMEM int32[num_items * 4]
    pt_ref,  # SMEM int32[max_seqs * pages_per_seq_padded]
    q_ref,  # VMEM [kvh, rows, d]
    k_hbm,  # HBM [P, page, kvh * d]
    v_hbm,
    *rest,
    pages_per_seq: int,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    page_size: int,
    block_q: int,
    pages_per_block: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    quantized: bool,
):
    rest = list(rest)
    ks_hbm, vs_hbm = (rest.pop(0), rest.pop(0)) if quantized else (None, None)
    o_ref, k_buf, v_buf = rest[:3]
    rest = rest[3:]
    ks_buf, vs_buf = (rest.pop(0), rest.pop(0)) if quantized else (None, None)
    sem, acc_ref, m_ref, l_ref = rest
    w = pl.program_id(0)
    nrows = items_ref[4 * w + 1]
    seq = items_ref[4 * w + 2]
    pos0 = items_ref[4 * w + 3]
    seq_c = jnp.maximum(seq, 0)
    block_k = pages_per_block * page_size
    rows = group * block_q
    d = head_dim

    kv_hi = jnp.where(seq >= 0, pos0 + nrows, 0)
    kv_lo = 0 if sliding_window is None else jnp.maximum(pos0 - sliding_window + 1, 0)
    b_lo = kv_lo // block_k
    b_hi = jnp.maximum((kv_hi + block_k - 1) // block_k, b_lo)

    def copies(b, slot):
        cps = []
        for j in range(pages_per_block):
            page = pt_ref[seq_c * pages_per_seq + b * pages_per_block + j]
            dst = pl.ds(j * page_size, page_size)
            cps.append(pltpu.make_async_copy(k_hbm.at[page], k_buf.at[slot, dst], sem.at[0, slot]))
            cps.append(pltpu.make_async_copy(v_hbm.at[page], v_buf.at[slot, dst], sem.at[1, slot]))
        if quantized:
            src = pl.ds(b * block_k, block_k)
            cps.append(pltpu.make_async_copy(ks_hbm.at[seq_c, :, src], ks_buf.at[slot], sem.at[2, slot]))
            cps.append(pltpu.make_async_copy(vs_hbm.at[seq_c, :, src], vs_buf.at[slot], sem.at[3, slot]))
        return cps

    acc_ref[...] = jnp.zeros_like(acc_ref)
    m_ref[...] = jnp.full_like(m_ref, _NEG)
    l_ref[...] = jnp.zeros_like(l_ref)

    @pl.when(b_lo < b_hi)
    def _():
        for cp in copies(b_lo, 0):
            cp.start()

    qpos = pos0 + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) % block_q  # rows ordered (g, r)

    def body(b, carry):
        slot = (b - b_lo) % 2

        @pl.when(b + 1 < b_hi)
        def _():
            for cp in copies(b + 1, 1 - slot):
                cp.start()

        for cp in copies(b, slot):
            cp.wait()
        kpos = b * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        mask = kpos <= qpos
        if sliding_window is not None:
            mask = mask & (kpos > qpos - sliding_window)
        # Keys past the context may be garbage / NaN: zero their V rows (and V scales).
        live = b * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0) < kv_hi
        for h in range(num_kv_heads):
            k = kv_format.values(k_buf[slot, :, pl.ds(h * d, d)])   # fp8 pools hold uint8 bits
            v = kv_format.values(v_buf[slot, :, pl.ds(h * d, d)])
            q = q_ref[h]
            if quantized:
                k = k.astype(q.dtype)
                v = v.astype(q.dtype)
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            if quantized:
                s = s * ks_buf[slot, pl.ds(h, 1), :]
            s = s * sm_scale
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            s = jnp.where(mask, s, _NEG)
            m_prev = m_ref[h]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
            l_ref[h] = l_ref[h] * alpha + jnp.sum(p, axis=1, keepdims=True)
            if quantized:
                p = p * jnp.where(kpos < kv_hi, vs_buf[slot, pl.ds(h, 1), :], 0.0)
            v = jnp.where(live, v, jnp.zeros_like(v))
            pv = jax.lax.dot_general(
                p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
            acc_ref[h] = acc_ref[h] * alpha + pv
            m_ref[h] = m_new
        return carry

    jax.lax.fori_loop(b_lo, b_hi, body, 0)
    o_ref[...] = (acc_ref[...] / jnp.maximum(l_ref[...], 1e-30)).astype(o_ref.dtype)


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
    config: TpuConfig | None = None,
) -> jax.Array:
    """TPU kernel with ``reference.ragged_paged_attention``'s signature and semantics.

    ``q: [num_tokens, num_q_heads, head_dim]``, pools ``[num_pages, page_size, num_kv_heads,
    head_dim]`` -> ``[num_tokens, num_q_heads, head_dim]``. ``interpret=True`` runs the TPU
    interpret mode (any backend).
    """
    reference.validate_inputs(
        q, k_pages, v_pages, page_table, seq_lens, query_start_loc, num_seqs,
        sliding_window=sliding_window, soft_cap=soft_cap, k_scales=k_scales, v_scales=v_scales,
    )  # fmt: skip
    num_tokens, num_q_heads, d = q.shape
    num_pages, page_size, kvh, _ = k_pages.shape
    max_seqs, pages_per_seq = page_table.shape
    if num_tokens == 0:
        return q
    group = num_q_heads // kvh
    cfg = config or default_config(num_tokens, max_seqs, group, page_size, pages_per_seq)
    bq, ppb = cfg.block_q, cfg.pages_per_block
    rows = group * bq
    block_k = ppb * page_size
    pt = jnp.pad(page_table, ((0, 0), (0, -pages_per_seq % ppb)))
    pps_pad = pt.shape[1]
    items = work_items(num_tokens, bq, seq_lens, query_start_loc, num_seqs)
    num_items = items.shape[0]

    # Gather each item's q rows into its own tile: [items, kvh, G * bq, d], rows ordered (g, r).
    r = jnp.arange(bq, dtype=jnp.int32)
    src = jnp.clip(items[:, :1] + r[None, :], 0, num_tokens - 1)
    q_items = q.reshape(num_tokens, kvh, group, d)[src]  # [items, bq, kvh, G, d]
    q_items = q_items.transpose(0, 2, 3, 1, 4).reshape(num_items, kvh, rows, d)

    args = [
        q_items,
        k_pages.reshape(num_pages, page_size, kvh * d),
        v_pages.reshape(num_pages, page_size, kvh * d),
    ]
    in_specs = [
        pl.BlockSpec((None, kvh, rows, d), lambda w, *_: (w, 0, 0, 0)),
        pl.BlockSpec(memory_space=pltpu.HBM),
        pl.BlockSpec(memory_space=pltpu.HBM),
    ]
    scratch = [
        pltpu.VMEM((2, block_k, kvh * d), k_pages.dtype),
        pltpu.VMEM((2, block_k, kvh * d), v_pages.dtype),
    ]
    quantized = k_scales is not None
    if quantized:
        # Per key scales of each sequence, [max_seqs, kvh, pages_per_seq_padded * page_size] float32:
        # one extra 4 B per key and head (1.6% of an int8 pool's bytes at d=128) so that a block's
        # scales arrive as one lane-dense DMA instead of one scalar per page.
        def per_key(sc):
            x = jnp.broadcast_to(
                sc.astype(jnp.float32)[pt][:, :, None, :], (max_seqs, pps_pad, page_size, kvh)
            )
            return x.reshape(max_seqs, pps_pad * page_size, kvh).transpose(0, 2, 1)

        args += [per_key(k_scales), per_key(v_scales)]
        in_specs += [pl.BlockSpec(memory_space=pltpu.HBM)] * 2
        scratch += [pltpu.VMEM((2, kvh, block_k), jnp.float32)] * 2
    scratch += [
        pltpu.SemaphoreType.DMA((4, 2)),
        pltpu.VMEM((kvh, rows, d), jnp.float32),
        pltpu.VMEM((kvh, rows, 1), jnp.float32),
        pltpu.VMEM((kvh, rows, 1), jnp.float32),
    ]
    kernel = functools.partial(
        _kernel, pages_per_seq=pps_pad, num_kv_heads=kvh, group=group, head_dim=d, page_size=page_size,
        block_q=bq, pages_per_block=ppb, sm_scale=float(sm_scale), sliding_window=sliding_window,
        soft_cap=soft_cap, quantized=quantized,
    )  # fmt: skip
    o_items = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(num_items,),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, kvh, rows, d), lambda w, *_: (w, 0, 0, 0)),
            scratch_shapes=scratch,
        ),
        out_shape=jax.ShapeDtypeStruct((num_items, kvh, rows, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="ragged_paged_attention_tpu",
    )(items.reshape(-1), pt.reshape(-1), *args)

    # Scatter item tiles back to token rows; padding rows (and any row no item owns) stay zero.
    vals = o_items.reshape(num_items, kvh, group, bq, d).transpose(0, 3, 1, 2, 4)
    vals = vals.reshape(num_items * bq, num_q_heads, d)
    dest = item_rows(items, bq, num_tokens)
    return jnp.zeros_like(q).at[dest].set(vals, mode="drop")
