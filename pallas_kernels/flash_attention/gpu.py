"""Causal flash attention over packed segments on CUDA GPUs (Pallas, Triton lowering).

Where it sits: ``pallas_kernels.flash_attention`` dispatches here on GPU, for steps whose batch
is a long fresh prompt. Semantics are ``reference.py``'s.

FlashAttention-2 structure: grid ``(q block, q head)``; a program keeps its ``[block_q, d]`` query
tile and float32 accumulator in registers and streams ``[block_k, d]`` K/V tiles of its kv head
(GQA: q head h reads kv head ``h // G``; the G programs sharing a tile hit it in L2). The key
range of a q block is ``[seg_start(first row), last row]``; it is walked in three parts::

    keys:  | masked (segment start) | interior: every row sees every key | masked (diagonal) |

so only the blocks that straddle a segment start, the window edge or the diagonal pay for
the mask (and for zeroing V rows that may hold padding garbage). exp is computed as exp2 with
``sm_scale * log2(e)`` folded into one multiply.

Why the Triton lowering, although Mosaic GPU is the faster route here: measured on an H200
(KERNEL_NOTES.md / ANCHORS.md), this kernel reaches 399 TFLOP/s at S=8192 (JAX's own Triton op
368, cuDNN 525) while JAX's Mosaic GPU example op reached 587 (fp16, no softmax scale): Mosaic GPU
exposes FlashAttention-3's warp specialisation, TMA and setmaxnreg, Triton does not. This kernel
is the one that could be built and verified in this issue's device budget: the same source runs
in Triton's interpret mode in CPU CI, and it supports what jserve needs (GQA, packed segments,
sliding window, soft cap, bf16/fp16/fp32). A Mosaic GPU FA3-style kernel is the next step.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention import reference

_NEG = -1e30
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class FlashGpuConfig:
    """Static launch parameters: tile sizes (powers of two), Triton warps and pipeline depth.

    heavy_first: launch order (q head fastest, last q blocks first): under causal masking the
    last q blocks do the most work, so starting them first shortens the tail of the last wave.
    """

    block_q: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    heavy_first: bool = True

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k", "num_warps", "num_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"FlashGpuConfig.{name} must be a positive int, got {v!r}")
        for name in ("block_q", "block_k", "num_warps"):
            v = getattr(self, name)
            if v & (v - 1) or (name != "num_warps" and v < 16):
                raise ValueError(f"FlashGpuConfig.{name} must be a power of two (>= 16 for tiles), got {v}")


def default_config(num_tokens: int, dtype) -> FlashGpuConfig:
    """Tiles by size, from the H200 sweep in KERNEL_NOTES.md: 128x128 tiles with 8 warps and 3
    stages for long prompts, 64x64 with 4 warps up to 4k tokens (more programs per SM: the
    2048-token grid has only 16 q blocks per head). float32 tiles are twice the bytes: 64x32
    with 2 stages keeps them within the 227 KB of shared memory.
    """
    fit = max(16, 1 << (num_tokens - 1).bit_length())
    if jnp.dtype(dtype).itemsize >= 4:
        return FlashGpuConfig(block_q=min(64, fit), block_k=min(32, fit), num_warps=4, num_stages=2)
    if num_tokens <= 4096:
        return FlashGpuConfig(block_q=min(64, fit), block_k=min(64, fit), num_warps=4, num_stages=3)
    return FlashGpuConfig(block_q=128, block_k=128, num_warps=8, num_stages=3)


def _kernel(
    end_ref,  # int32[1]: rows >= end are padding (their K/V may hold garbage)
    seg_ref,  # int32[T_pad]
    q_ref,  # [T_pad, Hq * D]
    k_ref,  # [T_pad, Hkv * D]
    v_ref,  # [T_pad, Hkv * D]
    o_ref,  # [T_pad, Hq * D]
    *,
    num_tokens: int,
    group: int,
    head_dim: int,
    block_q: int,
    block_k: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    heavy_first: bool,
):
    if heavy_first:
        h, qb = pl.program_id(0), pl.num_programs(1) - 1 - pl.program_id(1)
    else:
        qb, h = pl.program_id(0), pl.program_id(1)
    end = end_ref[0]
    q0 = qb * block_q
    rows = q0 + jnp.arange(block_q, dtype=jnp.int32)
    seg = seg_ref[pl.ds(q0, block_q)]
    q = q_ref[pl.ds(q0, block_q), pl.ds(h * head_dim, head_dim)]
    kcols = pl.ds((h // group) * head_dim, head_dim)
    q_last = jnp.minimum(q0 + block_q, num_tokens) - 1
    lo = jnp.min(seg)
    full_lo = jnp.max(seg)
    hi = jnp.minimum(q_last + 1, num_tokens)  # exclusive
    if sliding_window is not None:
        lo = jnp.maximum(lo, q0 - sliding_window + 1)
        full_lo = jnp.maximum(full_lo, q_last - sliding_window + 1)
    b_lo = lo // block_k
    b_hi = jnp.maximum((hi + block_k - 1) // block_k, b_lo)
    i_lo = jnp.clip((full_lo + block_k - 1) // block_k, b_lo, b_hi)
    i_hi = jnp.clip((q0 + 1) // block_k, i_lo, b_hi)
    scale = sm_scale if soft_cap is not None else sm_scale * _LOG2E

    def step(b, carry, masked: bool):
        acc, m_prev, l_prev = carry
        k = k_ref[pl.ds(b * block_k, block_k), kcols]
        v = v_ref[pl.ds(b * block_k, block_k), kcols]
        s = plgpu.dot(q, k, trans_b=True) * scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap) * _LOG2E
        if masked:
            kpos = b * block_k + jnp.arange(block_k, dtype=jnp.int32)
            mask = (kpos[None, :] <= rows[:, None]) & (kpos[None, :] >= seg[:, None])
            if sliding_window is not None:
                mask = mask & (kpos[None, :] > rows[:, None] - sliding_window)
            s = jnp.where(mask, s, _NEG)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        alpha = jnp.exp2(m_prev - m_new)
        p = jnp.exp2(s - m_new[:, None])
        if masked:
            p = jnp.where(mask, p, 0.0)
            v = jnp.where((kpos < end)[:, None], v, jnp.zeros_like(v))
        l_new = l_prev * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l_new

    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), _NEG, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    carry = jax.lax.fori_loop(b_lo, i_lo, functools.partial(step, masked=True), carry)
    carry = jax.lax.fori_loop(i_lo, i_hi, functools.partial(step, masked=False), carry)
    carry = jax.lax.fori_loop(i_hi, b_hi, functools.partial(step, masked=True), carry)
    acc, _, l_i = carry
    out = acc / jnp.maximum(l_i, 1e-30)[:, None]
    o_ref[pl.ds(q0, block_q), pl.ds(h * head_dim, head_dim)] = out.astype(o_ref.dtype)


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
    config: FlashGpuConfig | None = None,
) -> jax.Array:
    """GPU kernel with ``reference.flash_attention``'s signature and semantics.

    ``q: [num_tokens, num_q_heads, head_dim]``, ``k, v: [num_tokens, num_kv_heads, head_dim]``.
    """
    reference.validate_inputs(q, k, v, cu_seqlens, sliding_window=sliding_window, soft_cap=soft_cap)
    num_tokens, hq, d = q.shape
    hkv = k.shape[1]
    if num_tokens == 0:
        return q
    if config is None:
        config = default_config(num_tokens, q.dtype)
    cfg = config
    dp = max(16, 1 << (d - 1).bit_length())
    tile = max(cfg.block_q, cfg.block_k)
    t_pad = -(-num_tokens // tile) * tile
    seg = reference.segment_starts(num_tokens, cu_seqlens)
    end = jnp.full((1,), num_tokens, jnp.int32) if cu_seqlens is None else cu_seqlens[-1:]
    if t_pad != num_tokens or dp != d:
        pad = ((0, t_pad - num_tokens), (0, 0), (0, dp - d))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        seg = jnp.pad(seg, (0, t_pad - num_tokens), constant_values=t_pad + 1)
    kernel = functools.partial(
        _kernel, num_tokens=num_tokens, group=hq // hkv, head_dim=dp, block_q=cfg.block_q,
        block_k=cfg.block_k, sm_scale=float(sm_scale), sliding_window=sliding_window, soft_cap=soft_cap,
        heavy_first=cfg.heavy_first,
    )  # fmt: skip
    out = pl.pallas_call(
        kernel,
        grid=(hq, t_pad // cfg.block_q) if cfg.heavy_first else (t_pad // cfg.block_q, hq),
        out_shape=jax.ShapeDtypeStruct((t_pad, hq * dp), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="flash_attention",
    )(end, seg, q.reshape(t_pad, hq * dp), k.reshape(t_pad, hkv * dp), v.reshape(t_pad, hkv * dp))
    return out.reshape(t_pad, hq, dp)[:num_tokens, :, :d]
