"""A decode matmul that feeds wgmma from plain loads of a K-permuted weight (no TMA for the
weight), against the engine's decode kernel, on the device clock. A probe: not the engine's.

Where it sits: beside benchmarks/ring_cost.py (session 55, H100: the decode kernel's TMA ring
costs 3.5 us fixed against 1.9 for XLA's plain loads, which caps the kernel near 82% of the
read at [14336, 4096]). A sum over K does not care about K's order, so the weight's columns
(and x's, the same way) can be permuted once so that each thread's bytes of wgmma's register
fragment lie in contiguous 16-byte runs:

  in each 128-column block, column 8j + 2q + e (j < 16: the fragment's 8-column block, q < 4:
  the lane's position in its row quad, e < 2) goes to 64 (j // 8) + 16 q + 2 (j % 8) + e.

A thread then loads its two rows of a [64, 128] tile with four ``ld.global.v4`` (a warp reads
64 contiguous bytes of 8 rows per load) and the registers are the int8 tile in Mosaic GPU's
WGMMA layout (``inline_mgpu``), converted to bf16 and multiplied with x's tile (TMA, SMEM) as
the engine's kernel does; ``depth`` tiles are loaded ahead in the pipeline's carry. Units as
``mgpu_decode`` (K in ``split`` parts; a CTA's ``per_cta`` units back to back); each unit's sum
is stored as a partial [split, Mp, N], summed and scaled by ``mgpu_decode.finish``.

    PYTHONPATH=. python3 benchmarks/direct_gemv.py [--shape 14336x4096] [--ms 16,1] [--depths 2,4]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, gpu, vector
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import fragmented_array as fa
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.device_clock import add_clock_arguments, clock_and_ceiling, print_reads, weight_copies
from benchmarks.quant_matmul import rel
from pallas_kernels.quant_matmul import mgpu as qmgpu
from pallas_kernels.quant_matmul import mgpu_decode
from pallas_kernels.quant_matmul import reference as ref

BK = 128   # K columns per step: one permutation block


def k_order(k: int) -> np.ndarray:
    """The permuted column order: position p of each 128-column block holds original column
    ``k_order(k)[p]`` (the module docstring's map, inverted)."""
    p = np.arange(BK)
    s, q, jj, e = p // 64, (p % 64) // 16, (p % 16) // 2, p % 2
    block = 8 * (8 * s + jj) + 2 * q + e
    return np.concatenate([b * BK + block for b in range(k // BK)])


def direct_matmul(xp: jax.Array, wp: jax.Array, *, split: int, per_cta: int, depth: int,
                  stages: int = 4, bn: int = 64, interpret: bool = False) -> jax.Array:
    """xp [Mp, K] bf16 and wp [N, K] int8, both K-permuted (``k_order``) -> float32 partials
    [split, Mp, N] summing to x @ w^T. ``interpret``: Pallas' interpreter, the weight tiles
    read by ``plgpu.load`` (the same values; the interpreter runs no inline PTX)."""
    mp, k = xp.shape
    n = wp.shape[0]
    steps, units = k // BK // split, n // bn * split
    ctas = -(-units // per_cta)
    shape = fa.WGMMA_LAYOUT.registers_shape((bn, BK))
    assert shape == (1, BK // 8, 1, 1, 2, 1, 1, 1, 1), shape

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),),
                       return_type=plgpu.ShapeDtypeStruct((bn, BK), jnp.int8, layout=plgpu.Layout.WGMMA))
    def load_tile(ctx, ref_):   # a [64, 128] tile of wp -> the int8 tile in the WGMMA layout
        del ctx
        i8, i16, i32, i64 = (ir.IntegerType.get_signless(b) for b in (8, 16, 32, 64))
        v2 = ir.VectorType.get((2,), i8)
        tid = arith.index_cast(i64, arith.remui(gpu.thread_id(gpu.Dimension.x),
                                                mgpu_utils.c(128, ir.IndexType.get())))
        warp, lane = arith.divui(tid, mgpu_utils.c(32, i64)), arith.remui(tid, mgpu_utils.c(32, i64))
        row0 = arith.addi(arith.muli(warp, mgpu_utils.c(16, i64)), arith.divui(lane, mgpu_utils.c(4, i64)))
        quad = arith.muli(arith.remui(lane, mgpu_utils.c(4, i64)), mgpu_utils.c(16, i64))
        base = mgpu_utils.memref_ptr(ref_)
        regs = np.empty(shape, object)
        for h in range(2):   # the fragment's rows r and r + 8
            row = arith.addi(row0, mgpu_utils.c(8 * h, i64))
            for s in range(2):   # 8-column blocks 8s .. 8s + 7
                off = arith.addi(arith.addi(arith.muli(row, mgpu_utils.c(k, i64)), quad),
                                 mgpu_utils.c(64 * s, i64))
                ptr = mgpu_utils.getelementptr(base, [off], i8)
                words = mgpu_utils.inline_ptx("ld.global.v4.b32 {$0, $1, $2, $3}, [$4];", ptr,
                                              result_types=[i32] * 4)
                for jj in range(8):   # word jj // 2, its low or high half: a vector<2xi8>
                    half = arith.trunci(i16, arith.shrui(words[jj // 2], mgpu_utils.c(16 * (jj % 2), i32)))
                    pair = vector.from_elements(ir.VectorType.get((1,), i16), [half])
                    regs[0, 8 * s + jj, 0, 0, h, 0, 0, 0, 0] = vector.bitcast(v2, pair)
        return mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=True)

    def zero() -> jax.Array:
        return plgpu.layout_cast(jnp.zeros((bn, mp), jnp.float32), plgpu.Layout.WGMMA)

    def kernel(x_gmem, w_gmem, o_gmem, o_smem, *a_smem):   # (a_smem: interpreted only)
        c = lax.axis_index("c")
        count = per_cta if units % per_cta == 0 else jnp.minimum(per_cta, units - c * per_cta)

        def unit(i):   # -> (tile, part) of step i
            g = c * per_cta + i // steps
            return g // split, lax.rem(g, split)

        def w_tile(i):   # step i's weight tile (past the last step: the last again)
            i = jnp.minimum(i, count * steps - 1)
            tile, part = unit(i)
            src = w_gmem.at[pl.ds(tile * bn, bn), pl.ds((part * steps + lax.rem(i, steps)) * BK, BK)]
            if interpret:
                return plgpu.load(src, layout=plgpu.Layout.WGMMA, optimized=False)
            return load_tile(src)

        def store(value, i):
            tile, part = unit(i)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            o_smem.transpose((1, 0))[...] = plgpu.layout_cast(value, plgpu.Layout.WGMMA_TRANSPOSED)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(part * mp, mp), pl.ds(tile * bn, bn)])

        def body(idx, x_smem, carry):
            i = idx[0]
            ahead, total = carry
            a = ahead[0].astype(jnp.bfloat16)

            def product(acc):
                if a_smem:   # the interpreter's wgmma reads its A operand from SMEM only
                    a_smem[0][...] = a
                    plgpu.commit_smem()
                plgpu.wgmma(acc, a_smem[0] if a_smem else a, x_smem.transpose((1, 0)))
                return acc[...]
            total = total + pl.run_scoped(product, plgpu.ACC((bn, mp), jnp.float32))
            last = lax.rem(i, steps) == steps - 1
            pl.when(last)(lambda: store(total, i))
            return (*ahead[1:], w_tile(i + depth)), lax.cond(last, lambda t: zero(), lambda t: t, total)

        x_spec = plgpu.BlockSpec((mp, BK), lambda i: (0, unit(i)[1] * steps + lax.rem(i, steps)),
                                 transforms=mgpu_decode.smem_transforms(xp.dtype, BK))
        ahead = tuple(w_tile(jnp.asarray(d, jnp.int32)) for d in range(depth))
        plgpu.emit_pipeline(body, grid=(count * steps,), in_specs=[x_spec], max_concurrent_steps=stages,
                            init_carry=(ahead, zero()))(x_gmem)
        plgpu.wait_smem_to_gmem(0)

    f = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((split * mp, n), jnp.float32),
                     scratch_types=[plgpu.SMEM((mp, bn), jnp.float32,
                                               transforms=mgpu_decode.smem_transforms(jnp.float32, bn)),
                                    *([mgpu_decode.a_tile(bn, BK, xp.dtype)] if interpret else [])],
                     grid=(ctas,), grid_names=("c",), kernel_name=f"direct_{n}x{k}",
                     compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
                     interpret=plgpu.InterpretGPUParams() if interpret else None)
    return f(xp, wp).reshape(split, mp, n)


def direct_linear(x: jax.Array, wp: jax.Array, s: jax.Array, order: jax.Array, *, split: int, per_cta: int,
                  depth: int, interpret: bool = False) -> jax.Array:
    """x [M, K] bf16 (natural order), wp int8 [N, K] (``k_order``), s float32 [N] -> [M, N]."""
    m = x.shape[0]
    xp = jnp.pad(x[:, order], ((0, qmgpu.padded_tokens(m) - m), (0, 0)))
    parts = direct_matmul(xp, wp, split=split, per_cta=per_cta, depth=depth, interpret=interpret)
    return mgpu_decode.finish(parts, m, s, None, x.dtype, store_mn=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="14336x4096", help="the int8 weight's N x K")
    ap.add_argument("--ms", default="16,1", help="comma list of token counts")
    ap.add_argument("--depths", default="2,4", help="comma list: weight tiles loaded ahead")
    ap.add_argument("--splits", default="8", help="comma list: K parts per output tile")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    add_clock_arguments(ap, "/tmp/direct_gemv_trace")
    ns = ap.parse_args()
    n, k = (int(v) for v in ns.shape.split("x"))
    kclock, ceiling = clock_and_ceiling(ns)
    order = jnp.asarray(k_order(k))
    copies = weight_copies(n, k, quantized=True)
    permuted = [(q[:, order], s) for q, s in copies]
    ctas = 2 * mgpu_decode.sm_count()
    queued = []
    for m in (int(v) for v in ns.ms.split(",")):
        x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
        want = ref.w8a16_matmul(x, *copies[0], out_dtype=jnp.float32)
        arms = [("decode kernel", lambda x, q, s: qmgpu.quant_matmul(x, q, s), copies)]
        for split in (int(v) for v in ns.splits.split(",")):
            per = -(-(n // 64 * split) // ctas)
            for depth in (int(v) for v in ns.depths.split(",")):
                fn = (lambda x, q, s, split=split, per=per, depth=depth:
                      direct_linear(x, q, s, order, split=split, per_cta=per, depth=depth))
                arms.append((f"plain loads, K in {split}, {per} units per CTA, {depth} ahead", fn, permuted))
        for rnd in (1, 2):
            for name, fn, ws in arms:
                try:
                    err = rel(jnp.asarray(jax.jit(fn)(x, *ws[0]), jnp.float32), want)
                    queued.append((f"{name}, M={m}, round {rnd} (rel err {err:.1e})",
                                   kclock.later(fn, x, ws, ns.iters, ns.reps)))
                except Exception as e:  # noqa: BLE001 - a config that fails to build is a result too
                    print(f"  {name}, M={m}: error {e!r:.400}", flush=True)
    print_reads(f"## int8 [{n}, {k}] ({n * k / 1e6:.1f} MB), {jax.devices()[0].device_kind}, "
                f"read ceiling {ceiling:.0f} GB/s", queued, kclock, n * k, ceiling)


if __name__ == "__main__":
    main()
