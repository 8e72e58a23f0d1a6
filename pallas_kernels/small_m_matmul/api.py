"""Dispatching entry point for dense matmuls of few tokens over a layer of stacked weights.

Where it sits: the model's ``linear()`` seam (jserve/model/linear.py) calls it for a dense
projection when the step has at most ``reference.MAX_TOKENS`` tokens and the kernel is enabled
(``use_kernel``; off by default), inside the jitted step. gpu -> ``mgpu`` (Pallas Mosaic GPU) on Hopper when
``mgpu.supports`` holds, else the reference (XLA's dot, the weight's layer sliced into it);
cpu -> the reference; ``interpret=True`` runs the Mosaic GPU kernel interpreted on CPU.
"""

from __future__ import annotations

import jax

from pallas_kernels.small_m_matmul import mgpu, reference

# Whether ``linear()`` runs dense projections of <= 64 tokens through the Hopper kernel. Off
# until measured faster than XLA's GEMMs in a whole step (the benchmarks' A/B switch:
# ``benchmarks/step_floor.py --ab small-m-kernel``, ``benchmarks/quant_matmul.py --dense``).
DENSE_ON_HOPPER = False


def use_kernel(x: jax.Array, w: jax.Array) -> bool:
    """Whether ``linear()`` should call ``small_m_matmul`` for x [M, K] @ w [L, K, *out] (static)."""
    if not DENSE_ON_HOPPER or x.shape[0] > reference.MAX_TOKENS or w.ndim < 3:
        return False
    if jax.default_backend() != "gpu" or not mgpu.on_hopper():
        return False
    w3 = jax.ShapeDtypeStruct((*w.shape[:2], -(-w.size // (w.shape[0] * w.shape[1]))), w.dtype)
    return mgpu.supports(x, w3)


def small_m_matmul(x: jax.Array, w: jax.Array, layer: jax.Array, *, interpret: bool = False,
                   backend: str | None = None) -> jax.Array:
    """``x: [M, K]``, ``w: [L, K, N]``, ``layer: int32[1]`` -> ``[M, N]`` in x's dtype."""
    backend = backend or jax.default_backend()
    if (interpret or (backend == "gpu" and mgpu.on_hopper())) and mgpu.supports(x, w):
        return mgpu.small_m_matmul(x, w, layer, interpret=interpret)
    return reference.small_m_matmul(x, w, layer)
