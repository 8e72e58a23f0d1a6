"""The quantized decode matmul's fixed cost per call: its weight in L2 against from HBM.

Where it sits: beside ``pallas_kernels/quant_matmul/mgpu_decode.py`` (issue 13's batch-1 and
85%-of-HBM targets). On the device clock (``device_clock.DeviceClock``), per weight [N, 4096]
int8 at M = 1, 16 chained calls each: XLA's int8 row sum (the read rate a plain reduction gets)
and the decode kernel (its default config), reading the same weight every call (L2 holds it
when it fits: 50 MB on an H100/H200) or eight copies in turn (from HBM). What a call costs with
its weight in L2 is its fixed cost: no prefetch or overlap of the weight's read removes it
(session 34: the L2 prefetch of the next weight, refuted)::

    PYTHONPATH=. python3 benchmarks/l2_resident.py --rows 2048,4096,6144,14336
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.device_clock import DeviceClock, chained
from pallas_kernels.quant_matmul import mgpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="2048,4096,6144,14336", help="comma list of N (K = 4096)")
    ap.add_argument("--copies", type=int, default=8, help="weights read in turn for the HBM column")
    ap.add_argument("--trace-dir", default="/tmp/l2_resident")
    ns = ap.parse_args()
    clock = DeviceClock(ns.trace_dir)
    rng = np.random.default_rng(0)
    print(f"## decode matmul, weight in L2 vs from HBM ({jax.devices()[0].device_kind}), M = 1, us per call")
    print("| weight | MB | XLA row sum, in L2 | from HBM | decode kernel, in L2 | from HBM |")
    print("|---|---|---|---|---|---|")
    for n in (int(v) for v in ns.rows.split(",")):
        ws = [jnp.asarray(rng.integers(-127, 128, (n, 4096)), jnp.int8) for _ in range(ns.copies)]
        s = jnp.ones((n,), jnp.float32)
        x = jnp.asarray(rng.standard_normal((1, 4096)), jnp.bfloat16)

        def row_sum(x, w):
            sums = jnp.sum(w.astype(jnp.int32), axis=1)[None, :].astype(jnp.float32)
            return sums * x[:, :1].astype(jnp.float32)

        def kernel(x, w, s=s):
            return mgpu.quant_matmul(x, w, s, out_dtype=jnp.float32)

        labels = [clock.run(f"{kind} {n} {where}", chained(f, 16), x, arg)
                  for kind, f in (("row sum", row_sum), ("kernel", kernel))
                  for where, arg in (("L2", [(ws[0],)]), ("HBM", [(w,) for w in ws]))]
        stats = clock.flush()
        us = [f"{stats[label].median_us:.2f}" for label in labels]
        print(f"| [{n}, 4096] | {n * 4096 / 1e6:.0f} | {' | '.join(us)} |", flush=True)


if __name__ == "__main__":
    main()
