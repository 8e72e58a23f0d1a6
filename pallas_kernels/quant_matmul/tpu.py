"""Quantized matmul on TPUs: a blocked Pallas Mosaic TPU kernel with the dequantization in VMEM.

Where it sits: ``pallas_kernels.quant_matmul`` (``api.py``) dispatches here on TPU. Semantics are
``reference.py``'s (``w8a16_matmul`` / ``w8a8_matmul``).

    grid (Mp / block_m, N / block_n, K / block_k), K innermost ("arbitrary")
      x [block_m, block_k], w [block_n, block_k] (8-bit, half the HBM bytes of bf16)
      acc [block_m, block_n] f32 (VMEM scratch) += x @ upcast(w)^T on the MXU
      last K step: out = acc * w_scale[n] (* x_scale[m] for w8a8)

The 8-bit weight is upcast in VMEM to x's dtype (exact for int8 and e4m3 into bf16), so the
kernel reads half (int8/fp8) of a bf16 weight from HBM: that is the decode win. w8a8 quantizes x
to fp8 per token outside the kernel (an XLA fusion over M x K) and runs the fp8 x fp8 products
on the bf16 MXU (exact in float32); TPUs before v7 have no fp8 MXU path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.quant_matmul import reference


def _block(dim: int, options: tuple[int, ...]) -> int | None:
    return next((b for b in options if dim % b == 0), None)


def supports(x: jax.Array, w: jax.Array) -> bool:
    return _block(w.shape[0], (256, 128)) is not None and _block(x.shape[1], (512, 256, 128)) is not None


def _kernel(x_ref, w_ref, ws_ref, xs_ref, o_ref, acc_ref, *, k_steps: int):
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x = x_ref[...]
    w = w_ref[...].astype(jnp.bfloat16 if x.dtype.itemsize == 1 else x.dtype)
    if x.dtype.itemsize == 1:
        x = x.astype(jnp.bfloat16)
    acc_ref[...] += jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                        preferred_element_type=jnp.float32)

    @pl.when(kk == k_steps - 1)
    def _():
        o_ref[...] = (acc_ref[...] * ws_ref[...] * xs_ref[...]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("act_quant", "out_dtype", "interpret"))
def quant_matmul(x: jax.Array, w: jax.Array, w_scale: jax.Array, input_scale: jax.Array | None = None,
                 *, act_quant: bool = False, out_dtype: jnp.dtype | None = None,
                 interpret: bool = False) -> jax.Array:
    """Same contract as ``reference.w8a16_matmul`` / ``reference.w8a8_matmul`` (``act_quant``)."""
    reference.validate_inputs(x, w, w_scale)
    m, k = x.shape
    n = w.shape[0]
    out_dtype = out_dtype or x.dtype
    bn, bk = _block(n, (256, 128)), _block(k, (512, 256, 128))
    if bn is None or bk is None:
        raise ValueError(f"tpu quant matmul: N={n} and K={k} must be multiples of 128")
    if act_quant:
        xq, x_scale = reference.quantize_activations(x, input_scale)
    else:
        xq, x_scale = x, jnp.ones((m,), jnp.float32)
    bm = min(256, -(-m // 16) * 16)
    mp = -(-m // bm) * bm
    if mp != m:
        xq = jnp.pad(xq, ((0, mp - m), (0, 0)))
        x_scale = jnp.pad(x_scale, (0, mp - m))
    out = pl.pallas_call(
        functools.partial(_kernel, k_steps=k // bk),
        grid=(mp // bm, n // bn, k // bk),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk)),
            pl.BlockSpec((1, bn), lambda i, j, kk: (0, j)),
            pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="quant_matmul_tpu",
    )(xq, w, w_scale.reshape(1, n).astype(jnp.float32), x_scale.reshape(mp, 1).astype(jnp.float32))
    return out[:m]
