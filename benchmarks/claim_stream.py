"""Does claiming work units from a counter end the decode ring's tail? The bare weight ring of
the persistent decode kernel, static against claimed shares, on the device clock.

Where it sits: beside benchmarks/decode_stream.py (whose ``stream`` is the static ring) and
benchmarks/cta_timeline.py (session 54, H100: the decode kernel's steady steps read at the HBM
ceiling, and its loss is at the ends: CTAs with the same bytes end 5-7 us apart). A persistent
CTA owns a fixed share of the (tile, K block) units; this script asks whether a CTA that takes
its next unit from a global counter as it goes (a fetch-and-add) ends the call with the others.

  static   decode_stream's ring: CTA c streams units [c * per, (c + 1) * per) through an
           ``emit_pipeline`` TMA ring with a body that only waits for each tile.
  claimed  a hand-written TMA ring of the same tiles and depth whose length is not known when
           it starts: CTA c streams unit c, then each unit the counter gives it (ctas + the
           counter's old value) until the units run out. One thread of the warpgroup does the
           fetch-and-add (``atom.global.add``, through ``plgpu.inline_mgpu``: Pallas Mosaic GPU
           0.11.2 exposes only reducing atomics) and hands the value on through SMEM; it waits
           for it where it claims (a unit early: the ring holds ``stages`` steps). The counter
           is a global semaphore, zeroed by Pallas before each call.

Each CTA copies its last tile out, so the loads are used. Rows: the weight read in GB/s and as a
share of the 2 GiB read ceiling, timed as decode_stream.py times its rows.

    PYTHONPATH=. python3 benchmarks/claim_stream.py [--shape 14336x4096] [--splits 8,16]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import memref
from jax._src.pallas.mosaic_gpu.core import batch_transform
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.decode_stream import stream
from benchmarks.device_clock import add_clock_arguments, clock_and_ceiling, weight_copies
from pallas_kernels.quant_matmul import mgpu_decode


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
def _fetch_add(ctx, counter, out) -> None:
    """counter: a GMEM int32 (a semaphore); out: SMEM int32[1] <- the counter's value before one
    thread of the warpgroup added 1 to it, visible to the warpgroup on return."""
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    one = mgpu_utils.single_thread_predicate(mgpu_utils.ThreadSubset.WARPGROUP)
    with mgpu_utils.when(one):
        old = mgpu_utils.inline_ptx("atom.relaxed.gpu.global.add.u32 $0, [$1], $2;",
                                    mgpu_utils.memref_ptr(counter), mgpu_utils.c(1, i32),
                                    result_types=i32, has_side_effects=True)
        memref.store(old, out, [mgpu_utils.c(0, ir.IndexType.get())])
    mgpu_utils.warpgroup_barrier()


def claimed_stream(w: jax.Array, tag: jax.Array, *, bn: int, bk: int, stages: int, ctas: int,
                   steps: int) -> tuple[jax.Array, jax.Array]:
    """w int8 [N, K], tag int32[ctas] (a per-call operand) -> (int8 [ctas * bn, bk]: each CTA's
    last tile, int32 [ctas]: the ring steps each CTA streamed; their sum is the weight's K blocks
    when every unit was streamed once). Units: ``bn`` rows x ``steps`` K blocks of ``bk`` (K /
    bk / steps parts per tile); CTA c streams unit c, then the units it claims."""
    n, k = w.shape
    split = k // bk // steps
    units = n // bn * split
    i32 = jnp.int32

    def kernel(w_gmem, tag_gmem, o_gmem, steps_gmem, ring, bars, got, steps_smem):
        del tag_gmem
        c = lax.axis_index("c")
        counter = pl.get_global(plgpu.SemaphoreType.REGULAR)

        def claim() -> jax.Array:
            _fetch_add(counter, got)
            return ctas + got[0]

        def produce(state):   # issue the next step's load, if any; claim past a unit's end
            unit, i, p, live = state
            tile, part = unit // split, lax.rem(unit, split)
            plgpu.copy_gmem_to_smem(w_gmem.at[pl.ds(tile * bn, bn), pl.ds((part * steps + i) * bk, bk)],
                                    ring.at[lax.rem(p, stages)], bars.at[lax.rem(p, stages)],
                                    predicate=live)
            i, p = i + 1, p + live.astype(i32)
            wrap = live & (i == steps)
            unit = lax.cond(wrap, claim, lambda: unit)
            return unit, jnp.where(wrap, 0, i), p, live & (~wrap | (unit < units))

        state = (c, jnp.asarray(0, i32), jnp.asarray(0, i32), c < units)
        state = lax.fori_loop(0, stages, lambda _, s: produce(s), state)

        def body(carry):
            j, state = carry
            plgpu.barrier_wait(bars.at[lax.rem(j, stages)])
            return j + 1, produce(state)

        j, _ = lax.while_loop(lambda carry: carry[0] < carry[1][2], body, (jnp.asarray(0, i32), state))

        @pl.when(j > 0)
        def _out():
            plgpu.copy_smem_to_gmem(ring.at[lax.rem(j - 1, stages)], o_gmem.at[pl.ds(c * bn, bn), :])
        steps_smem[...] = jnp.full((128,), j, i32)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(steps_smem, steps_gmem.at[pl.ds(c * 128, 128)])
        plgpu.wait_smem_to_gmem(0)

    f = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((ctas * bn, bk), w.dtype), jax.ShapeDtypeStruct((ctas * 128,), i32)),
        scratch_types=[plgpu.SMEM((stages, bn, bk), w.dtype,   # (the transforms as emit_pipeline's ring)
                                  transforms=tuple(batch_transform(t, 1)
                                                   for t in mgpu_decode.smem_transforms(w.dtype, bk))),
                       plgpu.Barrier(num_barriers=stages), plgpu.SMEM((1,), i32), plgpu.SMEM((128,), i32)],
        grid=(ctas,), grid_names=("c",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    out, done = f(w, tag)
    return out, done.reshape(ctas, 128)[:, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="14336x4096", help="the int8 weight's N x K")
    ap.add_argument("--splits", default="8,16", help="comma list: K parts per output tile")
    ap.add_argument("--bk", type=int, default=256, help="K columns per ring step")
    ap.add_argument("--stages", type=int, default=4, help="ring depth")
    ap.add_argument("--ctas", default="256,264", help="comma list of grid sizes")
    add_clock_arguments(ap, "/tmp/claim_stream_trace")
    ns = ap.parse_args()
    n, k = (int(v) for v in ns.shape.split("x"))
    kclock, ceiling = clock_and_ceiling(ns)
    copies = weight_copies(n, k, quantized=False)
    print(f"## bare decode ring, int8 [{n}, {k}] ({n * k / 1e6:.1f} MB), 64 x {ns.bk} tiles, "
          f"{ns.stages} stages, {jax.devices()[0].device_kind}, read ceiling {ceiling:.0f} GB/s\n")
    for split in (int(v) for v in ns.splits.split(",")):   # every unit streamed once, in each call
        tag = jnp.zeros((264,), jnp.int32)
        fn = jax.jit(lambda w, t, steps=k // ns.bk // split: claimed_stream(
            w, t, bn=64, bk=ns.bk, stages=ns.stages, ctas=264, steps=steps)[1])
        done = [int(fn(copies[0][0], tag).sum()) for _ in range(3)]
        print(f"split {split}: K blocks streamed per call {done} (the weight's: {n // 64 * (k // ns.bk)})",
              flush=True)
    rows = []
    for split in (int(v) for v in ns.splits.split(",")):
        steps = k // ns.bk // split
        for ctas in (int(v) for v in ns.ctas.split(",")):
            def tagged(ring, ctas=ctas, steps=steps):   # chained (no CSE): each call's tag
                def fn(x, w):
                    tag = jnp.zeros((ctas,), jnp.int32) + x[0, 0].astype(jnp.int32)
                    out = (stream(w, tag, bn=64, bk=ns.bk, stages=ns.stages, ctas=ctas) if ring == "static"
                           else claimed_stream(w, tag, bn=64, bk=ns.bk, stages=ns.stages, ctas=ctas,
                                               steps=steps)[0])
                    return jnp.broadcast_to(out[:1, :1].astype(x.dtype), (x.shape[0], 1))
                return fn
            for rnd in (1, 2):   # A/B/A/B
                for ring in ("static", "claimed"):
                    try:
                        got = kclock.later(tagged(ring), jnp.zeros((8, k), jnp.bfloat16), copies,
                                           ns.iters, ns.reps)
                    except Exception as e:  # noqa: BLE001 - a ring that fails to build is a result too
                        print(f"  {ring} split {split} {ctas} CTAs: error {e!r:.400}", flush=True)
                        continue
                    rows.append((ring, split, ctas, rnd, got))
    stats = kclock.device.flush() if kclock.device else {}
    print("| ring | split | CTAs | round | us | GB/s | of the read ceiling |\n|---|---|---|---|---|---|---|")
    for ring, split, ctas, rnd, got in rows:
        us = stats[got].median_us if isinstance(got, str) else got
        gbs = n * k / us / 1e3
        print(f"| {ring} | {split} | {ctas} | {rnd} | {us:.2f} | {gbs:.0f} | {gbs / ceiling:.0%} |")


if __name__ == "__main__":
    main()
