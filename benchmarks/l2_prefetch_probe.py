"""Does the decode matmul's L2 prefetch of the next weight pay, and where does its time go?

A diagnostic of ``pallas_kernels/quant_matmul/l2_prefetch.py`` on the device clock
(``device_clock.read_trace``). One jit chains, per iteration: matmul A (x @ wa^T, asking L2 for
up to ``budget`` bytes of wb), ``--filler`` small kernels (elementwise ops kept apart by
optimization barriers: the norms / RoPE / attention between two projections of a step), then
matmul B (its x from A's output, asking L2 for wa's next copy). Printed per budget: A's and B's
median device durations and the iteration's device busy time. Readings: B faster and A unchanged:
the prefetch loads on after A exits (the lever works); A slower by B's saving: A's CTAs wait
for their prefetches; neither moves: the lines are not hit (evicted, or the hint dropped), or
B is not bound by its reads (``--same``: B reads the weight A just read, from L2)::

    PYTHONPATH=. python3 benchmarks/l2_prefetch_probe.py --a 4096x14336 --b 6144x4096 \
        --budgets 0,8,24 --filler 0,6
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.device_clock import read_trace
from pallas_kernels.quant_matmul import mgpu


def chain(m: int, budget: int, filler: int, iters: int, same: bool = False):
    def loop(x, was, sas, wbs, sbs):
        for i in range(iters):
            wa, sa, wb, sb = was[i % 2], sas[i % 2], wbs[i % 2], sbs[i % 2]
            if same:   # B reads the weight A just read (L2-resident when it fits)
                wb, sb = wa, sa
            ya = mgpu.quant_matmul(x, wa, sa, prefetch=wb, prefetch_bytes=budget)
            h = ya[:, :wb.shape[1]]
            for _ in range(filler):
                h = jax.lax.optimization_barrier(jnp.tanh(h) * 1.001)
            yb = mgpu.quant_matmul(h, wb, sb, prefetch=was[(i + 1) % 2], prefetch_bytes=budget)
            x = (yb[:, :1] * 1e-6).astype(x.dtype) + x
        return x
    return jax.jit(loop)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", default="4096x14336", help="matmul A's weight NxK (the 8B's down)")
    ap.add_argument("--b", default="6144x4096", help="matmul B's weight NxK (the 8B's qkv)")
    ap.add_argument("--m", type=int, default=1, help="tokens")
    ap.add_argument("--budgets", default="0,8,24", help="comma list of prefetch budgets, MiB")
    ap.add_argument("--filler", default="0,6", help="comma list of small-kernel counts between A and B")
    ap.add_argument("--same", action="store_true",
                    help="B reads A's weight (A's shape): B's time with its weight in L2")
    ap.add_argument("--iters", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--trace-dir", default="/tmp/l2_prefetch_probe")
    ns = ap.parse_args()
    (na, ka), (nb, kb) = (tuple(int(v) for v in s.split("x")) for s in (ns.a, ns.b))
    rng = np.random.default_rng(0)

    def weights(n, k):   # two copies: each iteration's A and B read what the last did not
        return ([jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8) for _ in range(2)],
                [jnp.ones((n,), jnp.float32) * 1e-3 for _ in range(2)])

    was, sas = weights(na, ka)
    wbs, sbs = weights(nb, kb)
    x = jnp.asarray(rng.standard_normal((ns.m, ka)), jnp.bfloat16)
    print(f"## L2 prefetch probe ({jax.devices()[0].device_kind}): A [{na}, {ka}] "
          f"{na * ka / 1e6:.0f} MB, B [{nb}, {kb}] {nb * kb / 1e6:.0f} MB, M = {ns.m}")
    print("| filler kernels | budget MiB | A us | B us | device busy us per iteration "
          "| kernels per iteration |")
    print("|---|---|---|---|---|---|")
    for filler in (int(f) for f in ns.filler.split(",")):
        for budget in (int(b) for b in ns.budgets.split(",")):
            fn = chain(ns.m, budget << 20, filler, ns.iters, ns.same)
            jax.block_until_ready(fn(x, was, sas, wbs, sbs))
            out = f"{ns.trace_dir}/f{filler}_b{budget}"
            jax.profiler.start_trace(out, create_perfetto_trace=True)
            try:
                for _ in range(ns.reps):
                    jax.block_until_ready(fn(x, was, sas, wbs, sbs))
            finally:
                jax.profiler.stop_trace()
            kernels = read_trace(out).kernels
            # The matmuls, in order A, B, A, B, ...: the heaviest name's events when it holds both
            # (one Mosaic name), else the two heaviest names' events merged by start.
            by_name: dict[str, list[tuple[float, float]]] = {}
            for ts, dur, name in kernels:
                by_name.setdefault(name, []).append((ts, dur))
            names = sorted(by_name, key=lambda n: -sum(d for _, d in by_name[n]))
            calls = ns.iters * ns.reps
            mm = by_name[names[0]]
            if len(mm) < 2 * calls and len(names) > 1:
                mm = sorted(mm + by_name[names[1]])
            a_us = statistics.median(d for _, d in mm[0::2])
            b_us = statistics.median(d for _, d in mm[1::2])
            busy = sum(d for _, d, _ in kernels) / calls
            print(f"| {filler} | {budget} | {a_us:.1f} | {b_us:.1f} | {busy:.1f} | "
                  f"{len(kernels) / calls:.1f} |", flush=True)

if __name__ == "__main__":
    main()
