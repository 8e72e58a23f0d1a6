"""The decode ring's cost split into a fixed part and a marginal read, beside XLA's row sum and
an empty Mosaic GPU kernel, on the device clock.

Where it sits: beside benchmarks/claim_stream.py (session 55, H100: the bare TMA ring of the
decode kernel reads [14336, 4096] int8 at 81% of the 2 GiB read ceiling whether CTAs own
static shares or claim units from a counter; XLA's row sum 90%; the kernel 77%). If balance is
not the loss, the ring's cost is a fixed part and a marginal rate, and this script measures both:

  empty    a Mosaic GPU kernel of the ring's grid that allocates ``--smem`` KB of SMEM per CTA
           and exits: the launch and teardown of a grid like the ring's.
  ring     decode_stream's static ring (64 x 256 int8 tiles, 4 stages, 2 CTAs per SM; or each
           of ``--rings``) over [N, 4096] for each N of ``--rows``.
  row sum  XLA reading the same weights (int32 row sums).
  plain    (``--direct``) the ring's tiles on its grid without TMA: 16-byte loads straight into
           registers, 1-2 tiles ahead in a loop's carry (``direct``; no SMEM, no barriers).
  short    the same ring on grids of short CTAs (``--short``: 1-4 steps each, all their loads
           in flight at once, many CTAs to an SM), the shape of XLA's row sum (a Triton kernel
           of 3,584 programs, 4 rows of 4 KB each, 8 warps, no pipeline).

A least-squares line over the sizes gives each reader's fixed us and marginal GB/s (and that as
a share of the 2 GiB read ceiling). Each reader's fixed cost includes writing its output, every
CTA's last tile at its end (4.3 MB for 264 CTAs of 64 x 256: ~1.4-1.7 us on an H100, session 56).

    PYTHONPATH=. python3 benchmarks/ring_cost.py [--rows 3584,7168,14336,28672,57344]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, vector
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.decode_stream import stream
from benchmarks.device_clock import add_clock_arguments, clock_and_ceiling, weight_copies
from pallas_kernels.quant_matmul import mgpu_decode


def empty(tag: jax.Array, *, ctas: int, smem_kb: int) -> jax.Array:
    """tag int32[ctas] -> int32[ctas * 128]: a kernel of ``ctas`` CTAs, ``smem_kb`` KB of SMEM
    each (0: none), whose CTAs each store 128 copies of their index (the tag is only chained)."""
    def body(tag_gmem, o_gmem, buf, *scratch):
        del scratch, tag_gmem
        c = lax.axis_index("c")
        buf[...] = jnp.full((128,), c, jnp.int32)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buf, o_gmem.at[pl.ds(c * 128, 128)])
        plgpu.wait_smem_to_gmem(0)

    scratch = [plgpu.SMEM((128,), jnp.int32)]
    if smem_kb:
        scratch.append(plgpu.SMEM((smem_kb * 1024,), jnp.int8))
    f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((ctas * 128,), jnp.int32), scratch_types=scratch,
                     grid=(ctas,), grid_names=("c",),
                     compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return f(tag)


def direct(w: jax.Array, tag: jax.Array, *, ctas: int, depth: int, bn: int = 64, bk: int = 256) -> jax.Array:
    """The ring's work without TMA: w int8 [N, K], tag int32[ctas] -> int8 [ctas * bn, bk]. CTA c
    reads the same balanced share of [bn, bk] tiles as ``stream``, each tile with plain 16-byte
    loads straight into registers (rows contiguous across a warp), ``depth`` tiles ahead in the
    loop's carry, and xors the tiles together so the loads are used."""
    n, k = w.shape
    blocks, total = k // bk, (n // bn) * (k // bk)
    per = -(-total // ctas)
    layout = plgpu.Layout.WG_STRIDED((bn, bk), vec_size=16)

    # (plgpu.load of a GMEM tile in this layout emits one ld.global.b8 per byte in 0.11.2)
    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),),
                       return_type=plgpu.ShapeDtypeStruct((bn, bk), jnp.int8, layout=layout))
    def load16(ctx, ref):   # a [bn, bk] int8 tile of w -> registers, one ld.global.v4 per 16 bytes
        del ctx
        i8, i32 = ir.IntegerType.get_signless(8), ir.IntegerType.get_signless(32)
        frag = mgpu.WGStridedFragLayout(shape=(bn, bk), vec_size=16)
        base = mgpu_utils.memref_ptr(ref)
        regs = []
        for idx in frag.linear_thread_idxs():   # the thread's element offsets in the tile, row-major
            row = arith.divui(idx, mgpu_utils.c(bk, idx.type))
            col = arith.remui(idx, mgpu_utils.c(bk, idx.type))
            off = arith.index_cast(ir.IntegerType.get_signless(64),
                                   arith.addi(arith.muli(row, mgpu_utils.c(k, idx.type)), col))
            ptr = mgpu_utils.getelementptr(base, [off], i8)
            words = mgpu_utils.inline_ptx("ld.global.v4.b32 {$0, $1, $2, $3}, [$4];", ptr,
                                          result_types=[i32] * 4)
            vec = vector.from_elements(ir.VectorType.get((4,), i32), list(words))
            regs.append(vector.bitcast(ir.VectorType.get((16,), i8), vec))
        return mgpu.FragmentedArray(_registers=np.array(regs), _layout=frag, _is_signed=True)

    def kernel(w_gmem, tag_gmem, o_gmem, o_smem):
        del tag_gmem
        c = lax.axis_index("c")
        count = jnp.minimum(per, total - c * per)

        def tile(i):   # the CTA's tile i (past its last: the last again, an L2 hit)
            g = c * per + jnp.minimum(i, count - 1)
            rows, cols = pl.ds((g // blocks) * bn, bn), pl.ds(lax.rem(g, blocks) * bk, bk)
            return load16(w_gmem.at[rows, cols])

        def step(i, carry):
            ahead, total_ = carry
            return (*ahead[1:], tile(i + depth)), total_ ^ ahead[0]

        ahead = tuple(tile(jnp.asarray(d, jnp.int32)) for d in range(depth))
        zero = plgpu.layout_cast(jnp.zeros((bn, bk), jnp.int8), layout)
        _, acc = lax.fori_loop(0, count, step, (ahead, zero))
        o_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(c * bn, bn), :])
        plgpu.wait_smem_to_gmem(0)

    f = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((ctas * bn, bk), w.dtype),
                     scratch_types=[plgpu.SMEM((bn, bk), w.dtype)], grid=(ctas,), grid_names=("c",),
                     compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return f(w, tag)


