"""The decode matmul's timeline per CTA, on the device: when each CTA starts, when its first
tiles arrive, how far apart its steps run, and when it ends.

Where it sits: beside benchmarks/decode_stream.py, which times the same kernel on the device
clock. It answers what those microseconds are made of, which a kernel's duration cannot: the
launch's spread over the CTAs, the ring's fill, the steady steps (and the body's share of
each), the partials' stores, and the tail of CTAs ending apart. (Session 53, H100: the kernel
takes 24-26 us for 58.7 MB where XLA's row sum of the same weight takes 20.4.)

Mosaic GPU's on-device profiler records the kernel's named scopes per CTA
(``mgpu_decode.TRACE_SCOPES``, through ``decode_matmul_t``'s ``trace_dir``): a CTA's start on
the global timer (ns), every event after it in SM clock cycles, here converted at the SM clock
nvidia-smi reports while the kernel runs (or ``--sm-mhz``). The recording costs a shared-memory
store per event; the table's "kernel us" row is the traced kernel's own span, to read beside
decode_stream's untraced figure. The last of ``--calls`` calls is read (the others warm up).

    PYTHONPATH=. python3 benchmarks/cta_timeline.py --shape 14336x4096 --ms 16,1 \\
        --variants default,tile_runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.offline_ptx import variant_config
from pallas_kernels.quant_matmul import mgpu, mgpu_decode
from pallas_kernels.quant_matmul import reference as ref


def sm_clock_mhz(x: jax.Array, w: jax.Array, cfg: mgpu_decode.DecodeConfig, calls: int = 20000) -> float:
    """The SM clock nvidia-smi reports while the untraced kernel runs ``calls`` times in one
    program (~0.5 s at 25 us a call)."""
    def chain(x, w):   # (x depends on the sum so far: XLA cannot hoist the call out of the loop)
        def one(i, acc):
            xi = x.at[0, 0].add((acc * 0).astype(x.dtype))
            return acc + mgpu_decode.decode_matmul_t(xi, w, config=cfg, fp8=ref.FP8)[0, 0, 0]

        return jax.lax.fori_loop(0, calls, one, jnp.float32(0))

    pending = jax.jit(chain)(x, w)
    out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    jax.block_until_ready(pending)
    return float(out.split()[0])


def cta_events(trace: dict) -> dict[int, tuple[float, list[tuple[str, str, float]], int]]:
    """A profiler trace -> per CTA (its trace id): (start ns on the global timer, [(scope, "B" or
    "E", cycles after the start)], the SM it ran on). Each event's ``ts`` is (start ns +
    cycles) / 1e3, its ``pid`` 1 + the SM; the first event (the profiler's own "Init" scope, or
    the kernel's "start" where there is none) has 0 cycles."""
    by_cta: dict[int, list[dict]] = {}
    for e in trace["traceEvents"]:
        by_cta.setdefault(e["tid"], []).append(e)
    out = {}
    for tid, events in by_cta.items():
        start = events[0]["ts"] * 1e3
        out[tid] = (start, [(e["name"], e["ph"], e["ts"] * 1e3 - start) for e in events],
                    int(events[0]["pid"]) - 1)
    return out


def cta_figures(start: float, events: list, mhz: float) -> dict[str, float] | None:
    """One CTA's start (us on the global timer), first tile and end (us after its start), or
    None for a CTA with no step or no exit (a truncated trace)."""
    steps = [t for name, ph, t in events if name == "step" and ph == "B"]
    exits = [t for name, ph, t in events if name == "exit" and ph == "E"]
    if not steps or not exits:
        return None
    return {"start": start / 1e3, "first": steps[0] / mhz, "end": exits[-1] / mhz}


def summary(ctas: dict, mhz: float, step_bytes: int) -> dict[str, float]:
    """The kernel's timeline from ``cta_events``: microseconds at ``mhz``; ``step_bytes``: the
    weight bytes of one step (the steady rate is the weight's, as the read ceiling is)."""
    us = 1.0 / mhz   # cycles -> us
    starts, fills, ends, intervals, bodies, stores = [], [], [], [], [], []
    for start, events, _ in ctas.values():
        fig = cta_figures(start, events, mhz)
        if fig is None:
            continue
        steps_b = [t for name, ph, t in events if name == "step" and ph == "B"]
        steps_e = [t for name, ph, t in events if name == "step" and ph == "E"]
        store_b = [t for name, ph, t in events if name == "store" and ph == "B"]
        store_e = [t for name, ph, t in events if name == "store" and ph == "E"]
        starts.append(fig["start"])
        fills.append(fig["first"])
        ends.append(fig["start"] + fig["end"])
        if len(steps_b) > 1:
            intervals.append((steps_b[-1] - steps_b[0]) / (len(steps_b) - 1) * us)
        bodies += [(e - b) * us for b, e in zip(steps_b, steps_e, strict=False)]
        stores += [(e - b) * us for b, e in zip(store_b, store_e, strict=False)]
    t0 = min(starts)
    interval = statistics.median(intervals) if intervals else float("nan")
    return {
        "CTAs": len(starts),
        "kernel us (first start to last end)": max(ends) - t0,
        "start spread us": max(starts) - t0,
        "first tiles us (median / max)": (statistics.median(fills), max(fills)),
        "step interval us (median)": interval,
        "body us per step (median)": statistics.median(bodies),
        "store us (median)": statistics.median(stores) if stores else float("nan"),
        "steady weight GB/s (all CTAs at the median interval)": len(starts) * step_bytes / interval / 1e3,
        "end spread us (first to last CTA)": max(ends) - min(ends),
        "last CTA after the median's end us": max(ends) - statistics.median(ends),
    }


def by_sm(ctas: dict, mhz: float) -> dict[str, tuple[int, float, float, float]]:
    """Whether the CTAs that end late share something: per group (CTAs alone on their SM or
    sharing it; the earlier and later CTA of a shared SM by start; the first CTA ids, one per
    SM, and the rest (trace ids are 1 + the CTA's index); the latest and earliest quarter by
    first tile), (CTAs, median first tile us, median end us after the first start,
    latest end us)."""
    figs = {tid: (fig, sm) for tid, (start, events, sm) in ctas.items()
            if (fig := cta_figures(start, events, mhz)) is not None}
    t0 = min(f["start"] for f, _ in figs.values())
    per_sm: dict[int, list[int]] = {}
    for tid, (_, sm) in sorted(figs.items(), key=lambda kv: kv[1][0]["start"]):
        per_sm.setdefault(sm, []).append(tid)
    by_first = sorted(figs, key=lambda tid: figs[tid][0]["first"])
    quarter = max(1, len(by_first) // 4)
    groups = {
        "alone on its SM": [t[0] for t in per_sm.values() if len(t) == 1],
        "sharing its SM, started first": [t[0] for t in per_sm.values() if len(t) > 1],
        "sharing its SM, started later": [u for t in per_sm.values() if len(t) > 1 for u in t[1:]],
        f"the first {len(per_sm)} CTA ids (one per SM)": [t for t in figs if t <= len(per_sm)],
        "the later CTA ids": [t for t in figs if t > len(per_sm)],
        "earliest quarter by first tile": by_first[:quarter],
        "latest quarter by first tile": by_first[-quarter:],
    }
    out = {}
    for label, tids in groups.items():
        if tids:
            ends = [figs[t][0]["start"] + figs[t][0]["end"] - t0 for t in tids]
            out[label] = (len(tids), statistics.median(figs[t][0]["first"] for t in tids),
                          statistics.median(ends), max(ends))
    return out


def traced(x: jax.Array, w: jax.Array, cfg: mgpu_decode.DecodeConfig, calls: int) -> dict:
    """The last of ``calls`` traced calls of the decode kernel: its profiler trace."""
    with tempfile.TemporaryDirectory() as tmp:
        fn = jax.jit(lambda x, w: mgpu_decode.decode_matmul_t(x, w, config=cfg, fp8=ref.FP8, trace_dir=tmp))
        for _ in range(calls):
            jax.block_until_ready(fn(x, w))
        jax.effects_barrier()   # the traces are written by host callbacks
        newest = max(Path(tmp).glob("*trace.json"), key=lambda p: p.stat().st_mtime_ns)
        return json.loads(newest.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="14336x4096", help="the weight's N x K")
    ap.add_argument("--ms", default="16,1", help="comma list of token counts (<= 64)")
    ap.add_argument("--weights", default="int8", choices=("int8", "fp8"))
    ap.add_argument("--variants", default="default,tile_runs",
                    help="comma list: default, or DecodeConfig fields joined by + (offline_ptx's form)")
    ap.add_argument("--calls", type=int, default=5, help="traced calls per row; the last is read")
    ap.add_argument("--sm-mhz", type=float, default=None, help="the SM clock (default: nvidia-smi's)")
    ns = ap.parse_args()
    n, k = (int(v) for v in ns.shape.split("x"))
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
    if ns.weights == "fp8":
        w = jnp.asarray(rng.standard_normal((n, k)) * 0.1, ref.FP8)
    rows = {}
    for m in (int(v) for v in ns.ms.split(",")):
        mp = mgpu.padded_tokens(m)
        x = jnp.asarray(rng.standard_normal((mp, k)), jnp.bfloat16)
        base = mgpu.kernel_config(m, n, k)
        if not isinstance(base, mgpu_decode.DecodeConfig):
            raise SystemExit(f"M={m}, {ns.shape}: no persistent decode config")
        mhz = ns.sm_mhz or sm_clock_mhz(x, w, base)
        for variant in ns.variants.split(","):
            cfg = variant_config(base, variant)
            step_bytes = cfg.block_n * cfg.block_k * w.dtype.itemsize
            label = (f"M={m} {variant}: {cfg.block_n}x{cfg.block_k}, {cfg.stages} stages, split "
                     f"{cfg.split_k}, {cfg.ctas(n)} CTAs, {cfg.slots(n)} partials, SM {mhz:.0f} MHz")
            ctas = cta_events(traced(x, w, cfg, ns.calls))
            rows[label] = summary(ctas, mhz, step_bytes)
            print(label, rows[label], flush=True)
            print(f"### CTAs by SM and by first tile, {label}\n| group | CTAs | first tile us (median) | "
                  "end us (median) | end us (latest) |\n|---|---|---|---|---|")
            for group, (count, first, end, latest) in by_sm(ctas, mhz).items():
                print(f"| {group} | {count} | {first:.2f} | {end:.2f} | {latest:.2f} |", flush=True)
    weight_mb = n * k * w.dtype.itemsize / 1e6
    print(f"\n## decode kernel timeline per CTA, {ns.weights} weight [{n}, {k}] ({weight_mb:.1f} MB), "
          f"{jax.devices()[0].device_kind}")
    labels = list(rows)
    print("| figure | " + " | ".join(labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    for fig in next(iter(rows.values())):
        cells = [rows[lb][fig] for lb in labels]
        print(f"| {fig} | " + " | ".join(
            " / ".join(f"{v:.2f}" for v in c) if isinstance(c, tuple) else f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
