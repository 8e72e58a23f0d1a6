"""Quantizing KV write on CUDA GPUs: the started pages' scales, K and V in one Pallas launch.

Where it sits: ``pallas_kernels.write_kv_quantized`` dispatches here on GPU for int8 and fp8
(uint8-stored) pools, once per attention layer inside the jitted step. Semantics are
``reference.write_kv_quantized``'s (``scales.page_scales`` then ``reference.write_kv``).

Why a kernel of its own: in XLA the quantized write compiles to 16 kernels per layer (for K and
for V an absmax reduce, the scales' scatter, a gather of the scales just written, the
quantizing fusion and the row scatter; session 23's CPU census) against the bf16 write's 3, and
an XLA rewrite compiled to 21. At batch 1 each kernel is a launch of its own.

The race this avoids: a row at page offset ``o > 0`` needs its page's scale, which the row at
offset 0 sets when this step starts the page, possibly in another program. Every program
therefore recomputes the scale itself: rows of one request are contiguous in the step with
consecutive slots, so the page's first row, when this step writes it, is row ``t - o``
(checked: its slot is ``slot - o``). Every row of a started page stores that same scale. Rows
that read a page's old scale never race a store: a page whose first row is in the step takes
the recomputed scale (the load's value is unused) and nobody stores the scale of a page the step
continues. Padding rows sit in page 0 (nothing reads it).

One program handles ``block_t`` rows of one kv head (``d`` contiguous elements): a grid of
``cdiv(T, block_t) x kvh``. The pools are viewed as ``[num_pages * page_size * kvh, d]`` and the
scales as ``[num_pages * kvh]``, all four input/output aliased (donated: only new rows and
scales move). Triton lowering (not Mosaic GPU): the work is a data-dependent row scatter with a
row reduction, no tiles for TMA or wgmma; the row width must be a power of two.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import kv_format
from pallas_kernels.kv_write import reference, scales


def _round_half_even(y: jax.Array) -> jax.Array:
    """``jnp.round`` from ``floor`` (Triton has no round lowering); exact for |y| < 2**23."""
    f = jnp.floor(y)
    frac = y - f
    odd = f - 2.0 * jnp.floor(0.5 * f)            # 1.0 where f is odd
    return jnp.where(frac > 0.5, f + 1.0, jnp.where(frac < 0.5, f, f + odd))


def quantize(x: jax.Array, s: jax.Array, value_dtype: jnp.dtype, pool_dtype: jnp.dtype) -> jax.Array:
    """Float32 rows x over their scales s -> the pool's stored values (``reference.quantize_rows``:
    rounded half to even and clipped for int8, clipped for e4m3; fp8 as its uint8 bits)."""
    y = x / s
    if jnp.issubdtype(value_dtype, jnp.integer):
        info = jnp.iinfo(value_dtype)
        y = _round_half_even(jnp.clip(y, float(info.min), float(info.max)))
    else:
        info = jnp.finfo(value_dtype)
        y = jnp.clip(y, float(info.min), float(info.max))
    return kv_format.bits(y.astype(value_dtype), pool_dtype)


def page_rows(slots_ref, block: jax.Array, num_tokens: int, block_t: int, page_size: int
              ) -> tuple[jax.Array, ...]:
    """Program ``block``'s rows [block_t] (the tail repeats the last row) -> (row, slot, page, the
    page's first row, started): whether this step starts the row's page, its first row then
    being row - offset (the module docstring's rule)."""
    t = block * block_t + jnp.arange(block_t, dtype=jnp.int32)
    tc = jnp.minimum(t, num_tokens - 1)
    slot = slots_ref[tc]
    off = slot % page_size
    first = jnp.maximum(tc - off, 0)                      # the page's first row, if in this step
    started = (tc >= off) & (slots_ref[first] == slot - off)
    return tc, slot, slot // page_size, first, started


def _kernel(slots_ref, kn_ref, vn_ref, k_in, v_in, ks_in, vs_in, k_out, v_out, ks_out, vs_out, *,
            num_tokens: int, block_t: int, page_size: int, kvh: int, room: float, qmax: float,
            value_dtype: jnp.dtype):
    del k_in, v_in, ks_in, vs_in  # aliased to the outputs
    h = pl.program_id(1)
    tc, slot, page, first, started = page_rows(slots_ref, pl.program_id(0), num_tokens, block_t, page_size)
    d = kn_ref.shape[1]
    cols = jnp.arange(d, dtype=jnp.int32)[None, :]
    rows = (tc * kvh + h)[:, None]
    first_rows = (first * kvh + h)[:, None]
    dst = (slot * kvh + h)[:, None]
    sidx = page * kvh + h
    pool_dtype = k_out.dtype
    for new_ref, out, s_out in ((kn_ref, k_out, ks_out), (vn_ref, v_out, vs_out)):
        amax = jnp.max(jnp.abs(new_ref[first_rows, cols].astype(jnp.float32)), axis=1)
        fresh = jnp.maximum(amax * room, scales.TINY) / qmax
        s = jnp.where(started, fresh, s_out[sidx])
        x = new_ref[rows, cols].astype(jnp.float32)
        # No masks on the tail: its lanes repeat the last row, storing the same bytes to the same
        # places (a masked lane in interpret mode writes back what it read, racing the others).
        plgpu.store(out.at[dst, cols], quantize(x, s[:, None], value_dtype, pool_dtype))
        plgpu.store(s_out.at[sidx], s, mask=started)


def write_kv_quantized(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_scales: jax.Array,
    v_scales: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
    *,
    interpret: bool = False,
    block_t: int = 8,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Same contract as ``reference.write_kv_quantized`` (pools ``[num_pages, page_size, kvh, d]``
    int8 or uint8, scales ``float32[num_pages, kvh]``, ``k_new/v_new: [T, kvh, d]``, slots
    ``int32[T]`` laid out as a step's: each request's rows contiguous, slots consecutive);
    ``block_t`` rows per program."""
    reference.validate_inputs(k_pages, v_pages, k_new, v_new, slot_mapping, k_scales, v_scales)
    num_pages, page_size, kvh, d = k_pages.shape
    num_tokens = k_new.shape[0]
    if num_tokens == 0:
        return k_pages, v_pages, k_scales, v_scales
    if d & (d - 1) or k_scales.dtype != jnp.float32 or v_scales.dtype != jnp.float32:
        return reference.write_kv_quantized(k_pages, v_pages, k_scales, v_scales, k_new, v_new,
                                            slot_mapping)  # Triton rows need a power-of-two width
    value_dtype = kv_format.value_dtype(k_pages.dtype)
    kernel = functools.partial(
        _kernel, num_tokens=num_tokens, block_t=block_t, page_size=page_size, kvh=kvh,
        room=scales.headroom(value_dtype), qmax=scales.qmax(value_dtype), value_dtype=value_dtype)
    rows = (num_tokens * kvh, d)
    pools, _ = pool_call(kernel, "write_kv_quantized", -(-num_tokens // block_t),
                         (slot_mapping, k_new.reshape(rows), v_new.reshape(rows)),
                         (k_pages, v_pages, k_scales, v_scales), interpret=interpret)
    return pools


def pool_call(kernel: Callable[..., None], name: str, blocks: int, args: tuple[jax.Array, ...],
              pools: tuple[jax.Array, jax.Array, jax.Array, jax.Array], *,
              extra_out: tuple[jax.ShapeDtypeStruct, ...] = (), interpret: bool
              ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """One launch of a quantizing pool writer on a ``blocks x kvh`` grid: ``kernel(*args, pools
    in, pools out, *extra outs)`` with the pools ``[P, page_size, kvh, d]`` viewed as rows ``[P *
    page_size * kvh, d]`` and their scales ``[P, kvh]`` flat, all four aliased in place -> (the
    pools and scales in their shapes, the extra outputs)."""
    k_pages, v_pages, k_scales, v_scales = pools
    kv_format.check_addressable(k_pages, name)
    num_pages, page_size, kvh, d = k_pages.shape
    flat = (num_pages * page_size * kvh, d)
    n = len(args)
    out = pl.pallas_call(
        kernel,
        grid=(blocks, kvh),
        out_shape=(jax.ShapeDtypeStruct(flat, k_pages.dtype), jax.ShapeDtypeStruct(flat, v_pages.dtype),
                   jax.ShapeDtypeStruct((num_pages * kvh,), jnp.float32),
                   jax.ShapeDtypeStruct((num_pages * kvh,), jnp.float32), *extra_out),
        input_output_aliases={n: 0, n + 1: 1, n + 2: 2, n + 3: 3},   # the pools and scales, in place
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name=name,
    )(*args, k_pages.reshape(flat), v_pages.reshape(flat), k_scales.reshape(-1), v_scales.reshape(-1))
    return tuple(o.reshape(p.shape) for o, p in zip(out[:4], pools, strict=True)), tuple(out[4:])
