"""RoPE and the write into a quantized (int8 / fp8) KV pool in one Pallas launch (CUDA GPUs).

Where it sits: ``kv_write.api.write_rope_quantized`` dispatches here on a GPU for decode-sized
steps (``api.rope_write_quant_fuses``), from the model's ``linear_rope_write`` seam after the
fused QKV projection (its bias already added: XLA fuses the add into the GEMM, where the kernel's
own operand would be one layer's slice of the stacked bias, which XLA copies by a kernel of its
own). Semantics are ``reference.split_rope`` of the projection, then
``reference.write_kv_quantized`` of its K and V.

Why: a bf16 pool takes the projection's epilogue, RoPE and K / V write in one Mosaic GPU kernel
(``rope_write``: on since session 38), but an int8 / fp8 pool went through XLA's RoPE fusion, K's
rotated concatenate and V's slice as kernels of their own, then ``gpu_quant``'s write (session
28's census): three kernels per layer more than a bf16 pool at batch 1, against issue 13's
<= 3% step time for fp8 KV. Here one program does, for ``block_t`` rows of one kv head::

    the page of each row (``gpu_quant``'s rule: the page's first row, when this step starts the
    page, is row t - offset; its K / V amax sets the page's scale, recomputed by every program
    that writes into the page, so no program waits for another)
    for each of the head's G query heads: qkv rotated (HF's rotate-half, float32, both
      halves loaded apart) -> q, rounded to the model's dtype
    K: the same rotation; V: as projected; each rounded to the model's dtype, quantized with its
      page's scale (set from the first row where the step starts the page) -> the pool rows
    the started pages' scales -> k_scales / v_scales

Triton lowering, like ``gpu_quant`` (a data-dependent row scatter with row reductions: nothing
for TMA or wgmma); the head width must be a power of two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import kv_format
from pallas_kernels.kv_write import gpu_quant, reference, scales


def supports(head_dim: int) -> bool:
    """Whether the kernel takes heads of ``head_dim`` (Triton rows: a power of two, >= 32)."""
    return head_dim >= 32 and head_dim & (head_dim - 1) == 0


def _kernel(slots_ref, qkv_ref, cos_ref, sin_ref, *refs, num_tokens: int, block_t: int, page_size: int,
            nkv: int, groups: int, room: float, qmax: float, value_dtype: jnp.dtype):
    k_out, v_out, ks_out, vs_out, q_out = refs[len(refs) - 5:]
    h = pl.program_id(1)
    tc, slot, page, first, started = gpu_quant.page_rows(slots_ref, pl.program_id(0), num_tokens,
                                                         block_t, page_size)
    dtype, half = q_out.dtype, qkv_ref.shape[1] // 2
    lo = jnp.arange(half, dtype=jnp.int32)[None, :]
    hi = lo + half

    def halves(ref, rows):   # -> the two halves of ``rows`` [block_t, 1] of ref, float32
        return ref[rows, lo].astype(jnp.float32), ref[rows, hi].astype(jnp.float32)

    def head(t, g):   # -> rows t of head g of kv head h, float32
        return halves(qkv_ref, ((t * nkv + h) * (groups + 2) + g)[:, None])

    def rotated(t, g):   # -> head g of rows t rotated by their cos / sin, rounded to the model's dtype
        x1, x2 = head(t, g)
        c1, c2 = halves(cos_ref, t[:, None])
        s1, s2 = halves(sin_ref, t[:, None])
        return ((x1 * c1 - x2 * s1).astype(dtype).astype(jnp.float32),
                (x2 * c2 + x1 * s2).astype(dtype).astype(jnp.float32))

    for g in range(groups):
        y1, y2 = rotated(tc, g)
        rows = ((tc * nkv + h) * groups + g)[:, None]
        plgpu.store(q_out.at[rows, lo], y1.astype(dtype))
        plgpu.store(q_out.at[rows, hi], y2.astype(dtype))
    dst = (slot * nkv + h)[:, None]
    sidx = page * nkv + h
    pool_dtype = k_out.dtype
    for g, out, s_out, rope in ((groups, k_out, ks_out, True), (groups + 1, v_out, vs_out, False)):
        part = rotated if rope else head
        f1, f2 = part(first, g)
        amax = jnp.maximum(jnp.max(jnp.abs(f1), axis=1), jnp.max(jnp.abs(f2), axis=1))
        s = jnp.where(started, jnp.maximum(amax * room, scales.TINY) / qmax, s_out[sidx])
        x1, x2 = part(tc, g)
        plgpu.store(out.at[dst, lo], gpu_quant.quantize(x1, s[:, None], value_dtype, pool_dtype))
        plgpu.store(out.at[dst, hi], gpu_quant.quantize(x2, s[:, None], value_dtype, pool_dtype))
        plgpu.store(s_out.at[sidx], s, mask=started)


def rope_write_quantized(qkv: jax.Array, cos: jax.Array, sin: jax.Array,
                         slot_mapping: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                         k_scales: jax.Array, v_scales: jax.Array, *, groups: int, interpret: bool = False,
                         block_t: int = 8) -> tuple[jax.Array, ...]:
    """qkv [T, Nkv * (G + 2) * d] (the fused projection with its bias, model dtype), cos / sin
    float32 [T, d], slot_mapping int32 [T] (each request's rows contiguous, slots
    consecutive), pools [P, page_size, Nkv, d] int8 / uint8, scales float32 [P, Nkv] -> (q [T,
    Nkv * G, d] in qkv's dtype, k_pages, v_pages, k_scales, v_scales), as
    ``reference.write_kv_quantized`` of ``reference.split_rope(qkv)``."""
    _, page_size, nkv, d = k_pages.shape
    t, g = qkv.shape[0], groups
    rows = jax.ShapeDtypeStruct((t, nkv, d), qkv.dtype)   # K / V as the reference would write them
    reference.validate_inputs(k_pages, v_pages, rows, rows, slot_mapping, k_scales, v_scales)
    if qkv.shape[1] != nkv * (g + 2) * d or slot_mapping.shape != (t,) or not supports(d) or t == 0:
        raise ValueError(f"rope_write_quantized: qkv {qkv.shape}, T={t}, Nkv={nkv}, G={g}, d={d} "
                         "do not fit the kernel")
    value_dtype = kv_format.value_dtype(k_pages.dtype)
    kernel = functools.partial(
        _kernel, num_tokens=t, block_t=block_t, page_size=page_size, nkv=nkv, groups=g,
        room=scales.headroom(value_dtype), qmax=scales.qmax(value_dtype), value_dtype=value_dtype)
    pools, (q,) = gpu_quant.pool_call(
        kernel, "rope_write_quantized", -(-t // block_t),
        (slot_mapping, qkv.reshape(t * nkv * (g + 2), d), cos, sin), (k_pages, v_pages, k_scales, v_scales),
        extra_out=(jax.ShapeDtypeStruct((t * nkv * g, d), qkv.dtype),), interpret=interpret)
    return (q.reshape(t, nkv * g, d), *pools)
