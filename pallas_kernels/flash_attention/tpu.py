"""Causal flash attention over packed segments on TPUs (Pallas Mosaic TPU).

Where it sits: ``pallas_kernels.flash_attention`` dispatches here on TPU. Semantics are
``reference.py``'s; tested on CPU through the TPU interpret mode.

Grid ``(q head, q block, k block)``, the k axis innermost and sequential ("arbitrary") with the
online-softmax state (m, l, acc) in VMEM scratch. Pallas' BlockSpec pipelining double-buffers
the ``[block_k, d]`` K/V tiles. Each q block only needs keys in
``[seg_start(first row), last row]``: the first and last useful k block of every q block come in
through scalar prefetch, the K/V index maps clamp the k block into that range (a repeated block
index is not fetched again), and compute is skipped outside it, so the causal upper triangle and
other segments cost neither DMA nor MXU time.

Block sizes from the published chip parameters (``pltpu.get_tpu_info_for_chip``): the MXU is
128 (v5e/v5p) or 256 (v6e/v7) wide, so block_q = 256 rows and block_k = 512 keys fill whole
MXU passes on every generation; VMEM use is ``2 x (block_q + 2 block_k) x d x 2 B`` of tiles +
``block_q x d x 4 B`` accumulator + the ``block_q x block_k`` f32 score tile = ~1.4 MiB at
d = 128, far below the 16-32 MiB default scoped VMEM, so the pipeline never spills. Long
blocks matter because the grid is sequential on a TensorCore: each step has ~0.35 us fixed
overhead, amortised over 256 x 512 x 128 x 4 = 67 MFLOP (~0.07 us of v6e MXU time per head at
918 TFLOP/s; ~5 steps of work per overhead on v5e).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.flash_attention import reference

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class FlashTpuConfig:
    """Static tile sizes (multiples of 8 rows; 128-multiples on hardware)."""

    block_q: int = 256
    block_k: int = 512

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 8 or v % 8:
                raise ValueError(f"FlashTpuConfig.{name} must be a positive multiple of 8, got {v!r}")


def _kernel(
    kb_lo_ref,  # SMEM int32[nq]
    kb_hi_ref,  # SMEM int32[nq] (exclusive)
    end_ref,  # SMEM int32[1]
    seg_ref,  # VMEM int32[block_q, 1]
    q_ref,  # VMEM [block_q, d]
    k_ref,  # VMEM [block_k, d]
    v_ref,
    o_ref,  # VMEM [block_q, d]
    acc_ref,
    m_ref,
    l_ref,
    *,
    block_q: int,
    block_k: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
):
    qb, kb = pl.program_id(1), pl.program_id(2)

    @pl.when(kb == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        m_ref[...] = jnp.full_like(m_ref, _NEG)
        l_ref[...] = jnp.zeros_like(l_ref)

    @pl.when((kb >= kb_lo_ref[qb]) & (kb < kb_hi_ref[qb]))
    def _():
        rows = qb * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
        kpos = kb * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        mask = (kpos <= rows) & (kpos >= seg_ref[...])
        if sliding_window is not None:
            mask = mask & (kpos > rows - sliding_window)
        q = q_ref[...]
        s = jax.lax.dot_general(q, k_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        s = s * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(mask, s, _NEG)
        m_prev = m_ref[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        live = kb * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k, 1), 0) < end_ref[0]
        v = jnp.where(live, v_ref[...], jnp.zeros_like(v_ref[...]))  # padding rows may hold garbage
        pv = jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        acc_ref[...] = acc_ref[...] * alpha + pv
        m_ref[...] = m_new

    @pl.when(kb == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = (acc_ref[...] / jnp.maximum(l_ref[...], 1e-30)).astype(o_ref.dtype)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cu_seqlens: jax.Array | None = None,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
    config: FlashTpuConfig | None = None,
) -> jax.Array:
    """TPU kernel with ``reference.flash_attention``'s signature and semantics.

    ``q: [num_tokens, num_q_heads, head_dim]``, ``k, v: [num_tokens, num_kv_heads, head_dim]``.
    """
    reference.validate_inputs(q, k, v, cu_seqlens, sliding_window=sliding_window, soft_cap=soft_cap)
    num_tokens, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    if num_tokens == 0:
        return q
    cfg = config or FlashTpuConfig()
    fit = -(-num_tokens // 8) * 8
    bq, bk = min(cfg.block_q, fit), min(cfg.block_k, fit)
    tile = bq * bk // _gcd(bq, bk)
    t_pad = -(-num_tokens // tile) * tile
    nq, nk = t_pad // bq, t_pad // bk
    seg = reference.segment_starts(num_tokens, cu_seqlens)
    end = jnp.full((1,), num_tokens, jnp.int32) if cu_seqlens is None else cu_seqlens[-1:]
    pad = t_pad - num_tokens
    seg = jnp.pad(seg, (0, pad), constant_values=t_pad + 1)
    # Per q block: first and one-past-last k block holding a visible key.
    seg_b = seg.reshape(nq, bq)
    first_row = jnp.arange(nq, dtype=jnp.int32) * bq
    last_row = jnp.minimum(first_row + bq, num_tokens) - 1
    lo = jnp.min(seg_b, axis=1)
    if sliding_window is not None:
        lo = jnp.maximum(lo, first_row - sliding_window + 1)
    kb_lo = lo // bk
    kb_hi = jnp.where(last_row >= lo, last_row // bk + 1, kb_lo)
    kb_lo = jnp.minimum(kb_lo, nk - 1).astype(jnp.int32)
    kb_hi = kb_hi.astype(jnp.int32)

    def tr(x):  # [T, H, d] -> [H, T_pad, d]
        return jnp.pad(x, ((0, pad), (0, 0), (0, 0))).transpose(1, 0, 2)

    def kv_map(h, i, j, lo_ref, hi_ref, end_ref):
        return (h // group, jnp.clip(j, lo_ref[i], jnp.maximum(hi_ref[i] - 1, lo_ref[i])), 0)

    kernel = functools.partial(
        _kernel,
        block_q=bq,
        block_k=bk,
        sm_scale=float(sm_scale),
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(hq, nq, nk),
            in_specs=[
                pl.BlockSpec((bq, 1), lambda h, i, j, *_: (i, 0)),
                pl.BlockSpec((None, bq, d), lambda h, i, j, *_: (h, i, 0)),
                pl.BlockSpec((None, bk, d), kv_map),
                pl.BlockSpec((None, bk, d), kv_map),
            ],
            out_specs=pl.BlockSpec((None, bq, d), lambda h, i, j, *_: (h, i, 0)),
            scratch_shapes=[
                pltpu.VMEM((bq, d), jnp.float32),
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, 1), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct((hq, t_pad, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="flash_attention_tpu",
    )(kb_lo, kb_hi, end, seg.reshape(t_pad, 1), tr(q), tr(k), tr(v))
    return out.transpose(1, 0, 2)[:num_tokens]


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
