"""Causal prefill attention: the Mosaic GPU kernel vs the Triton-lowered kernel vs cuDNN.

Llama-3.1-8B attention shape (32 q heads, 8 kv heads, d=128, bf16), one sequence of S tokens,
S = 2048 and 8192, plus S = 8192 packed as 4 segments of 2048 (cu_seqlens; cuDNN not run there).
All implementations run in the same process on the same inputs.

Timing: each op runs ``iters`` times inside one jitted, unrolled ``fori_loop`` whose iterations
depend on each other through a zero-weighted perturbation of q (XLA can neither hoist nor drop
them); median of ``reps`` timed calls, divided by ``iters``. FLOPs: 4 * S^2 * d * Hq / 2 for
one causal sequence (sum over segments when packed).

    PYTHONPATH=. python3 benchmarks/flash_mgpu.py [--check] [--quick] [--configs all]

Prints a markdown table (S, impl, config, us, TFLOP/s, rel err vs reference); writes
flash_mgpu.json under $OUT when set.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import loop_time, rel  # noqa: E402

from pallas_kernels.flash_attention import gpu as fa_gpu  # noqa: E402
from pallas_kernels.flash_attention import mgpu as fa_mgpu  # noqa: E402
from pallas_kernels.flash_attention import reference as fa_ref  # noqa: E402

HQ, HKV, D = 32, 8, 128
DT = jnp.bfloat16
SCALE = D**-0.5


def cudnn(q, k, v, cu=None):
    del cu
    out = jax.nn.dot_product_attention(
        q[None], k[None], v[None], scale=SCALE, is_causal=True, implementation="cudnn"
    )
    return out[0]


def mgpu_configs(which: str, packed: bool = False) -> list[fa_mgpu.FlashMgpuConfig]:
    """default: default_config; final: default_config and its persistent/non-persistent twin;
    all: the sweep."""
    c = fa_mgpu.FlashMgpuConfig
    base = fa_mgpu.default_config(8192, packed)
    if which == "default":
        return [base]
    if which == "final":
        return [base, c(pingpong=base.pingpong, persistent=not base.persistent)]
    return [
        c(pingpong=False),
        c(),
        c(pingpong=False, overlap=False),
        c(persistent=True, pingpong=False),
        c(persistent=True),
    ]


def cfg_str(c) -> str:
    if isinstance(c, fa_mgpu.FlashMgpuConfig):
        flags = "".join(
            f"/{n}" for n in ("pingpong", "overlap", "heavy_first", "persistent") if getattr(c, n)
        )
        return f"bkv{c.block_kv}/st{c.num_stages}{flags}"
    if isinstance(c, fa_gpu.FlashGpuConfig):
        return f"bq{c.block_q}/bk{c.block_k}/w{c.num_warps}/st{c.num_stages}"
    return str(c)


def check() -> None:
    """Quick correctness smoke test: GQA, a ragged token count, packed segments with NaN padding."""
    for tokens, cu in ((1000, None), (3000, [0, 5, 700, 701, 2100, 2900])):
        ks = jax.random.split(jax.random.key(tokens), 3)
        end = tokens if cu is None else cu[-1]
        live = (jnp.arange(tokens) < end)[:, None, None]
        q, k, v = (
            jnp.where(live, jax.random.normal(kk, (tokens, h, D), DT), jnp.nan)
            for kk, h in zip(ks, (HQ, HKV, HKV), strict=True)
        )
        cu_a = None if cu is None else jnp.asarray(cu, jnp.int32)
        want = fa_ref.flash_attention(q, k, v, cu_a, sm_scale=SCALE)
        for cfg in mgpu_configs("all", packed=cu is not None):
            try:
                fn = jax.jit(functools.partial(fa_mgpu.flash_attention, sm_scale=SCALE, config=cfg))
                got = fn(q, k, v, cu_a).astype(jnp.float32)
                msg = (
                    f"rel_err={rel(got[:end], want[:end]):.5f} finite={bool(jnp.isfinite(got).all())} "
                    f"pad_zero={bool((got[end:] == 0).all())}"
                )
            except Exception as e:  # noqa: BLE001 - report and go on
                msg = "error " + repr(e)[:400]
            print(f"check tokens={tokens} cu={cu} {cfg_str(cfg)}: {msg}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="correctness smoke test only")
    ap.add_argument("--quick", action="store_true", help="S=8192 only, default configs")
    ap.add_argument("--configs", default="all", choices=["all", "final", "default"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--sizes", default="2048,8192", help="comma-separated S values")
    ap.add_argument("--packed", type=int, default=4, help="also run the last S as this many segments (0: no)")
    args = ap.parse_args()
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
    if args.check:
        check()
        return
    rows = []
    sizes = [int(x) for x in args.sizes.split(",")]
    cases = [(s, None) for s in sizes] + ([(sizes[-1], args.packed)] if args.packed else [])
    if args.quick:
        cases = [(sizes[-1], None)]
    for s, nseg in cases:
        ks = jax.random.split(jax.random.key(s + (nseg or 0)), 3)
        q = jax.random.normal(ks[0], (s, HQ, D), DT)
        k = jax.random.normal(ks[1], (s, HKV, D), DT)
        v = jax.random.normal(ks[2], (s, HKV, D), DT)
        cu = None
        seg_lens = [s]
        if nseg:
            seg_lens = [s // nseg] * nseg
            cu = jnp.asarray([i * (s // nseg) for i in range(nseg + 1)], jnp.int32)
        flops = sum(4 * n * n * D * HQ / 2 for n in seg_lens)
        want = jax.jit(functools.partial(fa_ref.flash_attention, sm_scale=SCALE))(q, k, v, cu)
        tcfg = fa_gpu.default_config(s, DT)
        impls = [("triton", tcfg, functools.partial(fa_gpu.flash_attention, sm_scale=SCALE, config=tcfg))]
        if cu is None:
            impls.append(("cudnn", "jax.nn.dot_product_attention", cudnn))
        impls += [
            ("mgpu", c, functools.partial(fa_mgpu.flash_attention, sm_scale=SCALE, config=c))
            for c in mgpu_configs("default" if args.quick else args.configs, packed=cu is not None)
        ]
        label = f"{s}" if cu is None else f"{s} ({nseg}x{s // nseg} packed)"
        for name, cfg, fn in impls:
            try:
                err = rel(jax.jit(fn)(q, k, v, cu), want)
                t = loop_time(
                    lambda i, q, k, v, cu, fn=fn: fn(q, k, v, cu),
                    (q, k, v, cu),
                    iters=args.iters,
                    reps=args.reps,
                )
                r = dict(S=label, impl=name, config=cfg_str(cfg), us=round(t * 1e6, 1),
                         tflops=round(flops / t / 1e12, 1), rel_err=round(err, 5))  # fmt: skip
            except Exception as e:  # noqa: BLE001 - a config that fails is reported, not fatal
                r = dict(S=label, impl=name, config=cfg_str(cfg), error=repr(e)[:300])
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{dev.device_kind}, causal, 32 q / 8 kv heads, d=128, bf16\n")
    print("| S | impl | config | us | TFLOP/s | rel err |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['S']} | {r['impl']} | {r['config']} | error | | {r['error'][:80]} |")
        else:
            print(f"| {r['S']} | {r['impl']} | {r['config']} | {r['us']} | {r['tflops']} | {r['rel_err']} |")
    if out := os.environ.get("OUT"):
        with open(os.path.join(out, "flash_mgpu.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
