"""Decode in the engine's bucketed shapes: a 16-token / 16-row decode bucket holding 1 to 16
live sequences (the rest padding), ragged paged attention kernel before vs after a change.

The kernel benchmark (kernels.py) times batch-1 decode at its exact shape (1 token, 1 row); the
engine pads a decode step to its smallest bucket, 16 tokens and 16 rows, so the kernel's static
choices see 16 rows whatever the live count. This script times that shape with the current
kernel and, when ``--before`` names a saved copy of an earlier ``gpu.py``, with that one in the
same run, interleaved over ``--rounds`` rounds (median). Prints a markdown table (us per call
inside an unrolled jitted loop, KV GB/s).

    PYTHONPATH=. python3 benchmarks/decode_buckets.py [--before .anchors/rpa_gpu_before.py]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import DT, HKV, HQ, PAGE, ROT, D, loop_time  # noqa: E402

from pallas_kernels.ragged_paged_attention import gpu as rpa_gpu  # noqa: E402
from pallas_kernels.ragged_paged_attention import reference as rpa_ref  # noqa: E402


def bucket_inputs(live: int, ctx: int, bucket: int, key: int):
    """``live`` decodes at context ``ctx`` in a ``bucket``-token, ``bucket``-row step."""
    pps = -(-ctx // PAGE)
    num_pages = 1 + ROT * live * pps
    ks = jax.random.split(jax.random.key(key), 3)
    kp = jax.random.normal(ks[0], (num_pages, PAGE, HKV, D), DT)
    vp = jax.random.normal(ks[1], (num_pages, PAGE, HKV, D), DT)
    perm = np.random.default_rng(key).permutation(np.arange(1, num_pages)).reshape(ROT, live, pps)
    pts = np.zeros((ROT, bucket, pps), np.int32)
    pts[:, :live] = perm
    seq_lens = np.zeros(bucket, np.int32)
    seq_lens[:live] = ctx
    qsl = np.full(bucket + 1, live, np.int32)
    qsl[: live + 1] = np.arange(live + 1)
    q = jax.random.normal(ks[2], (bucket, HQ, D), DT)
    meta = (jnp.asarray(pts), jnp.asarray(seq_lens), jnp.asarray(qsl), jnp.asarray([live], jnp.int32))
    return q, kp, vp, meta, 2 * live * ctx * HKV * D * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default=None, help="comma list of earlier gpu.py copies to time beside")
    ap.add_argument("--cases", default="1x8192,1x2048,4x4096,16x2048,1x8192@1",
                    help="LIVExCTX[@BUCKET] list (bucket: tokens = rows, default 16)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved before/after rounds (median)")
    ns = ap.parse_args()
    impls = {}
    for path in filter(None, (ns.before or "").split(",")):
        name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # its dataclasses look their module up
        spec.loader.exec_module(mod)
        impls[name] = mod
    impls["after"] = rpa_gpu
    rows = []
    for case in ns.cases.split(","):
        shape, _, bucket = case.partition("@")
        live, ctx = (int(x) for x in shape.split("x"))
        q, kp, vp, (pts, sl, qsl, nseq), kv_bytes = bucket_inputs(live, ctx, int(bucket or 16), live + ctx)
        want = rpa_ref.ragged_paged_attention(q, kp, vp, pts[0], sl, qsl, nseq, sm_scale=D**-0.5)
        times = {name: [] for name in impls}
        for _ in range(ns.rounds):  # A/B interleaved: the GPU's clocks drift between rounds
            for name, mod in impls.items():
                f = functools.partial(mod.ragged_paged_attention, sm_scale=D**-0.5)
                t = loop_time(lambda i, q, kp, vp, pts, sl, qsl, ns, f=f: f(q, kp, vp, pts[i], sl, qsl, ns),
                              (q, kp, vp, pts, sl, qsl, nseq), rotate=ROT)  # fmt: skip
                times[name].append(t)
        for name, mod in impls.items():
            f = functools.partial(mod.ragged_paged_attention, sm_scale=D**-0.5)
            got = jax.jit(f)(q, kp, vp, pts[0], sl, qsl, nseq)
            err = float(jnp.linalg.norm((got - want)[:live].astype(jnp.float32))
                        / jnp.linalg.norm(want[:live].astype(jnp.float32)))  # fmt: skip
            t = statistics.median(times[name])
            rows.append((case, name, t * 1e6, kv_bytes / t / 1e9, err))
    dev = jax.devices()[0]
    print(f"\n{getattr(dev, 'device_kind', str(dev))}: decode in a bucket of N tokens = N rows "
          f"(@N; default 16), Llama-8B attention shape\n")
    print("| live x context @ bucket | kernel | us | KV GB/s | rel err |\n|---|---|---|---|---|")
    for case, name, us, gbps, err in rows:
        print(f"| {case} | {name} | {us:.1f} | {gbps:.0f} | {err:.1e} |")


if __name__ == "__main__":
    main()
