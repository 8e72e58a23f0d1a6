"""Where a step's device time goes: the GPU kernels of a profiler trace, grouped, per step.

Where it sits: reads the perfetto trace that ``step_floor.py --trace`` (or any benchmark)
records with ``create_perfetto_trace=True``, through ``device_clock.read_trace``. Prints, per
step (``--steps``: how many steps the trace holds): the kernels' summed device time, the span
from the first kernel's start to the last one's end, and the gaps (span minus busy: the device
idle between kernels, i.e. launch latency inside the graph and host waits); then the kernel
groups (by name pattern) and the heaviest kernels by total time. A batch-1 decode step is a
chain of short kernels, so the gaps and the per-kernel ramp are what its weight streaming
alone does not explain.

    python3 benchmarks/trace_kernels.py /tmp/trace/llama3.1-8b --steps 20
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

from benchmarks.device_clock import read_trace

GROUPS = (   # first match wins
    ("quantized matmul (Mosaic GPU)", r"mosaic"),
    ("quantized matmul (Triton)", r"quant_decode_triton"),
    ("GEMM (cuBLAS / XLA)", r"gemm|cublas|cutlass|sm90_xmma|nvjet|gemv|dot"),
    ("attention (Pallas)", r"attention|paged|rpa"),
    ("reductions", r"reduce"),
    ("fusions", r"fusion"),
    ("copies / memsets", r"copy|memset|memcpy"),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace_dir")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--sequence", type=int, default=0,
                    help="also list this many kernels in launch order from the second step's start "
                         "(name, us, the idle gap before it): one layer's chain")
    ns = ap.parse_args()
    tr = read_trace(ns.trace_dir)
    ks = tr.kernels
    if not ks:
        print("no GPU kernels in the trace; lanes:", tr.lanes)
        return
    busy = sum(d for _, d, _ in ks)
    span = max(t + d for t, d, _ in ks) - ks[0][0]
    per = 1e-3 / ns.steps
    print(f"## {ns.trace_dir}: {len(ks)} kernels, {len(ks) / ns.steps:.0f} per step")
    print("| per step | ms |\n|---|---|")
    print(f"| kernels' device time (busy) | {busy * per:.3f} |")
    print(f"| first start to last end (span) | {span * per:.3f} |")
    print(f"| gaps (span - busy) | {(span - busy) * per:.3f} |")
    gaps = [ks[i + 1][0] - (ks[i][0] + ks[i][1]) for i in range(len(ks) - 1)]
    small = [g for g in gaps if 0 <= g < 50]
    if small:
        small.sort()
        print(f"| gap between kernels < 50 us: median / p90 us | {small[len(small) // 2]:.2f} / "
              f"{small[int(len(small) * 0.9)]:.2f} |")
    groups: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    names: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for _, d, name in ks:
        g = next((label for label, pat in GROUPS if re.search(pat, name, re.I)), "other")
        groups[g][0] += 1
        groups[g][1] += d
        names[name[:70]][0] += 1
        names[name[:70]][1] += d
    print("\n| kernel group | per step | ms per step | us each |\n|---|---|---|---|")
    for g, (c, d) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"| {g} | {c / ns.steps:.0f} | {d * per:.3f} | {d / c:.1f} |")
    if ns.sequence:
        per_step = len(ks) // ns.steps
        first = per_step if len(ks) > per_step else 0
        print("\n| # | kernel (launch order, second step) | us | gap before, us |\n|---|---|---|---|")
        for i in range(first, min(len(ks), first + ns.sequence)):
            gap = ks[i][0] - (ks[i - 1][0] + ks[i - 1][1]) if i else 0.0
            print(f"| {i - first} | {ks[i][2][:70]} | {ks[i][1]:.1f} | {gap:.2f} |")
    print("\n| kernel | per step | ms per step | us each |\n|---|---|---|---|")
    for name, (c, d) in sorted(names.items(), key=lambda kv: -kv[1][1])[:ns.top]:
        print(f"| {name} | {c / ns.steps:.1f} | {d * per:.3f} | {d / c:.1f} |")


if __name__ == "__main__":
    main()