def direct_want(w: jax.Array, ctas: int, bn: int = 64, bk: int = 256) -> jax.Array:
    """What ``direct`` returns: each CTA's tiles xor-ed together, [ctas * bn, bk]."""
    n, k = w.shape
    tiles = w.reshape(n // bn, bn, k // bk, bk).transpose(0, 2, 1, 3).reshape(-1, bn, bk)
    per = -(-tiles.shape[0] // ctas)
    tiles = jnp.pad(tiles, ((0, ctas * per - tiles.shape[0]), (0, 0), (0, 0))).reshape(ctas, per, bn, bk)
    return functools.reduce(jnp.bitwise_xor, [tiles[:, i] for i in range(per)]).reshape(ctas * bn, bk)


def fit(sizes: list[int], us: list[float]) -> tuple[float, float]:
    """Least squares us = fixed + bytes / rate -> (fixed us, marginal GB/s)."""
    slope, fixed = np.polyfit(np.asarray(sizes, float), np.asarray(us, float), 1)
    return float(fixed), float(1e-3 / slope)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="3584,7168,14336,28672,57344", help="comma list of N (K = 4096)")
    ap.add_argument("--smem", default="0,100", help="comma list of SMEM KB per CTA of the empty kernel")
    ap.add_argument("--rings", default="64x256x4",
                    help="comma list of ROWSxCOLSxSTAGES: the persistent rings (2 CTAs per SM) to fit; "
                         "a trailing 's' (64x256x4s): the sweeping order (decode_stream.stream's sweep)")
    ap.add_argument("--direct", default="", help="comma list of depths: plain-load readers to fit")
    ap.add_argument("--short", default="1792x2,3584x1,896x4",
                    help="comma list of CTAsxSTAGES: rings of 1-4 steps per CTA at N = 14336")
    add_clock_arguments(ap, "/tmp/ring_cost_trace")
    ns = ap.parse_args()
    k, ctas = 4096, 2 * mgpu_decode.sm_count()
    kclock, ceiling = clock_and_ceiling(ns)
    x = jnp.zeros((8, k), jnp.bfloat16)
    queued = []
    for kb in (int(v) for v in ns.smem.split(",")):
        def fn(x, _w, kb=kb):
            out = empty(jnp.zeros((ctas,), jnp.int32) + x[0, 0].astype(jnp.int32), ctas=ctas, smem_kb=kb)
            return jnp.broadcast_to(out[:1, None].astype(x.dtype), (x.shape[0], 1))
        got = kclock.later(fn, x, [(None,)], ns.iters, ns.reps)
        queued.append(("empty", f"{ctas} CTAs, {kb} KB SMEM", 0, got))
    for n in (int(v) for v in ns.rows.split(",")):
        copies = weight_copies(n, k, quantized=False)

        def ring(x, w, bn, bk, stages, sweep):
            tag = jnp.zeros((ctas,), jnp.int32) + x[0, 0].astype(jnp.int32)
            out = stream(w, tag, bn=bn, bk=bk, stages=stages, ctas=ctas, sweep=sweep)
            return jnp.broadcast_to(out[:1, :1].astype(x.dtype), (x.shape[0], 1))

        def row_sum(x, w):
            total = jnp.sum(w.astype(jnp.int32) + x[0, 0].astype(jnp.int32), axis=1)
            return jnp.broadcast_to(total[:1, None].astype(x.dtype), (x.shape[0], 1))

        def plain(x, w, depth):
            tag = jnp.zeros((ctas,), jnp.int32) + x[0, 0].astype(jnp.int32)
            out = direct(w, tag, ctas=ctas, depth=depth)
            return jnp.broadcast_to(out[:1, :1].astype(x.dtype), (x.shape[0], 1))

        readers = [(f"ring {bn} x {bk}, {stages} stages{', sweeping' if v.endswith('s') else ''}"
                    if ns.rings != "64x256x4" else "ring",
                    functools.partial(ring, bn=bn, bk=bk, stages=stages, sweep=v.endswith("s")))
                   for v in ns.rings.split(",")
                   for bn, bk, stages in [(int(a) for a in v.rstrip("s").split("x"))]]
        for depth in (int(v) for v in ns.direct.split(",") if v):
            if n == int(ns.rows.split(",")[0]):   # the tiles it read, checked once
                read = jax.jit(functools.partial(direct, ctas=ctas, depth=depth))
                got = read(copies[0][0], jnp.zeros((ctas,), jnp.int32))
                ok = bool(jnp.array_equal(got, direct_want(copies[0][0], ctas)))
                print(f"plain loads, {depth} ahead: {'the tiles check' if ok else 'WRONG TILES'}", flush=True)
            readers.append((f"plain loads, {depth} tiles ahead", functools.partial(plain, depth=depth)))
        for name, fn in [*readers, ("row sum", row_sum)]:
            queued.append((name, f"[{n}, {k}]", n * k, kclock.later(fn, x, copies, ns.iters, ns.reps)))
        if n == 14336:   # short CTAs that the hardware schedules, many to an SM (as XLA's row sum)
            shorts = (v.split("x") for v in ns.short.split(",") if v)
            for grid, stages in ((int(a), int(b)) for a, b in shorts):
                def short(x, w, grid=grid, stages=stages):
                    tag = jnp.zeros((grid,), jnp.int32) + x[0, 0].astype(jnp.int32)
                    out = stream(w, tag, bn=64, bk=256, stages=stages, ctas=grid)
                    return jnp.broadcast_to(out[:1, :1].astype(x.dtype), (x.shape[0], 1))
                got = kclock.later(short, x, copies, ns.iters, ns.reps)
                queued.append((f"short ring: {grid} CTAs, {stages} stages", f"[{n}, {k}]", -n * k, got))
        del copies
    stats = kclock.device.flush() if kclock.device else {}
    print(f"## the decode ring's fixed cost, {jax.devices()[0].device_kind}, "
          f"read ceiling {ceiling:.0f} GB/s\n")
    print("| reader | what | MB | us | GB/s | of the ceiling |\n|---|---|---|---|---|---|")
    series: dict[str, tuple[list[int], list[float]]] = {}
    for name, what, nbytes, got in queued:   # (nbytes < 0: a row left out of the fit)
        us = stats[got].median_us if isinstance(got, str) else got
        gbs = abs(nbytes) / us / 1e3
        print(f"| {name} | {what} | {abs(nbytes) / 1e6:.1f} | {us:.2f} | {gbs:.0f} | {gbs / ceiling:.0%} |")
        if nbytes > 0:
            series.setdefault(name, ([], []))[0].append(nbytes)
            series[name][1].append(us)
    print("\n| reader | fixed us | marginal GB/s | of the ceiling |\n|---|---|---|---|")
    for name, (sizes, us) in series.items():
        fixed, rate = fit(sizes, us)
        print(f"| {name} | {fixed:.2f} | {rate:.0f} | {rate / ceiling:.0%} |")


if __name__ == "__main__":
    main()
