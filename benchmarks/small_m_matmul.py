"""Dense small-M matmul: XLA's GEMM against the Mosaic GPU kernel, at a decode step's shapes.

x[M, K] @ w[layer, K, N] (bf16) for the four projections of Qwen2.5-0.5B and Llama-3.1-8B,
M in ``--ms``. Both paths read the layer from a stack of ``--layers`` layers, as the model does
(the kernel takes the whole stack and the layer index; XLA gets each layer as its own array, its
best case), and consecutive calls rotate over the layers so that the weight is not served from the 50 MB L2.
Columns: us per call (median of ``--reps``, ``--iters`` chained calls in one jit, as
``quant_matmul.py`` times them), the weight-read rate, and the kernel's speed-up; each kernel
result is checked against the reference first (relative error).

    PYTHONPATH=. python3 benchmarks/small_m_matmul.py [--ms 1,16] [--sweep]

``--sweep`` also times block_n / stages / split_k variants and prints the best per shape.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from benchmarks.quant_matmul import ceilings, rel, timed
from pallas_kernels.small_m_matmul import mgpu
from pallas_kernels.small_m_matmul import reference as ref

SHAPES = {   # name: (K, N) of the fused projections as jserve stacks them
    "qwen0.5b qkv": (896, 1280), "qwen0.5b o": (1024, 896),
    "qwen0.5b gate/up": (896, 9728), "qwen0.5b down": (4864, 896),
    "llama8b qkv": (4096, 6144), "llama8b o": (4096, 4096),
    "llama8b gate/up": (4096, 28672), "llama8b down": (14336, 4096),
}


def variants(m: int, n: int, k: int) -> list[mgpu.SmallMConfig]:
    base = mgpu.default_config(m, n, k)
    out = [base]
    for bn in (64, 128):
        for stages in (3, 4, 6):
            for split in sorted({1, 2, 4, 8, base.split_k}):
                cfg = dataclasses.replace(base, block_n=bn, stages=stages, split_k=split)
                if cfg not in out and n % bn == 0 and k % (cfg.block_k * split) == 0:
                    out.append(cfg)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ms", default="1,16")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--iters", type=int, default=24)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--sweep", action="store_true")
    a = p.parse_args()
    read_gbs, _ = ceilings(a.reps)
    print(f"## small-M dense matmul ({jax.devices()[0].device_kind}), HBM read ceiling "
          f"{read_gbs:.0f} GB/s, {a.layers} stacked layers")
    print("| shape | M | MB | XLA us | XLA TB/s | kernel us | kernel TB/s | speed-up | config | rel. err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in a.shapes.split(","):
        k, n = SHAPES[name]
        w = (jax.random.normal(jax.random.PRNGKey(0), (a.layers, k, n), jnp.float32) * 0.02
             ).astype(jnp.bfloat16)
        layers = [(w, jnp.array([i], jnp.int32)) for i in range(a.layers)]
        slices = [(w[i],) for i in range(a.layers)]   # XLA's best case: no slice in its GEMM
        mb = k * n * 2 / 1e6
        for m in (int(v) for v in a.ms.split(",")):
            x = (jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.float32)).astype(jnp.bfloat16)
            want = ref.small_m_matmul(x, w, layers[1][1])
            got = mgpu.small_m_matmul(x, w, layers[1][1])
            err = rel(got, want)
            t_xla = timed(lambda x, wi: x @ wi, x, slices, a.iters, a.reps)
            cfgs = variants(m, n, k) if a.sweep else [mgpu.default_config(m, n, k)]
            best = None
            for cfg in cfgs:
                try:
                    t = timed(lambda x, w, i, cfg=cfg: mgpu.small_m_matmul(x, w, i, config=cfg), x, layers,
                              a.iters, a.reps)
                except Exception as e:  # noqa: BLE001 - a variant that does not fit is skipped
                    print(f"  {name} M={m} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                if best is None or t < best[0]:
                    best = (t, cfg)
            if best is None:
                continue
            t_k, cfg = best
            print(f"| {name} | {m} | {mb:.1f} | {t_xla:.1f} | {mb / t_xla:.2f} | {t_k:.1f} | "
                  f"{mb / t_k:.2f} | {t_xla / t_k:.2f}x | bn {cfg.block_n} bk {cfg.block_k} "
                  f"st {cfg.stages} split {cfg.split_k} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
