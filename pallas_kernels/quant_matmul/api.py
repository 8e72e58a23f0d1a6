"""Dispatching entry point for quantized matmuls (8-bit weights, per-output-channel scales).

Where it sits: the model's ``linear()`` seam (jserve/model/linear.py) calls it for every
projection whose weight is quantized, inside the jitted step. cpu -> ``reference``; gpu ->
``mgpu`` (Pallas Mosaic GPU) on Hopper when ``mgpu.supports`` holds, else XLA (the reference,
whose dequantize XLA fuses into the dot); tpu -> ``tpu`` when the shapes tile, else the
reference. ``interpret=True`` on CPU runs the Mosaic GPU kernel interpreted (``backend="tpu"``
the TPU one).

Why not XLA alone on GPU: measured on an H200 (shared/ANCHORS.md), XLA's fused convert gives
weight-only 8-bit matmuls 0.73-1.44x of bf16 and its fp8 x fp8 dot_general is 1.3-7x slower
than bf16; the gains have to come from the kernel. ``MOSAIC_ON_HOPPER`` is the benchmarks' A/B
switch (``benchmarks/quant_matmul.py`` times both paths).

w8a8 on a GPU from ``W8A8_XLA_MIN_M`` tokens up goes to XLA's own fp8 dot with both operands
as stored, K-major (``reference.w8a8_matmul(native=True)``: on Hopper cuBLASLt's fp8 GEMM),
not the kernel. The anchors' 1.3-7x slower fp8 dot_general took the weight [K, N]; with the
engine's [N, K] the dot ran the 8B's gate/up (H200, session 22) at 73.4 / 360.3 us for 256 /
2048 tokens against bf16's 108.8 / 649.5 and the w8a8 tiled grid's 141.8 / 696.7, and the 8B's
500 x 200/180 throughput went from ~0.72x bf16's (every matmul in the kernels) to 1.01x (every
one through XLA). Below 128 tokens the kernel stays: the engine compiles the 8B's small buckets
for cuBLAS GEMMs (``jserve/compile_pool.py``), where the fp8 dot ran batch-1 decode at 0.67x
bf16's. None: the kernel at every M.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.kv_write import api as kv_api
from pallas_kernels.quant_matmul import mgpu, reference, tpu

MOSAIC_ON_HOPPER = True
# The o / down projections' epilogue fused with the residual add and the next RMSNorm
# (``mgpu.quant_matmul_residual_norm``). H200, 2026-12-05, the 8B's int8 + lm_head batch-1 step,
# two calls: 3.319 -> 3.281 ms and 3.312 -> 3.269 ms, 463 -> 400 kernels (the A/B's other arm:
# benchmarks/step_floor.py --ab quant-residual-norm-off).
RESIDUAL_NORM_ON_HOPPER = True
W8A8_XLA_MIN_M: int | None = 128   # (module docstring)
# The MLP's gate/up decode matmul with the SiLU gate in its epilogue, no split of K
# (``mgpu.quant_matmul_silu_gate``, the ``gated`` kernel). H100 80GB, 2026-12-05, the 8B's int8 +
# lm_head batch-1 step: 3.938 -> 3.813 ms, 337 -> 305 kernels; H200, session 41: 3.167 -> 3.108
# ms (the A/B's other arm: benchmarks/step_floor.py --ab silu-gate-off).
SILU_GATE_ON_HOPPER = True


def quant_matmul(x: jax.Array, w: jax.Array, w_scale: jax.Array, input_scale: jax.Array | None = None,
                 *, act_quant: bool = False, out_dtype: jnp.dtype | None = None,
                 interpret: bool = False, backend: str | None = None) -> jax.Array:
    """``x: [M, K]``, ``w: [N, K]`` int8|float8_e4m3fn, ``w_scale: float32[N]`` -> ``[M, N]``.

    ``act_quant=False``: weight-only (w8a16, ``reference.w8a16_matmul``); ``True``: fp8 weights
    and activations (w8a8, ``reference.w8a8_matmul``) with dynamic per-token activation scales,
    or the static ``input_scale`` when given.
    """
    backend = backend or jax.default_backend()
    kw = dict(act_quant=act_quant, out_dtype=out_dtype)
    if backend == "tpu" and tpu.supports(x, w):
        return tpu.quant_matmul(x, w, w_scale, input_scale, interpret=interpret, **kw)
    if backend == "gpu" and act_quant and not interpret and _xla_fp8(x.shape[0]):
        return reference.w8a8_matmul(x, w, w_scale, input_scale, out_dtype, native=True)
    if _mosaic_gpu(backend, interpret) and mgpu.supports(x, w, act_quant):
        return mgpu.quant_matmul(x, w, w_scale, input_scale, interpret=interpret, **kw)
    if act_quant:
        return reference.w8a8_matmul(x, w, w_scale, input_scale, out_dtype)
    return reference.w8a16_matmul(x, w, w_scale, out_dtype)


def _mosaic_gpu(backend: str, interpret: bool) -> bool:
    """Whether the Mosaic GPU kernels run: interpreted, or on a Hopper GPU (``MOSAIC_ON_HOPPER``)."""
    return interpret or (backend == "gpu" and MOSAIC_ON_HOPPER and mgpu.on_hopper())


def _xla_fp8(m: int) -> bool:
    """Whether a w8a8 matmul of ``m`` tokens takes XLA's fp8 dot on a GPU (module docstring)."""
    return W8A8_XLA_MIN_M is not None and m >= W8A8_XLA_MIN_M


