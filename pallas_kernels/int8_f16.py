"""int8 -> float16 in registers by bit assembly, for kernels whose dots run in f16.

Where it sits: used inside kernels that convert int8 data (weights in ``quant_matmul``, an int8
KV pool's K / V in ``ragged_paged_attention``) to f16 operands. The byte b zero-extended to 16
bits, XOR 0x6480, is the f16 1152 + b (exponent 2^10 over a mantissa of b + 128: b's sign bit
flipped), and subtracting 1152 gives b exactly for all 256 values: one ``xor`` and one
``add.f16x2`` per pair where a plain conversion may take one ``cvt`` per value
(``benchmarks/offline_ptx.py``, ``benchmarks/offline_attention.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def int8_to_f16(x: jax.Array) -> jax.Array:
    """int8 array (any shape) -> the same values as float16, exactly."""
    bits = lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint16) ^ jnp.uint16(0x6480)
    return lax.bitcast_convert_type(bits, jnp.float16) - jnp.float16(1152)
