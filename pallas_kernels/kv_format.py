"""Storage formats of the KV page pool: which array dtypes hold quantized K/V, and how fp8 is kept.

Where it sits: shared by the KV write (``kv_write``) and the paged attention kernels
(``ragged_paged_attention``); the engine allocates pools in ``storage_dtype(...)``.

An fp8 (e4m3) pool is stored as ``uint8``: the e4m3 bits, viewed as fp8 where they are read
(``values``: inside a kernel, a free register bitcast) and produced from fp8 values where they
are written (``bits``). Why not an fp8-typed array: XLA has no fp8 scatter, so it converts the
whole pool array to f16 and back around each row write, and a ``bitcast_convert`` of the donated
array around a uint8 scatter is no cheaper: the scatter no longer aliases its operand, so the
compiled program copies the array once per write (a pool layer's 1.48 GiB for the 8B at share
0.8: session 23 on an H200; ``benchmarks/fp8_pool_scratch.py``). Scatters and page copies on a
uint8 array run in place.

    pool dtype   values     scales
    bf16/f16/f32 itself     none
    int8         int8       float32[num_pages, num_kv_heads]
    uint8        fp8 e4m3   float32[num_pages, num_kv_heads]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8 = jnp.dtype(jnp.float8_e4m3fn)
FP8_BITS = jnp.dtype(jnp.uint8)   # the storage dtype of an fp8 pool


def storage_dtype(value_dtype: jnp.dtype) -> jnp.dtype:
    """The pool array dtype for K/V values of ``value_dtype`` (fp8 e4m3 -> uint8)."""
    d = jnp.dtype(value_dtype)
    if d == FP8:
        return FP8_BITS
    if d.itemsize == 1 and d != jnp.int8:
        raise ValueError(f"KV pools hold bf16/f16/f32, int8 or fp8 e4m3 values, got {d}")
    return d


def value_dtype(pool_dtype: jnp.dtype) -> jnp.dtype:
    """The dtype of the values a pool array of ``pool_dtype`` holds (uint8 -> fp8 e4m3)."""
    d = jnp.dtype(pool_dtype)
    return FP8 if d == FP8_BITS else d


def is_quantized(pool_dtype: jnp.dtype) -> bool:
    """True for the 1-byte pools (int8, fp8 as uint8, or an fp8-typed array) that need scales."""
    return jnp.dtype(pool_dtype).itemsize == 1


def values(x: jax.Array) -> jax.Array:
    """Pool elements (any shape) -> their values: uint8 bits viewed as fp8, others unchanged.
    Works inside Pallas kernels (a register bitcast) and in XLA."""
    return jax.lax.bitcast_convert_type(x, FP8) if x.dtype == FP8_BITS else x


def bits(x: jax.Array, pool_dtype: jnp.dtype) -> jax.Array:
    """Values already in ``value_dtype(pool_dtype)`` -> the pool's storage (fp8 -> uint8 bits)."""
    if jnp.dtype(pool_dtype) == FP8_BITS:
        return jax.lax.bitcast_convert_type(x.astype(FP8), FP8_BITS)
    return x.astype(pool_dtype)
