"""Dispatching entry point for causal flash attention over packed segments.

Where it sits: called by the model's attention layer for steps whose batch is a long fresh
prompt (no cached context). cpu -> ``reference``, gpu -> ``gpu`` (Pallas Triton lowering),
tpu -> ``tpu`` (Mosaic TPU); ``interpret=True`` on CPU runs the GPU kernel interpreted.

``mgpu`` (Pallas Mosaic GPU, FlashAttention-3 structure) is faster on Hopper (1.18x cuDNN at
S=8192, see its docstring) but is not dispatched here yet: each call site lowers the kernel anew
(1.2 s per call measured on the dev host, plus ptxas), and the model calls it once per layer, so a
32-layer step would add minutes to start-up. It becomes the GPU default once the layers share one
call site (or its lowering is cached).
"""

from __future__ import annotations

import jax

from pallas_kernels.flash_attention import gpu, reference, tpu


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
    if backend == "gpu" or interpret:
        return gpu.flash_attention(q, k, v, cu_seqlens, interpret=interpret, **kw)
    return reference.flash_attention(q, k, v, cu_seqlens, **kw)
