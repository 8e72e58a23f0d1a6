"""The decode matmul's epilogue fused with the residual add and the next RMSNorm (Mosaic GPU).

Where it sits: ``mgpu.quant_matmul_residual_norm`` calls it after the persistent decode kernel
(``mgpu_decode``, ``store_mn``) for the o and down projections, whose results feed a residual
add and then an RMSNorm. Semantics are ``reference.residual_rms_norm`` of ``finish``'s output.

Why: the decode kernel returns split-K partials [S, Mp, N]. For the qkv and gate/up projections
XLA fuses their sum into the consumer; for o and down it cannot, because the consumer is the
residual add feeding RMSNorm's row reduction: XLA runs the sum (with the residual add) in one
kernel and the norm in another, where bf16's cuBLAS GEMM adds the residual in its epilogue.
That is two kernels per o / down projection where bf16 has one: the 8B's int8 batch-1 step ran
462 kernels against bf16's 399 (H200, session 24; the offline H200 compile of session 36 shows
the same pair per projection). Here one kernel does both::

    grid (T,): CTA m owns token row m (rows past T, the padding of Mp, are never read)
      bulk copies: parts[:, m] [S, N] f32, residual[m] [N], w_scale [N] f32, gamma [N] -> SMEM
      y = sum_s parts[s] * w_scale   -> residual's dtype     (``finish``'s sum and cast)
      h = residual + y                                        (the residual stream)
      normed = gamma * (h * rsqrt(mean(h^2) + eps))           (HF's RMSNorm: float32 statistics)
      h, normed -> SMEM -> HBM

Rows are [N / C, C] in SMEM (C = 256 columns: one TMA box). The whole row sits in SMEM, so S x N
float32 partials bound the shapes (``supports``); larger ones keep XLA's two kernels.

``pdl`` (the decode kernel's A/B, ``mgpu.DECODE_PDL``): programmatic dependent launch as in
``mgpu_decode``: ``griddepcontrol.wait`` before the first copy, ``launch_dependents`` once the
row is in SMEM, so the next matmul's launch overlaps this kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

COLUMNS = 256                 # one TMA box per row chunk (a box dim holds at most 256 values)
SMEM_BYTES = 200 * 1024       # of an H100 / H200 SM's 227 KB


def smem_bytes(split_k: int, n: int, dtype: jnp.dtype, gamma_dtype: jnp.dtype) -> int:
    """SMEM one CTA holds: the partials, the residual, the scale, gamma and both outputs."""
    return n * (4 * split_k + 4 + 3 * jnp.dtype(dtype).itemsize + jnp.dtype(gamma_dtype).itemsize)


def supports(split_k: int, n: int, dtype: jnp.dtype, gamma_dtype: jnp.dtype) -> bool:
    """Whether a row of N outputs from ``split_k`` partials fits the kernel (gamma in the stream's
    dtype, as the model holds it: the normed row is stored in that dtype)."""
    return (n % COLUMNS == 0 and jnp.dtype(gamma_dtype) == jnp.dtype(dtype)
            and smem_bytes(split_k, n, dtype, gamma_dtype) <= SMEM_BYTES)


def residual_rms_norm(parts: jax.Array, residual: jax.Array, w_scale: jax.Array, gamma: jax.Array,
                      eps: float, *, pdl: bool = False, interpret: bool = False
                      ) -> tuple[jax.Array, jax.Array]:
    """parts: float32 [S, Mp, N] (``store_mn`` partials, no scales), residual [T, N] (T <= Mp),
    w_scale float32 [N], gamma [N] -> (h [T, N], normed [T, N]) in residual's dtype, with
    y = sum(parts)[:T] * w_scale cast to that dtype, h = residual + y, normed = RMSNorm(h)."""
    s_count, mp, n = parts.shape
    t = residual.shape[0]
    dtype = residual.dtype
    if t > mp or not supports(s_count, n, dtype, gamma.dtype):
        raise ValueError(f"residual_rms_norm: S={s_count}, Mp={mp}, T={t}, N={n} do not fit")
    rows = n // COLUMNS
    parts = parts.reshape(s_count, mp, rows, COLUMNS)
    pdl = pdl and not interpret   # (the interpreter runs kernels one at a time)

    def kernel(p_gmem, r_gmem, s_gmem, g_gmem, h_gmem, x_gmem):
        m = lax.axis_index("m")

        def scoped(p_smem, r_smem, s_smem, g_smem, h_smem, x_smem, bar):
            if pdl:   # the partials come from the kernel ahead: wait for it before loading
                plgpu.griddepcontrol_wait()
            for s in range(s_count):
                plgpu.copy_gmem_to_smem(p_gmem.at[s, m], p_smem.at[s], bar.at[s])
            plgpu.copy_gmem_to_smem(r_gmem.at[m], r_smem, bar.at[s_count])
            plgpu.copy_gmem_to_smem(s_gmem, s_smem, bar.at[s_count + 1])
            plgpu.copy_gmem_to_smem(g_gmem, g_smem, bar.at[s_count + 2])
            for j in range(s_count + 3):
                plgpu.barrier_wait(bar.at[j])
            if pdl:
                plgpu.griddepcontrol_launch_dependents()
            total = p_smem[0]
            for s in range(1, s_count):
                total = total + p_smem[s]
            h = r_smem[...] + (total * s_smem[...]).astype(dtype)
            hf = h.astype(jnp.float32)
            inv = lax.rsqrt(jnp.sum(hf * hf) * (1.0 / n) + eps)
            h_smem[...] = h
            x_smem[...] = g_smem[...] * (hf * inv).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(h_smem, h_gmem.at[m])
            plgpu.copy_smem_to_gmem(x_smem, x_gmem.at[m])
            plgpu.wait_smem_to_gmem(0)

        row = (rows, COLUMNS)
        pl.run_scoped(scoped, plgpu.SMEM((s_count, *row), jnp.float32), plgpu.SMEM(row, dtype),
                      plgpu.SMEM(row, jnp.float32), plgpu.SMEM(row, gamma.dtype),
                      plgpu.SMEM(row, dtype), plgpu.SMEM(row, dtype),
                      plgpu.Barrier(num_barriers=s_count + 3))

    f = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((t, rows, COLUMNS), dtype),) * 2,
        grid=(t,),
        grid_names=("m",),
        kernel_name=f"residual_norm_{n}",
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    h, normed = f(parts, residual.reshape(t, *row_shape(n)), w_scale.reshape(row_shape(n)),
                  gamma.reshape(row_shape(n)))
    return h.reshape(t, n), normed.reshape(t, n)


def row_shape(n: int) -> tuple[int, int]:
    """A row of N values as the kernel holds it: [N / COLUMNS, COLUMNS]."""
    return n // COLUMNS, COLUMNS
