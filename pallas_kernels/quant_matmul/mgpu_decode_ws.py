"""Warp-specialized form of the persistent decode matmul: a memory warpgroup feeds two consumers.

Where it sits: ``mgpu.decode_parts`` calls ``decode_matmul_ws`` in place of
``mgpu_decode.decode_matmul_t`` when the config has ``warp_specialized`` (an A/B,
``mgpu.DECODE_WARP_SPECIALIZED``; off until the device times it). Units, the split of K, the
partials and their epilogue are ``mgpu_decode``'s; what differs is who does what inside a CTA::

    one CTA per SM, three warpgroups:
      the memory warpgroup (40 registers) issues the TMA copies of the ring: per step a
        [block_n, block_k] weight tile (block_n = 128 here: both consumers' rows) and the
        [Mp, block_k] x tile, as soon as both consumers released the slot
      consumer j (j = 0, 1) takes rows [64 j, 64 j + 64) of every weight tile: dequantizes them
        in registers, multiplies with the shared x tile, adds the product to its register carry
        [64, Mp]; a unit's last step writes the carry to its half of the unit's partial tile

Why (KERNEL_NOTES runs 17-19, 23, 26): on the device clock the single-warpgroup kernel reads
what its own ring reads, the bare ring of 64 x 128 tiles at 4 stages reads 88% of the HBM read
ceiling at the 8B's gate/up, yet the kernel with those tiles lost to 64 x 256: each step's body
(barrier wait, SMEM loads, conversion, wgmma, wait) runs in the same warpgroup that refills the
ring, one step after another. Here the refill never waits for a body, and each consumer's body
per 16 KB step is a 64 x 128 tile: the per-byte body cost of 64 x 256 steps, with two bodies in
flight per SM (as two CTAs per SM give today) fed by one deeper ring of larger TMA boxes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.quant_matmul import mgpu_decode as md
from pallas_kernels.quant_matmul.mgpu_decode import DecodeConfig

CONSUMERS = 2         # compute warpgroups per CTA, each owning 64 rows of the unit
CONSUMER_ROWS = 64    # weight rows per consumer (one wgmma M)
MEMORY_REGISTERS = 40   # the memory warpgroup's registers per thread (setmaxnreg)


def supports(mp: int, n: int, k: int, config: DecodeConfig) -> bool:
    """Whether the warp-specialized kernel tiles x [Mp, K] @ w [N, K]^T with ``config``: units
    of CONSUMERS x 64 rows, TMA steps of at most 128 columns (one wgmma chunk per step), a ring of
    3+ stages with ``async_acc`` (its slots free a step late), no x_resident / pdl."""
    return (mp <= 64 and mp % 8 == 0 and config.block_n == CONSUMERS * CONSUMER_ROWS
            and n % config.block_n == 0 and config.block_k in (64, 128)
            and k % (config.block_k * config.split_k) == 0 and config.per_cta > 0
            and config.stages >= 2 + config.async_acc and not (config.x_resident or config.pdl))


def decode_matmul_ws(xp: jax.Array, w: jax.Array, *, config: DecodeConfig, fp8: jnp.dtype,
                     interpret: bool = False) -> jax.Array:
    """``mgpu_decode.decode_matmul_t``'s contract by the warp-specialized kernel: xp [Mp, K], w
    [N, K] 8-bit -> float32 partials out^T [split_k, N, Mp] (``store_mn``: [split_k, Mp, N]).
    ``supports(...)`` must hold."""
    mp, k = xp.shape
    n = w.shape[0]
    cfg = config
    if not supports(mp, n, k, cfg):
        raise ValueError(f"mgpu warp-specialized decode matmul: N={n}, K={k}, Mp={mp} do not tile by {cfg}")
    bn, bk, split, rows = cfg.block_n, cfg.block_k, cfg.split_k, CONSUMER_ROWS
    steps = k // bk // split                     # K blocks per unit
    units, per_cta = n // bn * split, cfg.per_cta
    ctas = cfg.ctas(n)
    a_dtype = xp.dtype
    via_smem = jnp.dtype(w.dtype) != jnp.dtype(a_dtype) and (interpret or not cfg.a_in_registers)
    count_static = units % per_cta == 0

    def unit(c, i):   # -> (tile, part) of CTA c's step i
        g = c * per_cta + i // steps
        return g // split, lax.rem(g, split)

    def zero() -> jax.Array:
        return plgpu.layout_cast(jnp.zeros((rows, mp), jnp.float32), plgpu.Layout.WGMMA)

    def pipeline(body, context):
        c = lax.axis_index("c")

        def kblock(i):
            return unit(c, i)[1] * steps + lax.rem(i, steps)

        release = 1 if cfg.async_acc else 0   # async: a step's slot is released a step later
        w_spec = plgpu.BlockSpec((bn, bk), lambda i: (unit(c, i)[0], kblock(i)),
                                 transforms=md.smem_transforms(w.dtype, bk), delay_release=release)
        x_spec = plgpu.BlockSpec((mp, bk), lambda i: (0, kblock(i)),
                                 transforms=md.smem_transforms(a_dtype, bk), delay_release=release)
        count = per_cta if count_static else jnp.minimum(per_cta, units - c * per_cta)
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(count * steps,), memory_registers=MEMORY_REGISTERS, in_specs=[w_spec, x_spec],
            max_concurrent_steps=cfg.stages, wg_axis="wg", num_compute_wgs=CONSUMERS,
            compute_context=context)

    def kernel(x_gmem, w_gmem, o_gmem, o_smem, *a_smem):
        c, wg = lax.axis_index("c"), lax.axis_index("wg")
        half = pl.ds(wg * rows, rows)

        def flush(value, i):   # consumer wg's [64, Mp] sum of step i's unit -> its half of the tile
            tile, part = unit(c, i)
            mine = o_smem.at[wg]
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # its previous flush read the tile
            if cfg.store_mn:
                mine.transpose((1, 0))[...] = plgpu.layout_cast(value, plgpu.Layout.WGMMA_TRANSPOSED)
                dst = o_gmem.at[pl.ds(part * mp, mp), pl.ds(tile * bn + wg * rows, rows)]
            else:
                mine[...] = value
                dst = o_gmem.at[pl.ds(part * n + tile * bn + wg * rows, rows), :]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(mine, dst)

        def body(idx, w_smem, x_smem, carry):
            i = idx[0]
            a = a_smem[0].at[wg] if via_smem else None
            carry = carry + pl.run_scoped(
                lambda acc: md.tile_product(acc, w_smem.at[half], x_smem, fp8=fp8, a_smem=a,
                                         int8_bits=cfg.int8_f16_bits),
                plgpu.ACC((rows, mp), jnp.float32))
            last = lax.rem(i, steps) == steps - 1
            pl.when(last)(lambda: flush(carry, i))
            return lax.cond(last, lambda v: zero(), lambda v: v, carry)

        def async_body(idx, w_smem, x_smem, carry):   # async_acc: ``mgpu_decode``'s, per consumer
            acc, before = carry   # the accumulator of every unit so far; its value when this began
            i = idx[0]
            a = a_smem[0].at[wg] if via_smem else None
            md.issue_product(acc, w_smem.at[half], x_smem, fp8=fp8, a_smem=a, pending=True,
                             int8_bits=cfg.int8_f16_bits)

            def unit_done(before):   # waits for every wgmma: the running sum less the units before
                total = acc[...]
                flush(total - before, i)
                return total

            def step_done(before):   # the step before's wgmmas are done: its slot may be released
                plgpu.wgmma_wait(md.wgmmas_per_tile(bk))
                return before

            return acc, lax.cond(lax.rem(i, steps) == steps - 1, unit_done, step_done, before)

        def context(run):   # the consumers' carry, from zero; nothing after the last unit's flush
            run(zero())

        def async_context(run):
            pl.run_scoped(lambda acc: run((acc, zero())), plgpu.ACC((rows, mp), jnp.float32))

        if cfg.async_acc:
            pipeline(async_body, async_context)(w_gmem, x_gmem)
        else:
            pipeline(body, context)(w_gmem, x_gmem)
        plgpu.wait_smem_to_gmem(0, wait_read_only=cfg.exit_read_only)

    tile_shape = (mp, rows) if cfg.store_mn else (rows, mp)
    scratch = [plgpu.SMEM((CONSUMERS, *tile_shape), jnp.float32,
                          transforms=md.smem_transforms(jnp.float32, tile_shape[1]))]
    if via_smem:
        chunk = min(bk, 128)
        scratch.append(plgpu.SMEM((CONSUMERS, rows, chunk), a_dtype,
                                  transforms=md.smem_transforms(a_dtype, chunk)))
    out = jax.ShapeDtypeStruct((split * mp, n) if cfg.store_mn else (split * n, mp), jnp.float32)
    f = plgpu.kernel(
        kernel, out_type=out, grid=(ctas,), grid_names=("c",), num_threads=CONSUMERS + 1, thread_name="wg",
        scratch_types=scratch, kernel_name=f"quant_decode_ws_{n}x{k}",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    return f(xp, w).reshape((split, mp, n) if cfg.store_mn else (split, n, mp))

