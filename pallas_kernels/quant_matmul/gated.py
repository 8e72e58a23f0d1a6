"""The MLP's fused gate/up decode matmul with the SiLU gate in its epilogue (Mosaic GPU).

Where it sits: ``mgpu.quant_matmul_silu_gate`` calls it for a decode step's gate/up projection
(w8a16, tokens padded to Mp <= 64) in place of the persistent decode kernel (``mgpu_decode``)
and XLA's fusion after it. Semantics are ``reference.silu_gate`` of ``reference.w8a16_matmul``:
the projection rounded to x's dtype, then SiLU(gate) x up.

Why: ``mgpu_decode`` splits K to keep two CTAs per SM (the 8B's gate/up, N = 28,672: 1,792
units of a quarter of K), so its float32 partials [4, 16, 28672] (7.3 MB at 16 tokens) go to HBM
and XLA's fusion reads them back to sum, scale and gate them: ~15 MB of traffic and one more
kernel per layer (~5 us per layer on an H200 at the read rate plus that kernel's launch and
ramp). Here a unit pairs 64 gate rows with the 64 up rows of the same channels, so one CTA holds
both products of its channels over all of K and gates them itself; the 8B's 224 units fill 224
CTAs of one unit each (two per SM on 112 of the 132 SMs) with no partials and no kernel after::

    w [2I, K]: gate rows [0, I), up rows [I, 2I) (the model's fused [2, I, K] weight, flattened)
    unit t (0 <= t < I / 64): gate rows [64t, 64t + 64), up rows [I + 64t, I + 64t + 64), all K
    grid (ctas,): CTA c owns units [c * per_cta, min(units, (c + 1) * per_cta))
      before the pipeline: its units' scales (w_scale[gate rows], w_scale[up rows]) -> SMEM
      one TMA pipeline over its units' steps: the gate tile, the up tile [64, block_k] and the
        x tile [Mp, block_k]; each weight tile dequantized and multiplied as in ``mgpu_decode``
        (``tile_product``) into its own register carry [64, Mp]
      a unit's last step: g = carry_g * scale_g, u = carry_u * scale_u, each rounded to x's
        dtype (the projection's output), h = g * sigmoid(g) * u (float32) -> x's dtype,
        transposed into an SMEM tile [Mp, 64] -> TMA -> h[:, 64t : 64t + 64]

The scales are a [64] row vector per half, broadcast over the tokens in registers. The two weight
tiles of a step are two TMA boxes of one ring slot (16 KB at block_k 128 in int8); the x tile is
shared by both, so each step reads half the x bytes per weight byte of ``mgpu_decode``'s.

``paired_wait`` (an A/B config, ``mgpu.GATED_PAIRED_WAIT``): the step issues the gate tile's and
the up tile's wgmmas before it waits once for both, so the up tile's conversion overlaps the gate
tile's wgmma; without it each product waits for its own. Session 41 (H200, device clock): this
kernel reads 72% of the ceiling on 224 CTAs, and the same tiles on 112 CTAs in a ring twice as
deep (the same bytes in flight) ran 25% slower, so the time each CTA spends per step, not the
bytes it has in flight, bounds the read.

Not here: ``async_acc`` (both accumulators across the steps, each step's wgmmas left in flight,
slots released a step late), session 41's A/B. Session 42 (H100): it gave wrong sums in 2 of its
6 GPU test cases (int8 at 64 tokens, fp8 at 1) and a step 1.0% slower than the default, so it was
removed; the persistent kernel's ``async_acc`` (mgpu_decode.py) passed its GPU tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.quant_matmul.mgpu_decode import (
    DecodeConfig,
    a_tile,
    issue_product,
    persistent_kernel,
    smem_transforms,
    tile_product,
)

MAX_SCALE_BARRIERS = 16   # each of a CTA's units loads two scale rows (one barrier each)


def supports(mp: int, n2: int, k: int, config: DecodeConfig) -> bool:
    """Whether the config tiles x [Mp, K] @ w [2I, K]^T into units of ``block_n`` gate and up rows
    (no split of K; at most ``MAX_SCALE_BARRIERS / 2`` units per CTA; no ``async_acc``)."""
    bn, bk = config.block_n, config.block_k
    return (mp <= 64 and mp % 8 == 0 and n2 % (2 * bn) == 0 and bn == 64 and config.split_k == 1
            and k % bk == 0 and (bk <= 128 or bk % 128 == 0) and 0 < config.per_cta
            and 2 * config.per_cta <= MAX_SCALE_BARRIERS
            and not config.async_acc)


def silu_gate_matmul(xp: jax.Array, w: jax.Array, w_scale: jax.Array, *, config: DecodeConfig,
                     fp8: jnp.dtype, interpret: bool = False) -> jax.Array:
    """xp [Mp, K] bf16 / f16, w [2I, K] int8 / e4m3 (gate rows, then up rows), w_scale float32
    [2I] -> h [Mp, I] in xp's dtype: SiLU(g) * u with g, u = (xp @ w^T * w_scale) rounded to that
    dtype (the module docstring). ``supports(...)`` must hold."""
    (mp, k), n2, cfg = xp.shape, w.shape[0], config
    if not supports(mp, n2, k, cfg):
        raise ValueError(f"silu_gate_matmul: 2I={n2}, K={k}, Mp={mp} do not tile by {cfg}")
    bn, bk, per_cta = cfg.block_n, cfg.block_k, cfg.per_cta
    n = n2 // 2
    units, steps = n // bn, k // bk
    ctas = -(-units // per_cta)
    dtype = xp.dtype
    via_smem = interpret or not cfg.a_in_registers
    bits = cfg.int8_f16_bits
    pdl = cfg.pdl and not interpret   # (the interpreter runs kernels one at a time)
    row = plgpu.Layout.WGMMA.reduce(1)   # a [64] vector over the accumulator's rows

    def zero() -> jax.Array:
        return plgpu.layout_cast(jnp.zeros((bn, mp), jnp.float32), plgpu.Layout.WGMMA)

    def kernel(x_gmem, w_gmem, s_gmem, o_gmem):
        c = lax.axis_index("c")

        def scoped(o_smem, s_smem, s_bar, *a_smem):
            if pdl:   # nothing this kernel reads may be loaded before the kernels ahead finish
                plgpu.griddepcontrol_wait()
            for j in range(per_cta):   # this CTA's units' scales (the ragged last CTA: clamped)
                t = jnp.minimum(c * per_cta + j, units - 1)
                for half in range(2):
                    plgpu.copy_gmem_to_smem(s_gmem.at[half, t], s_smem.at[j, half], s_bar.at[2 * j + half])
            for b in range(2 * per_cta):
                plgpu.barrier_wait(s_bar.at[b])

            def flush(g, u, j):   # unit j's products [bn, Mp] -> h -> its columns of the output
                t = c * per_cta + j
                sg = lax.broadcast_in_dim(plgpu.load(s_smem.at[j, 0], layout=row), (bn, mp), [0])
                su = lax.broadcast_in_dim(plgpu.load(s_smem.at[j, 1], layout=row), (bn, mp), [0])
                gate = (g * sg).astype(dtype).astype(jnp.float32)
                up = (u * su).astype(dtype).astype(jnp.float32)
                h = (gate / (1.0 + jnp.exp(-gate)) * up).astype(dtype)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the previous flush read o_smem
                o_smem.transpose((1, 0))[...] = plgpu.layout_cast(h, plgpu.Layout.WGMMA_TRANSPOSED)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[:, pl.ds(t * bn, bn)])

            def body(idx, g_smem, u_smem, x_smem, carry):
                i = idx[0]
                a = a_smem[0] if via_smem else None

                def product(tile):   # one weight tile's product with the x tile [bn, Mp]
                    return pl.run_scoped(
                        lambda acc: tile_product(acc, tile, x_smem, fp8=fp8, a_smem=a, int8_bits=bits),
                        plgpu.ACC((bn, mp), jnp.float32))

                def paired(acc_g, acc_u):   # both products in flight, then one wait
                    issue_product(acc_g, g_smem, x_smem, fp8=fp8, a_smem=a, int8_bits=bits)
                    issue_product(acc_u, u_smem, x_smem, fp8=fp8, a_smem=a, pending=True, int8_bits=bits)
                    return acc_g[...], acc_u[...]

                if cfg.paired_wait:
                    pg, pu = pl.run_scoped(paired, plgpu.ACC((bn, mp), jnp.float32),
                                           plgpu.ACC((bn, mp), jnp.float32))
                else:
                    pg, pu = product(g_smem), product(u_smem)
                g, u = carry[0] + pg, carry[1] + pu
                last = lax.rem(i, steps) == steps - 1
                pl.when(last)(lambda: flush(g, u, i // steps))
                return lax.cond(last, lambda gu: (zero(), zero()), lambda gu: gu, (g, u))

            count = (per_cta if units % per_cta == 0
                     else jnp.minimum(per_cta, units - c * per_cta))   # the last CTA may own fewer

            def w_spec(half: int) -> plgpu.BlockSpec:
                return plgpu.BlockSpec(
                    (bn, bk), lambda s: (half * units + c * per_cta + s // steps, lax.rem(s, steps)),
                    transforms=smem_transforms(w.dtype, bk))

            x_spec = plgpu.BlockSpec((mp, bk), lambda s: (0, lax.rem(s, steps)),
                                     transforms=smem_transforms(dtype, bk))
            plgpu.emit_pipeline(body, grid=(count * steps,), in_specs=[w_spec(0), w_spec(1), x_spec],
                                max_concurrent_steps=cfg.stages, init_carry=(zero(), zero()),
                                )(w_gmem, w_gmem, x_gmem)
            if pdl:
                plgpu.griddepcontrol_launch_dependents()
            plgpu.wait_smem_to_gmem(0, wait_read_only=cfg.exit_read_only)

        scratch = [plgpu.SMEM((mp, bn), dtype, transforms=smem_transforms(dtype, bn)),
                   plgpu.SMEM((per_cta, 2, bn), jnp.float32),
                   plgpu.Barrier(num_barriers=2 * per_cta)]
        if via_smem:
            scratch.append(a_tile(bn, bk, dtype))
        pl.run_scoped(scoped, *scratch)

    f = persistent_kernel(kernel, jax.ShapeDtypeStruct((mp, n), dtype), ctas, f"quant_silu_gate_{n2}x{k}",
                          interpret)
    return f(xp, w, w_scale.reshape(2, units, bn))
