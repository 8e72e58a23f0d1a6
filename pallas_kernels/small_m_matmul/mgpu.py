"""Small-M dense matmul for Hopper GPUs in Pallas Mosaic GPU: a decode step's projection over
one layer of the stacked weights, streamed by TMA into a wgmma pipeline.

Where it sits: ``pallas_kernels.small_m_matmul`` (``api.py``) dispatches here on an H100/H200
when ``supports(...)`` holds. Semantics are ``reference.py``'s.

Why: a decode step's matmuls have 1-64 token rows, so they read the weight once and compute
little. XLA's split-K Triton GEMMs ran Qwen2.5-0.5B's four projections of a 16-token step at
0.7-1.9 TB/s on 76-112 CTAs (22 us per layer against a 9 us weight-read floor, H200 trace in
benchmarks/RESULTS_v2_sessions_5-8.md). This kernel puts ~2 CTAs on every SM::

    x [M, K] -> padded to 64 rows (one warpgroup's wgmma M; the pad is zeros)
    grid (N / block_n, split_k), one warpgroup per CTA
    pipeline over this CTA's K / block_k / split_k steps:
      TMA x[64, block_k] and w[layer, block_k, block_n] -> SMEM ring, wgmma into float32 acc
    epilogue: the first ``out_rows`` rows of acc -> SMEM -> TMA -> partials [split_k, out_rows, N]

The split-K partials (float32, ``out_rows`` = M padded to 8) are summed by the XLA fusion after
the kernel, which also casts and drops the pad rows. ``layer`` (int32[1]) is read in the kernel
and picks the stack's layer, so XLA never copies a layer out of the stack for the call.

Tile shapes (``default_config``): block_n 64, block_k 64 (32 when K is not a multiple of 64),
4 stages, split_k the smallest divisor of the K steps that gives >= TARGET_CTAS CTAs while each
part keeps >= 2 steps. Measured numbers: benchmarks/KERNEL_NOTES.md.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.small_m_matmul import reference

ROWS = reference.MAX_TOKENS   # wgmma M of one warpgroup: x is padded to it
TARGET_CTAS = 264             # ~2 per SM of an H100 / H200 (132 SMs)


@dataclasses.dataclass(frozen=True)
class SmallMConfig:
    block_n: int = 64      # output columns per CTA (a multiple of 64)
    block_k: int = 64      # contraction per pipeline step (64 or 32 for 16-bit operands)
    stages: int = 4        # TMA ring depth
    split_k: int = 1       # K parts per output tile, each a CTA (partials summed after the kernel)


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def out_rows(m: int) -> int:
    """Rows of the partials the kernel writes: M padded to a multiple of 8."""
    return max(8, -(-m // 8) * 8)


def default_config(m: int, n: int, k: int) -> SmallMConfig:
    del m
    bk = 64 if k % 64 == 0 else 32
    tiles, steps, split = max(1, n // 64), k // bk, 1
    for d in range(2, steps // 2 + 1):
        if tiles * split >= TARGET_CTAS:
            break
        if steps % d == 0:
            split = d
    return SmallMConfig(block_n=64, block_k=bk, stages=4, split_k=split)


def supports(x: jax.Array, w: jax.Array, config: SmallMConfig | None = None) -> bool:
    """Shapes and dtypes the kernel takes (else the dispatcher uses XLA)."""
    m, k = x.shape
    if w.ndim != 3 or m > ROWS or jnp.dtype(x.dtype) not in (jnp.dtype(jnp.bfloat16),
                                                               jnp.dtype(jnp.float16)):
        return False
    n = w.shape[2]
    cfg = config or default_config(m, n, k)
    return (n % cfg.block_n == 0 and cfg.block_n % 64 == 0 and cfg.block_k in (32, 64)
            and k % (cfg.block_k * cfg.split_k) == 0)


def _transforms(dtype: jnp.dtype, cols: int) -> tuple:
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(cols * bits)
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def partials(xp: jax.Array, w: jax.Array, layer: jax.Array, rows: int, *, config: SmallMConfig,
             interpret: bool = False) -> jax.Array:
    """xp: [64, K], w: [L, K, N] (xp's dtype), layer: int32[1] -> float32 partials
    [split_k, rows, N] summing to (xp @ w[layer])[:rows]."""
    k = xp.shape[1]
    n = w.shape[2]
    bn, bk, split = config.block_n, config.block_k, config.split_k
    if n % bn or k % (bk * split) or bn % 64 or xp.shape[0] != ROWS or rows % 8 or rows > ROWS:
        raise ValueError(f"small-M matmul: N={n}, K={k}, rows={rows} do not tile by {config}")
    steps = k // bk // split
    dtype = xp.dtype

    def kernel(layer_gmem, x_gmem, w_gmem, o_gmem):
        ni = lax.axis_index("n")
        s = lax.axis_index("s")
        k0 = s * steps
        w_layer = w_gmem.at[layer_gmem[0]]

        def with_smem(o_smem):
            def with_acc(acc_ref):
                def body(_, x_smem, w_smem):
                    plgpu.wgmma(acc_ref, x_smem, w_smem)
                    plgpu.wgmma_wait(0)

                plgpu.emit_pipeline(
                    body, grid=(steps,),
                    in_specs=[
                        plgpu.BlockSpec((ROWS, bk), lambda kk: (0, k0 + kk),
                                        transforms=_transforms(dtype, bk)),
                        plgpu.BlockSpec((bk, bn), lambda kk: (k0 + kk, ni),
                                        transforms=_transforms(dtype, bk)),
                    ],
                    max_concurrent_steps=config.stages,
                )(x_gmem, w_layer)
                o_smem[...] = acc_ref[...]

            pl.run_scoped(with_acc, plgpu.ACC((ROWS, bn), jnp.float32))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, rows)],
                                    o_gmem.at[pl.ds(s * rows, rows), pl.ds(ni * bn, bn)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(with_smem,
                      plgpu.SMEM((ROWS, bn), jnp.float32, transforms=_transforms(jnp.float32, bn)))

    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((split * rows, n), jnp.float32),
        grid=(n // bn, split),
        grid_names=("n", "s"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    return f(layer.astype(jnp.int32), xp, w).reshape(split, rows, n)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def small_m_matmul(x: jax.Array, w: jax.Array, layer: jax.Array, *,
                   config: SmallMConfig | None = None, interpret: bool = False) -> jax.Array:
    """Same contract as ``reference.small_m_matmul``: x [M <= 64, K], w [L, K, N], layer int32[1]
    -> [M, N] in x's dtype. Under one jit so that every layer's call site shares one lowering."""
    reference.validate_inputs(x, w, layer)
    m, k = x.shape
    cfg = config or default_config(m, w.shape[2], k)
    xp = jnp.pad(x, ((0, ROWS - m), (0, 0))) if m != ROWS else x
    parts = partials(xp, w, layer, out_rows(m), config=cfg, interpret=interpret)
    return parts.sum(axis=0)[:m].astype(x.dtype)
