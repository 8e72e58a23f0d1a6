"""Pure-jnp small-M dense matmul: the semantics the Mosaic GPU kernel beside it is tested against.

Where it sits: the model's ``linear()`` seam (jserve/model/linear.py) can run a dense projection
of a decode step through ``pallas_kernels.small_m_matmul``; on CPU that is this file.

The weight stays in the model's stacked layout and the layer is an operand, not a slice taken
before the call: ``w [L, K, N]`` (bf16 / f16), ``layer`` int32[1]::

    y[m, n] = sum_k x[m, k] * w[layer, k, n]      float32 accumulation, output in x's dtype

Taking the whole stack matters on the GPU: a slice of a parameter handed to a custom call is a
copy XLA makes before the call (the whole layer's weight read and written once more per step),
while a dot's slice operand fuses into the GEMM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_TOKENS = 64   # one warpgroup's wgmma M: the kernel computes at most this many token rows


def validate_inputs(x: jax.Array, w: jax.Array, layer: jax.Array) -> None:
    """Static checks shared by the reference and the kernel; ValueError naming the operand."""
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got shape {x.shape}")
    if w.ndim != 3 or w.shape[1] != x.shape[1]:
        raise ValueError(f"w must be [L, K={x.shape[1]}, N] (stacked layers), got shape {w.shape}")
    if jnp.dtype(w.dtype) != jnp.dtype(x.dtype):
        raise ValueError(f"w ({w.dtype}) and x ({x.dtype}) must have one dtype")
    if layer.shape != (1,) or not jnp.issubdtype(layer.dtype, jnp.integer):
        raise ValueError(f"layer must be int32[1], got {layer.dtype}{list(layer.shape)}")


def small_m_matmul(x: jax.Array, w: jax.Array, layer: jax.Array) -> jax.Array:
    """x: [M, K], w: [L, K, N], layer: int32[1] -> [M, N] in x's dtype (float32 accumulation)."""
    validate_inputs(x, w, layer)
    wl = jax.lax.dynamic_index_in_dim(w, layer[0], axis=0, keepdims=False)
    return jnp.dot(x, wl, preferred_element_type=jnp.float32).astype(x.dtype)
