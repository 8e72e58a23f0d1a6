"""What caps the persistent quantized decode matmul: its TMA weight stream alone, against the
kernel, at the engine's decode sizes.

Where it sits: beside benchmarks/quant_matmul.py (which times the kernel against XLA). Timed
on the device (session 32, H200, 2 GiB int8 read 4.6 TB/s), the decode kernel
(pallas_kernels/quant_matmul/mgpu_decode.py) read the 8B's gate/up at 77-79% of that, its down
projection at 71-73% and its qkv at 54-57%, where XLA's bf16 GEMM of gate/up reached 93%.
This script separates the pipeline from the work in it:

  stream   (``rows``: the weight as the engine keeps it, [N, K]; ``tiled``: pre-tiled, each
           tile one contiguous block and each CTA's share one contiguous range) the same
           ``emit_pipeline`` ring over the same [block_n, block_k] int8 weight tiles
           (persistent CTAs, each a balanced share of the (tile, K block) work in K-major
           order), with a body that only waits for each tile (no register load, no conversion,
           no wgmma, no partial store); each CTA copies its last tile out so the loads are used.
           Its rate is the ceiling of any kernel built on this ring at that tile, depth and
           CTA count.
  kernel   ``mgpu.quant_matmul`` (int8 weights, bf16 x) at its default config and at every
           split of K for the default's tile (the split sets how many partial tiles each CTA
           stores: a unit of one K block stores after every step), 128-row tiles (one CTA
           per SM, or two at 256 columns), and deep rings on one CTA per SM at splits 1-2
           (``deep_rings``: split 1 needs no partial sum after the kernel).

Also in the same harness: XLA reading the same weight (a row sum) and XLA's bf16 GEMM of the
same shape at 16 tokens. Rows: the tile (block_n x block_k), ring depth, CTAs; the weight read in
GB/s. Timing as in quant_matmul.py (``timed``): ``--iters`` calls chained in one jit over
``--copies`` weight copies (the weight is not served from L2), median of ``--reps``; by default
(``--clock device``) each kernel's own duration on the device, from one profiler trace
(``device_clock.py``), against a 2 GiB int8 row-sum read timed the same way.

    PYTHONPATH=. python3 benchmarks/decode_stream.py [--shape 14336x4096] [--ms 1,16]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.device_clock import KernelClock, add_clock_arguments, read_ceiling
from benchmarks.offline_ptx import variant_config
from benchmarks.quant_matmul import ceilings, rel
from pallas_kernels.quant_matmul import mgpu, mgpu_decode
from pallas_kernels.quant_matmul import reference as ref


def pretile(w: jax.Array, bn: int, bk: int) -> jax.Array:
    """w [N, K] -> [N / bn * K / bk, bn, bk]: tile (t, kb) at index t * K / bk + kb, each tile
    one contiguous block and a CTA's share (consecutive units) one contiguous range."""
    n, k = w.shape
    return w.reshape(n // bn, bn, k // bk, bk).transpose(0, 2, 1, 3).reshape(-1, bn, bk)


def stream(w: jax.Array, tag: jax.Array, *, bn: int, bk: int, stages: int, ctas: int,
           swizzle: bool = True, sweep: bool = False, interpret: bool = False) -> jax.Array:
    """w int8 [N, K] (or ``pretile``'s [units, bn, bk]), tag int32[ctas] (a per-call operand,
    so that chained calls differ) -> int8 [ctas * bn, bk]: each CTA's last streamed tile (the
    loads' one use). ``swizzle=False``: plain TMA boxes (no SMEM tiling or swizzle, which the
    kernel's register loads need). ``sweep``: CTA c's step i reads unit i * ctas + c (K-major),
    so the CTAs in flight read one window of adjacent units that sweeps through the weight (as
    XLA's row sum's programs do), instead of each its own range."""
    tiled = w.ndim == 3
    n, k = (w.shape[0] * bn, bk) if tiled else w.shape   # (tiled: units of one K block each)
    blocks, total = k // bk, (n // bn) * (k // bk)
    per = -(-total // ctas)

    def kernel(w_gmem, tag_gmem, o_gmem):
        del tag_gmem
        c = lax.axis_index("c")
        count = (total - c + ctas - 1) // ctas if sweep else jnp.minimum(per, total - c * per)

        def body(idx, w_smem):
            @pl.when(idx[0] == count - 1)
            def _out():
                plgpu.copy_smem_to_gmem(w_smem.at[0] if tiled else w_smem,
                                        o_gmem.at[pl.ds(c * bn, bn), :])

        def block(i):
            g = i * ctas + c if sweep else c * per + i
            return (g, 0, 0) if tiled else (g // blocks, lax.rem(g, blocks))

        shape = (1, bn, bk) if tiled else (bn, bk)
        spec = plgpu.BlockSpec(shape, block,
                               transforms=mgpu_decode.smem_transforms(w.dtype, bk) if swizzle else ())
        plgpu.emit_pipeline(body, grid=(count,), in_specs=[spec], max_concurrent_steps=stages)(w_gmem)
        plgpu.wait_smem_to_gmem(0)

    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((ctas * bn, bk), w.dtype),
        grid=(ctas,), grid_names=("c",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    return f(w, tag)


def deep_rings(m: int, n: int, k: int, store_mn: bool, sms: int) -> list[mgpu_decode.DecodeConfig]:
    """One CTA per SM with a deep ring (the most bytes in flight per SM), at splits 1 and 2 (with
    split 1 no partial sum follows the kernel: the o and down projections' sums are kernels of
    their own in the engine's step, session 24) and at ``decode_config``'s own split."""
    mp, out = mgpu.padded_tokens(m), []
    for split, bk in ((1, 512), (2, 512), (1, 256)):
        stages = min(6, 200 * 1024 // ((64 + 2 * mp) * bk))
        if k % (bk * split):
            continue
        units = n // 64 * split
        cfg = mgpu_decode.DecodeConfig(64, bk, stages, split_k=split, per_cta=-(-units // min(sms, units)),
                                       store_mn=store_mn)
        if mgpu_decode.supports(mp, n, k, cfg):
            out.append(cfg)
    for bk in (512, 256):   # decode_config's own split for one CTA per SM, the ring as deep
        cfg = mgpu_decode.decode_config(n, k, block_k=bk, stages=min(6, 200 * 1024 // ((64 + 2 * mp) * bk)),
                                        ctas_per_sm=1, store_mn=store_mn)
        if mgpu_decode.supports(mp, n, k, cfg) and cfg not in out:
            out.append(cfg)
    return out


def checked_time(fn, x: jax.Array, weights: list, want: jax.Array, clock, iters: int, reps: int,
                 what: str) -> tuple[float, float | str] | None:
    """``fn(x, q, s)``'s relative error against ``want`` on the first weight copy, then its time
    over all of them: (err, us), or None (printed) where the config fails to build, which is a
    result too."""
    q, s = weights[0]
    try:
        err = rel(jnp.asarray(jax.jit(fn)(x, q, s), jnp.float32), jnp.asarray(want, jnp.float32))
        return err, clock(fn, x, weights, iters, reps)
    except Exception as e:  # noqa: BLE001
        print(f"  {what}: error {e!r:.300}", flush=True)
        return None


def config_label(cfg: mgpu_decode.DecodeConfig, n: int, int8_f16: bool = False) -> str:
    """A decode config's row label: tile, ring depth, split and CTAs (``int8_f16``: int8 weights
    meet an f16 x, and the label says how the weight is converted)."""
    convert = (", int8 f16 bits" if cfg.int8_f16_bits else ", Mosaic's convert") if int8_f16 else ""
    return (f"{cfg.block_n}x{cfg.block_k}, {cfg.stages} stages, split {cfg.split_k}, {cfg.ctas(n)} CTAs"
            + ", async" * cfg.async_acc + ", tile runs" * cfg.tile_runs + convert)


def variant_rows(x: jax.Array, copies: list, clock, add, iters: int, reps: int, variants: str) -> None:
    """The default and each variant of it (``offline_ptx.variant_config``'s form, e.g.
    ``per_cta=1``: the grid the hardware balances), in turn twice (A/B/A/B). Session 53 (H100)
    timed ``tile_runs`` this way (16 tokens at [14336, 4096]: 25.8 -> 24.2 us; the default since
    session 54), and x resident in SMEM (69% against its control's 70%, refuted)."""
    m, k = x.shape
    n = copies[0][0].shape[0]
    default = mgpu.kernel_config(m, n, k)
    if not isinstance(default, mgpu_decode.DecodeConfig):
        return
    cfgs = [variant_config(default, v) for v in variants.split(",") if v]
    want = ref.w8a16_matmul(x, *copies[0], out_dtype=jnp.float32)
    for cfg in [c for _ in range(2) for c in [default, *cfgs]]:
        if not mgpu_decode.supports(mgpu.padded_tokens(m), n, k, cfg):
            print(f"skipped (does not tile): {cfg}", flush=True)
            continue
        fn = lambda x, q, s, cfg=cfg: mgpu.quant_matmul(x, q, s, config=cfg)  # noqa: E731
        got = checked_time(fn, x, copies, want, clock, iters, reps, f"variant {cfg}")
        if got is not None:
            add(f"int8 weight, M={m} (rel err {got[0]:.1e})",
                config_label(cfg, n) + f", {cfg.per_cta} units per CTA, {cfg.slots(n)} partials", got[1])


def gated_rows(x: jax.Array, copies: list, clock, add, iters: int, reps: int) -> None:
    """The MLP's gate/up as one kernel with its SiLU gate (``gated.py``: N = 2I, units of 64 gate
    and 64 up rows, K unsplit) at its default ring, at 128-column tiles with 4 stages, at 8
    stages with two units per CTA (one CTA per SM: 112 on the 8B), and its ``paired_wait``
    variant, beside the default decode kernel followed by XLA's sum, scale and gate (the
    engine's path with ``SILU_GATE_ON_HOPPER`` off; its row's "all kernels" column holds both
    kernels)."""
    m, k = x.shape
    n = copies[0][0].shape[0]
    default = mgpu.silu_gate_config(m, n, k)
    if default is None:
        print(f"  gated M={m}: the config rule declines [{n}, {k}]", flush=True)
        return
    q, s = copies[0]
    want = ref.silu_gate(ref.w8a16_matmul(x, q, s))
    unfused = lambda x, q, s: ref.silu_gate(mgpu.quant_matmul(x, q, s))  # noqa: E731
    add(f"decode kernel + XLA's SiLU gate, M={m}", "the default", clock(unfused, x, copies, iters, reps))
    # (the third: two units per CTA on one CTA per SM, the ring twice as deep; then session 41's
    # A/B of the step's body: one wait for both tiles)
    for cfg in (default, dataclasses.replace(default, block_k=128, stages=4),
                dataclasses.replace(default, block_k=128, stages=8, per_cta=2 * default.per_cta),
                dataclasses.replace(default, paired_wait=True)):
        fn = lambda x, q, s, cfg=cfg: mgpu.quant_matmul_silu_gate(x, q, s, config=cfg)  # noqa: E731
        if (got := checked_time(fn, x, copies, want, clock, iters, reps, f"gated M={m} {cfg}")) is None:
            continue
        err, us = got
        add(f"gated kernel M={m} ({'default' if cfg == default else 'variant'}, rel err {err:.1e})",
            f"2 x {cfg.block_n}x{cfg.block_k}, {cfg.stages} stages, {-(-n // 128 // cfg.per_cta)} CTAs"
            + ", paired wait" * cfg.paired_wait, us)


def dtype_rows(x: jax.Array, copies: list, clock, add, iters: int, reps: int) -> None:
    """The conversion's share of the body: the default config and 128-column tiles at 4 stages
    (whose ring reads 10 points more, session 38, but whose body runs four times per 512
    columns) over int8 and e4m3 weights, with a bf16 x and an f16 x. e4m3 -> bf16 goes through
    f32 (two conversions per element and a pack); e4m3 -> f16 is one conversion per pair; int8
    -> f16 per element in Mosaic GPU's convert, so int8 with an f16 x runs each config both
    ways (``int8_f16_bits``: bit assembly, the default since session 46)."""
    m, k = x.shape
    n = copies[0][0].shape[0]
    default = mgpu.kernel_config(m, n, k)
    if not isinstance(default, mgpu_decode.DecodeConfig):
        return
    cfgs = [default, mgpu_decode.decode_config(n, k, block_k=128, stages=4, ctas_per_sm=2,
                                               store_mn=default.store_mn)]
    fp8 = []
    for q, s in copies:   # the same weights in e4m3 (dequantized, then quantized again)
        fp8.append(ref.quantize_weight(q.astype(jnp.float32) * s.astype(jnp.float32)[:, None], mgpu.FP8))
    for (wname, ws), xdt in itertools.product((("int8", copies), ("fp8", fp8)), (jnp.bfloat16, jnp.float16)):
        xs, xname = x.astype(xdt), jnp.dtype(xdt).name
        want = ref.w8a16_matmul(xs, *ws[0], out_dtype=jnp.float32)
        int8_f16 = (wname, xname) == ("int8", "float16")
        both = [dataclasses.replace(c, int8_f16_bits=b) for b in (False, True) for c in cfgs]
        for cfg in both if int8_f16 else cfgs:
            if not mgpu_decode.supports(mgpu.padded_tokens(m), n, k, cfg):
                continue
            fn = lambda x, q, s, cfg=cfg: mgpu.quant_matmul(x, q, s, config=cfg)  # noqa: E731
            got = checked_time(fn, xs, ws, want, clock, iters, reps, f"{wname} x {xname} {cfg}")
            if got is None:
                continue
            add(f"{wname} weight, {xname} x, M={m} (rel err {got[0]:.1e})", config_label(cfg, n, int8_f16),
                got[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="14336x4096", help="N x K of the weight")
    ap.add_argument("--ms", default="1,16")
    ap.add_argument("--copies", type=int, default=0, help="weight copies (0: >= 150 MB of them)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the stream rows (A/B/A/B)")
    ap.add_argument("--kernel-rounds", type=int, default=1, help="rounds of the kernel rows, in turn")
    ap.add_argument("--layouts", default="rows,tiled,rows+no swizzle",
                    help="stream layouts: rows, tiled, rows+no swizzle ('': no stream rows)")
    ap.add_argument("--kernels", default="mosaic",
                    help="kernel rows: mosaic (the default, every split of K, 128-row tiles, deep rings "
                         "on one CTA per SM), mosaic1 (the default only), gated (N = 2I: the gate/up "
                         "kernel with its SiLU gate beside the default kernel + XLA's gate), dtypes (int8 / "
                         "e4m3 weights with a bf16 / f16 x), variants (the default and --variants, A/B/A/B)")
    ap.add_argument("--variants", default="tile_runs=0",
                    help="comma list of the default's variants for --kernels variants (offline_ptx's "
                         "form: per_cta=1+stages=2, tile_runs=0)")
    add_clock_arguments(ap, "/tmp/decode_stream_trace")
    ns = ap.parse_args()
    kclock = KernelClock(ns.clock, ns.trace_dir)
    dclock, clock = kclock.device, kclock.later
    ns.layouts = ns.layouts.replace("+", ", ")
    n, k = (int(v) for v in ns.shape.split("x"))
    sms = mgpu_decode.sm_count()
    print("device:", jax.devices()[0].device_kind, "SMs:", sms, flush=True)
    ceilings(ns.reps)   # (a warm-up: the first reading after an idle spell ran up to 18% low)
    read_gbs, _ = ceilings(ns.reps)
    if dclock:   # the device's own time for a 2 GiB read: the ceiling the rows are read against
        read_gbs = read_ceiling(dclock, ns.reps)
    print(f"HBM read ceiling {read_gbs:.0f} GB/s", flush=True)
    key = jax.random.PRNGKey(0)
    copies = []
    ns.copies = ns.copies or max(2, -(-150_000_000 // (n * k)))   # >= 150 MB: not served from L2
    for c in range(ns.copies):
        wf = jax.random.normal(jax.random.fold_in(key, c), (n, k), jnp.float32) * 0.02
        copies.append(ref.quantize_weight(wf, jnp.int8))
        del wf
    nbytes = n * k
    rows: list[tuple[str, str, float, int]] = []

    def add(what: str, cfg: str, us: float | str, read: int = nbytes) -> None:   # read: weight bytes
        rows.append((what, cfg, us, read))
        if not isinstance(us, str):
            print(f"  {what} {cfg}: {us:.1f} us, {read / us / 1e3:.0f} GB/s", flush=True)

    printed = [0]

    def table(rows_: list, header: bool) -> None:
        """Print rows (a device-clock row's label resolved from the stats)."""
        stats = dclock.flush() if dclock else {}
        if header:
            print(f"\nint8 weight [{n}, {k}] ({nbytes / 1e6:.1f} MB), HBM read ceiling {read_gbs:.0f} GB/s"
                  + (f"; clock: the device (lanes {dclock.lanes})" if dclock else f"; clock: {ns.clock}"))
            print("| what | tile, ring, CTAs | us | GB/s | % of read ceiling | device: kernel, runs, "
                  "all kernels us per run |")
            print("|---|---|---|---|---|---|")
        for what, cfg, us, read in rows_:
            extra = ""
            if isinstance(us, str):
                st = stats[us]
                us, extra = st.median_us, f"{st.kernel}, {st.count}, {st.all_us:.1f}"
            gbs = read / us / 1e3
            print(f"| {what} | {cfg} | {us:.1f} | {gbs:.0f} | {100 * gbs / read_gbs:.0f}% | {extra} |",
                  flush=True)

    def section() -> None:   # the rows measured since the last section, printed now
        table(rows[printed[0]:], header=printed[0] == 0)
        printed[0] = len(rows)

    def xla_read(x, w, _s):   # the same chained harness around XLA reading the whole weight
        # (the chained x enters the sum, so no call is hoisted out of the chain or merged)
        total = jnp.sum(w.astype(jnp.int32) + x[0, 0].astype(jnp.int32), axis=1)
        return jnp.broadcast_to(total[:1, None].astype(x.dtype), (x.shape[0], 1))

    bf16 = [(jax.random.normal(jax.random.fold_in(key, 50 + c), (k, n), jnp.bfloat16),)
            for c in range(ns.copies)]
    for rnd in range(1, ns.rounds + 1):
        add(f"XLA's row sum of the weight, round {rnd}", "-",
            clock(xla_read, jnp.zeros((8, k), jnp.bfloat16), copies, ns.iters, ns.reps))
        us = clock(lambda x, w: x @ w, jnp.zeros((16, k), jnp.bfloat16), bf16, ns.iters, ns.reps)
        add(f"XLA's bf16 x[16, K] @ w[K, N], round {rnd}", "-", us, 2 * nbytes)
    section()
    del bf16
    # The ring alone: tile, depth and CTA count, over the [N, K] weight and over pre-tiled
    # copies (each tile, and each CTA's share, contiguous); each config once per round, the
    # rounds in turn (A/B/A/B: the spread between the rounds is the noise).
    configs = [(64, 128, 4, 2), (64, 128, 4, 4), (64, 256, 4, 2), (64, 512, 2, 2), (64, 512, 3, 2),
               (64, 512, 4, 1)]
    layouts = [v for v in ns.layouts.split(",") if v]
    for rnd, layout in itertools.product(range(1, ns.rounds + 1), layouts):
        for bn, bk, stages, per_sm in configs:
            ctas = per_sm * sms
            if layout.endswith("no swizzle") and bk > 256:   # (a TMA box dimension: <= 256)
                continue
            ws = ([(pretile(q, bn, bk), s) for q, s in copies] if layout == "tiled" else copies)

            def fn(x, w, _s, bn=bn, bk=bk, stages=stages, ctas=ctas, sw=layout != "rows, no swizzle"):
                tag = jnp.zeros((ctas,), jnp.int32) + x[0, 0].astype(jnp.int32)   # chained: no CSE
                out = stream(w, tag, bn=bn, bk=bk, stages=stages, ctas=ctas, swizzle=sw)
                return jnp.broadcast_to(out[:1, :1].astype(x.dtype), (x.shape[0], 1))
            try:
                us = clock(fn, jnp.zeros((8, k), jnp.bfloat16), ws, ns.iters, ns.reps)
            except Exception as e:  # noqa: BLE001 - a config that fails to build is a result too
                print(f"  stream {layout} {bn}x{bk} x{stages} {ctas}: error {e!r:.300}", flush=True)
                continue
            finally:
                del ws
            add(f"stream, {layout}, round {rnd}", f"{bn}x{bk}, {stages} stages, {ctas} CTAs", us)
        section()

    # The kernel: its default and every split of K for the default's tile.
    kernels = ns.kernels.split(",")
    for m in (int(v) for v in ns.ms.split(",") if v):
        x = jax.random.normal(jax.random.fold_in(key, 7 + m), (m, k), jnp.bfloat16)
        default = mgpu.kernel_config(m, n, k)
        cfgs = [default] if {"mosaic", "mosaic1"} & set(kernels) else []   # mosaic1: the default only
        if "mosaic" in kernels and isinstance(default, mgpu_decode.DecodeConfig):
            blocks = k // default.block_k
            for split in (s for s in (1, 2, 4, 8, 16) if blocks % s == 0 and s != default.split_k):
                units = n // default.block_n * split
                per = -(-units // min(2 * sms, units))
                cfgs.append(dataclasses.replace(default, split_k=split, per_cta=per))
            # 128-row tiles; then 64-row tiles in shorter steps, the ring deeper at 2 CTAs per SM
            # (192 KB in flight per SM at 16 tokens against the default's 2 x 2 x 48 KB; session
            # 38: the bare ring of 64 x 128 tiles at 4 stages read 10-12 points more than 64 x 512
            # at 2)
            for bn, bk, stages, per_sm in ((128, 512, 2, 1), (128, 256, 3, 1), (128, 256, 2, 2),
                                           (64, 256, 4, 2), (64, 128, 4, 2), (64, 128, 8, 2)):
                cfg = mgpu_decode.decode_config(n, k, block_n=bn, block_k=bk, stages=stages,
                                                ctas_per_sm=per_sm, store_mn=default.store_mn)
                if mgpu_decode.supports(mgpu.padded_tokens(m), n, k, cfg):
                    cfgs.append(cfg)
                    if stages >= 3 and per_sm == 2:   # session 41's accumulator across the steps
                        cfgs.append(dataclasses.replace(cfg, async_acc=True))
            cfgs += deep_rings(m, n, k, default.store_mn, sms)
        want = ref.w8a16_matmul(x, *copies[0], out_dtype=jnp.float32)
        for cfg in [c for _ in range(ns.kernel_rounds) for c in cfgs]:   # (rounds in turn)
            fn = lambda x, q, s, cfg=cfg: mgpu.quant_matmul(x, q, s, config=cfg)  # noqa: E731
            got = checked_time(fn, x, copies, want, clock, ns.iters, ns.reps, f"kernel M={m} {cfg}")
            if got is None:
                continue
            tag = "default" if cfg == default else "variant"
            add(f"kernel M={m} ({tag}, rel err {got[0]:.1e})", config_label(cfg, n), got[1])
        if "gated" in kernels:
            gated_rows(x, copies, clock, add, ns.iters, ns.reps)
        if "dtypes" in kernels:
            dtype_rows(x, copies, clock, add, ns.iters, ns.reps)
        if "variants" in kernels:
            variant_rows(x, copies, clock, add, ns.iters, ns.reps, ns.variants)
        section()


if __name__ == "__main__":
    main()
