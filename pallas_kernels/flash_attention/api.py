"""Dispatching entry point for causal flash attention over packed segments.

Where it sits: called by the model's attention layer for steps whose batch is a long fresh
prompt (no cached context). cpu -> ``reference``; tpu -> ``tpu`` (Mosaic TPU); gpu -> ``mgpu``
(Pallas Mosaic GPU, FlashAttention-3 structure) on Hopper when ``mgpu.supports`` holds, else
``gpu`` (Pallas Triton lowering); ``interpret=True`` on CPU runs the Triton-lowered kernel
interpreted.

Why Mosaic GPU on Hopper: it measured 647 / 653 TFLOP/s at S=8192 against cuDNN's 550 / 576 and
the Triton kernel's 422 / 411 in the same H200 run (``mgpu``'s docstring). It is called through
one ``jax.jit`` wrapper (``_mgpu_jit``): JAX then lowers the kernel once per compiled module and
shape, and every layer's call site reuses that lowering. Called bare, each of a model's per-layer
call sites lowered it anew (1.2-1.3 s on the host each, plus ptxas), which put a 32-layer
model's step compile past minutes.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels.flash_attention import gpu, mgpu, reference, tpu

MOSAIC_ON_HOPPER = True  # False routes Hopper to the Triton kernel (benchmarks' A/B switch)


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def _mgpu_jit(q: jax.Array, k: jax.Array, v: jax.Array, cu_seqlens: jax.Array | None, *,
              sm_scale: float) -> jax.Array:
    """``mgpu.flash_attention`` under one jit: lowered once per (shapes, sm_scale) per module."""
    return mgpu.flash_attention(q, k, v, cu_seqlens, sm_scale=sm_scale)


def use_mosaic(q: jax.Array, k: jax.Array, v: jax.Array, cu_seqlens: jax.Array | None,
               sliding_window: int | None, soft_cap: float | None) -> bool:
    """Whether a GPU call goes to the Mosaic GPU kernel: a Hopper device and a supported call."""
    return (
        MOSAIC_ON_HOPPER
        and mgpu.on_hopper()
        and mgpu.supports(q, k, cu_seqlens, sliding_window, soft_cap)
        and v.dtype == q.dtype
    )


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
) -> jax.Array:
    """``q: [num_tokens, num_q_heads, head_dim]``, ``k, v: [num_tokens, num_kv_heads, head_dim]``,
    ``cu_seqlens: int32[num_segments + 1]`` (None = one segment) -> ``[num_tokens, num_q_heads,
    head_dim]``; causal within each segment, padding rows (past ``cu_seqlens[-1]``) zero.
    """
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    backend = jax.default_backend()
    if backend == "tpu":
        return tpu.flash_attention(q, k, v, cu_seqlens, interpret=interpret, **kw)
    if backend == "gpu" and not interpret and use_mosaic(q, k, v, cu_seqlens, sliding_window, soft_cap):
        return _mgpu_jit(q, k, v, cu_seqlens, sm_scale=float(sm_scale))
    if backend == "gpu" or interpret:
        return gpu.flash_attention(q, k, v, cu_seqlens, interpret=interpret, **kw)
    return reference.flash_attention(q, k, v, cu_seqlens, **kw)
