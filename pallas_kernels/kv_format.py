"""Storage formats of the KV page pool: which array dtypes hold quantized K/V, and how fp8 is kept.

Where it sits: shared by the KV write (``kv_write``) and the paged attention kernels
(``ragged_paged_attention``); the engine allocates fp8 pools as ``FP8_BITS`` arrays
(``jserve/kv_cache.py``).

An fp8 (e4m3) pool is stored as ``uint8``: the e4m3 bits, viewed as fp8 where they are read
(``values``: inside a kernel, a register bitcast) and produced from fp8 values where they are
written (``bits``). Why not an fp8-typed array (``benchmarks/fp8_pool_scratch.py``, compiled
scratch per write): on CPU XLA converts an fp8 scatter's whole operand to f16 and back, and a
scatter through a uint8 view of the donated array still copies it once; on an H200 (session 23)
a page copy through that view copied the array in one compile and not in another, and the 8B's
fp8 pool ran out of memory in a page move that allocated one pool array (1.48 GiB). Scatters,
page copies and reads of a uint8 array ran in place in every variant, on both.

    pool dtype   values     scales
    bf16/f16/f32 itself     none
    int8         int8       float32[num_pages, num_kv_heads]
    uint8        fp8 e4m3   float32[num_pages, num_kv_heads]

How large a 1-byte pool array may be (``addressable_pages``): Pallas's Triton lowering (jax
0.11.2, ``_compute_offsets_from_indices``) indexes an array with 32-bit element offsets unless
the array holds more than 2**32 bytes, and Triton adds them to the base pointer as signed values.
So an int8 / fp8 layer array of more than 2**31 and at most 2**32 elements is read and written at
negative offsets past its element 2**31 - 1 (H100, session 44: the decode kernel hit an illegal
address over a 2.0 GiB fp8 pool with its last page in the page table). Arrays of 2-byte and wider
dtypes cross 2**32 bytes before 2**31 elements, so they never meet it; nor do 1-byte arrays
past 2**32 elements (64-bit offsets).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

FP8 = jnp.dtype(jnp.float8_e4m3fn)
FP8_BITS = jnp.dtype(jnp.uint8)   # the storage dtype of an fp8 pool
SIGNED_32BIT_ELEMENTS = 2**31     # element offsets a 32-bit signed offset reaches
WIDE_OFFSET_BYTES = 2**32         # arrays larger than this get 64-bit offsets


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


def addressable_pages(num_pages: int, elements_per_page: int, pool_dtype: jnp.dtype) -> int:
    """The most pages, at most ``num_pages``, that one layer's pool array of ``pool_dtype``
    (``elements_per_page`` = page_size x kv heads x head_dim of one device's array) may hold
    for the GPU kernels to address all of it (module docstring): ``num_pages`` unless that
    falls in the band where a 1-byte array has 32-bit signed offsets too short for it."""
    elements = num_pages * elements_per_page
    if elements <= SIGNED_32BIT_ELEMENTS or elements * jnp.dtype(pool_dtype).itemsize > WIDE_OFFSET_BYTES:
        return num_pages
    return SIGNED_32BIT_ELEMENTS // elements_per_page


def check_addressable(pages: jax.Array, who: str) -> None:
    """ValueError naming ``who`` when a pool array ``[num_pages, ...]`` is out of the GPU
    kernels' reach (``addressable_pages``): a Triton kernel would read and write out of bounds."""
    num_pages, per_page = pages.shape[0], math.prod(pages.shape[1:])
    fit = addressable_pages(num_pages, per_page, pages.dtype)
    if fit < num_pages:
        raise ValueError(f"{who}: a {jnp.dtype(pages.dtype).name} pool of {num_pages} pages of "
                         f"{per_page} values is a 2-4 GiB 1-byte array, which Pallas's Triton lowering "
                         f"addresses with 32-bit signed offsets: use at most {fit} pages")