def quant_matmul_residual_norm(x: jax.Array, w: jax.Array, w_scale: jax.Array, residual: jax.Array,
                               gamma: jax.Array, eps: float, *, interpret: bool = False,
                               backend: str | None = None) -> tuple[jax.Array, jax.Array]:
    """A w8a16 projection added to the residual stream, then the next RMSNorm: x [T, K], w [N, K],
    w_scale f32[N], residual [T, N], gamma [N] -> (h, normed) [T, N] in residual's dtype, as
    ``reference.residual_rms_norm(quant_matmul(x, w, w_scale), residual, gamma, eps)``. On a
    Hopper GPU (or interpreted) with ``RESIDUAL_NORM_ON_HOPPER``: one kernel after the decode
    matmul instead of XLA's two (``residual_norm``); elsewhere that composition."""
    backend = backend or jax.default_backend()
    if (RESIDUAL_NORM_ON_HOPPER and backend != "tpu" and _mosaic_gpu(backend, interpret)
            and mgpu.residual_norm_supports(x, w, residual, gamma)):
        return mgpu.quant_matmul_residual_norm(x, w, w_scale, residual, gamma, eps=eps,
                                               interpret=interpret)
    y = quant_matmul(x, w, w_scale, interpret=interpret, backend=backend)
    return reference.residual_rms_norm(y, residual, gamma, eps)


def quant_rope_write_fuses(x: jax.Array, w: jax.Array, groups: int, head_dim: int, bias: bool, *,
                           interpret: bool = False, backend: str | None = None) -> bool:
    """Whether ``quant_matmul_rope_write`` runs its fused kernel for these operands (the decode
    kernel's partials into ``kv_write.rope_write``, where ``kv_write.api.rope_write_fuses``);
    else it is the composition."""
    backend = backend or jax.default_backend()
    if not (_mosaic_gpu(backend, interpret) and mgpu.rope_write_supports(x, w, groups, head_dim, bias)):
        return False
    parts = mgpu.kernel_config(x.shape[0], w.shape[0], x.shape[1]).slots(w.shape[0])
    return kv_api.rope_write_fuses(x.shape[0], parts, groups, head_dim, bias, True, interpret=interpret,
                                   backend=backend)


def quant_matmul_rope_write(x: jax.Array, w: jax.Array, w_scale: jax.Array, bias: jax.Array | None,
                            cos: jax.Array, sin: jax.Array, slot_mapping: jax.Array, k_pages: jax.Array,
                            v_pages: jax.Array, *, groups: int, interpret: bool = False,
                            backend: str | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A fused QKV projection (w8a16; x [T, K], w [N, K], N = Nkv x (G + 2) x d: per kv head G
    query heads, K, V), its bias (None or [N]), RoPE (cos / sin float32 [T, d]) and the K / V
    write into the unquantized pools at ``slot_mapping`` -> (q [T, Nkv * G, d], k_pages,
    v_pages), as ``kv_write.reference.rope_write`` of the projection. One kernel after the
    decode matmul where ``quant_rope_write_fuses``; otherwise the finished projection goes
    through ``kv_write.api.write_rope`` (XLA's RoPE and scatters, or under its own dense switch
    the same kernel after XLA's sum)."""
    if quant_rope_write_fuses(x, w, groups, k_pages.shape[-1], bias is not None, interpret=interpret,
                              backend=backend):
        return mgpu.quant_matmul_rope_write(x, w, w_scale, bias, cos, sin, slot_mapping, k_pages,
                                            v_pages, groups=groups, interpret=interpret)
    y = quant_matmul(x, w, w_scale, interpret=interpret, backend=backend)
    return kv_api.write_rope(y, bias, cos, sin, slot_mapping, k_pages, v_pages, groups=groups,
                             interpret=interpret)


def quant_matmul_silu_gate(x: jax.Array, w: jax.Array, w_scale: jax.Array, *, interpret: bool = False,
                           backend: str | None = None) -> jax.Array:
    """The MLP's fused gate/up projection (w8a16) and its gate: x [T, K], w [2I, K] (gate rows,
    then up rows), w_scale f32[2I] -> SiLU(gate) * up [T, I] in x's dtype, as
    ``reference.silu_gate(quant_matmul(x, w, w_scale))``. On a Hopper GPU (or interpreted) with
    ``SILU_GATE_ON_HOPPER`` where ``mgpu.silu_gate_supports``: one kernel (``gated``);
    elsewhere that composition."""
    backend = backend or jax.default_backend()
    if (SILU_GATE_ON_HOPPER and backend != "tpu" and _mosaic_gpu(backend, interpret)
            and mgpu.silu_gate_supports(x, w)):
        return mgpu.quant_matmul_silu_gate(x, w, w_scale, interpret=interpret)
    return reference.silu_gate(quant_matmul(x, w, w_scale, interpret=interpret, backend=backend))
