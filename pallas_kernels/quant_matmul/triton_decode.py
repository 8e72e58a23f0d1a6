"""Weight-only 8-bit decode matmul through the Pallas Triton lowering: plain pipelined loads, no TMA.

Where it sits: beside ``mgpu_decode.py`` (the persistent Mosaic GPU kernel, TMA ring + wgmma)
as the other candidate for the engine's decode matmuls (x [M <= 64, K] @ w [N, K]^T, w8a16).
``api.quant_matmul`` sends w8a16 decode matmuls here on a GPU when ``api.DECODE_KERNEL`` is
``"triton"``; semantics are ``reference.w8a16_matmul``'s.

Why a second kernel: session 31 (H200, benchmarks/decode_stream.py) timed the Mosaic kernel's own
TMA ring with an empty body at ~10-15% under XLA's plain read of the same weight (8B gate/up,
117 MB: XLA 37.3 us, bare ring 42.0, kernel 46.7), so no body change on that ring reaches the
85%-of-HBM target. XLA's read uses ordinary vectorized loads from many resident CTAs; this kernel
does the same (Triton's software pipeline of ``cp.async`` loads over the K loop, as Marlin-style
GEMV kernels do) and leaves the product to ``mma.sync`` on the upcast tile::

    grid (N / block_n, split_k); program (j, s): rows [j * bn, (j + 1) * bn), K blocks of part s
    acc [Mp, bn] f32 = sum over its K blocks of  x[:, kb] (bf16) @ bf16(w[rows, kb])^T
    split_k == 1: out [Mp, N] = acc * w_scale[rows] in x's dtype, written by the kernel
    split_k >  1: float32 partials [split_k, Mp, N], summed and scaled by ``mgpu_decode.finish``

Tokens pad to ``padded_tokens`` (16..64, a power of two: the dot's smallest tile is 16 rows).
Float8 e4m3 weights upcast through float32 (Hopper has no direct e4m3 -> bf16 conversion).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.quant_matmul import reference

MAX_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class TritonDecodeConfig:
    block_n: int = 64       # weight rows (output channels) per program
    block_k: int = 256      # contraction per loop step
    split_k: int = 1        # K parts, each a program (partials summed after the kernel)
    num_warps: int = 4
    num_stages: int = 4     # Triton's software pipeline depth over the K loop


def padded_tokens(m: int) -> int:
    """Tokens padded for the kernel: a power of two from 16 (``tl.dot``'s smallest tile)."""
    return max(16, 1 << (m - 1).bit_length())


TARGET_PROGRAMS = 512   # ~4 per SM of an H100 / H200 (132 SMs): split K up to this


def default_config(m: int, n: int, k: int, block_n: int | None = None,
                   block_k: int | None = None) -> TritonDecodeConfig:
    """block_n 64, block_k 256 (512 where K allows at most 16 tokens), split_k doubled while the
    grid has fewer than ``TARGET_PROGRAMS`` programs and each part keeps >= 4 loop steps
    (``block_n`` / ``block_k`` given: that tile's split)."""
    bk = block_k or (512 if padded_tokens(m) <= 16 and k % 512 == 0 else 256 if k % 256 == 0 else 128)
    bn = block_n or (64 if n % 64 == 0 else 32)
    split, steps = 1, k // bk
    while n // bn * split < TARGET_PROGRAMS and steps % (2 * split) == 0 and steps // (2 * split) >= 4:
        split *= 2
    return TritonDecodeConfig(block_n=bn, block_k=bk, split_k=split)


def supports(m: int, n: int, k: int, config: TritonDecodeConfig | None = None) -> bool:
    """Shapes the kernel tiles (else the dispatcher takes another path)."""
    if m > MAX_TOKENS:
        return False
    cfg = config or default_config(m, n, k)
    pow2 = all(v & (v - 1) == 0 for v in (cfg.block_n, cfg.block_k))
    return pow2 and cfg.block_n >= 16 and n % cfg.block_n == 0 and k % (cfg.block_k * cfg.split_k) == 0


def _kernel(x_ref, w_ref, s_ref, o_ref, *, steps: int, bn: int, bk: int, split: int, f32_upcast: bool):
    j = pl.program_id(0)
    part = pl.program_id(1)
    rows = pl.ds(pl.multiple_of(j * bn, bn), bn)

    def step(i, acc):
        kb = pl.ds(pl.multiple_of((part * steps + i) * bk, bk), bk)
        w = w_ref[rows, kb]
        if f32_upcast:
            w = w.astype(jnp.float32)
        w = w.astype(x_ref.dtype)
        return acc + lax.dot_general(x_ref[:, kb], w, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, steps, step, jnp.zeros((x_ref.shape[0], bn), jnp.float32))
    if split == 1:
        o_ref[:, rows] = (acc * s_ref[rows][None, :]).astype(o_ref.dtype)
    else:
        o_ref[part, :, rows] = acc


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def quant_matmul(x: jax.Array, w: jax.Array, w_scale: jax.Array, *, out_dtype: jnp.dtype | None = None,
                 config: TritonDecodeConfig | None = None, interpret: bool = False) -> jax.Array:
    """``reference.w8a16_matmul``'s contract: x [M, K] bf16/f16, w [N, K] int8|float8_e4m3fn,
    w_scale f32[N] -> [M, N] in ``out_dtype`` (x's dtype by default). M <= ``MAX_TOKENS``."""
    reference.validate_inputs(x, w, w_scale)
    m, k = x.shape
    n = w.shape[0]
    cfg = config or default_config(m, n, k)
    if not supports(m, n, k, cfg):
        raise ValueError(f"triton decode matmul: M={m}, N={n}, K={k} do not tile by {cfg}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    mp = padded_tokens(m)
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    split = cfg.split_k
    steps = k // cfg.block_k // split
    kernel = functools.partial(_kernel, steps=steps, bn=cfg.block_n, bk=cfg.block_k, split=split,
                               f32_upcast=jnp.dtype(w.dtype) == jnp.dtype(reference.FP8))
    out_shape = (jax.ShapeDtypeStruct((mp, n), out_dtype) if split == 1
                 else jax.ShapeDtypeStruct((split, mp, n), jnp.float32))
    out = pl.pallas_call(
        kernel,
        grid=(n // cfg.block_n, split),
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="quant_decode_triton",
    )(xp, w, w_scale.astype(jnp.float32))
    if split == 1:
        return out[:m]
    return (out.sum(axis=0)[:m] * w_scale[None, :]).astype(out_dtype)
