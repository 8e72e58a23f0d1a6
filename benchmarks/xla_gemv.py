"""An 8-bit matrix-vector product written as XLA's row reduction, against the decode kernel, on
the device clock.

Where it sits: beside benchmarks/ring_cost.py (session 55, H100: XLA's row sum of an int8
weight costs 1.9 us fixed and reads at 100% of the 2 GiB read ceiling at the margin; the decode
kernel's TMA ring 3.5 us and 97%, so the kernel reads [14336, 4096] at 77-79% against the row
sum's 90%). At a few tokens the product y[m, n] = sum_k w[n, k] x[m, k] is a row reduction of
the weight too: XLA fuses the int8 convert, the product and the sum into one reduction kernel
(a Triton fusion on Hopper). Rows per M: that reduction (float32 sums, times the per-channel
scale), ``mgpu.quant_matmul`` (the engine's decode kernel, same operands), and the row sum.

    PYTHONPATH=. python3 benchmarks/xla_gemv.py [--shape 14336x4096] [--ms 1,2,4]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.device_clock import add_clock_arguments, clock_and_ceiling, print_reads, weight_copies
from benchmarks.quant_matmul import rel
from pallas_kernels.quant_matmul import mgpu
from pallas_kernels.quant_matmul import reference as ref


def reduce_gemv(x: jax.Array, q: jax.Array, s: jax.Array) -> jax.Array:
    """x [M, K] bf16, q [N, K] int8, s float32 [N] -> [M, N] bf16: each row's float32 sum of
    q * x over K, times its scale (XLA: one reduction fusion per token row, or one for all)."""
    prod = q[None, :, :].astype(jnp.float32) * x[:, None, :].astype(jnp.float32)
    return (jnp.sum(prod, axis=2) * s[None, :]).astype(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="14336x4096", help="the int8 weight's N x K")
    ap.add_argument("--ms", default="1,2,4", help="comma list of token counts")
    add_clock_arguments(ap, "/tmp/xla_gemv_trace")
    ns = ap.parse_args()
    n, k = (int(v) for v in ns.shape.split("x"))
    kclock, ceiling = clock_and_ceiling(ns)
    copies = weight_copies(n, k, quantized=True)
    queued = []
    for m in (int(v) for v in ns.ms.split(",")):
        x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
        want = ref.w8a16_matmul(x, *copies[0], out_dtype=jnp.float32)
        arms = {"XLA reduction": reduce_gemv,
                "decode kernel": lambda x, q, s: mgpu.quant_matmul(x, q, s)}
        for rnd in (1, 2):
            for name, fn in arms.items():
                err = rel(jnp.asarray(jax.jit(fn)(x, *copies[0]), jnp.float32), want)
                queued.append((f"{name}, M={m}, round {rnd} (rel err {err:.1e})",
                               kclock.later(fn, x, copies, ns.iters, ns.reps)))

    def row_sum(x, q, _s):
        total = jnp.sum(q.astype(jnp.int32) + x[0, 0].astype(jnp.int32), axis=1)
        return jnp.broadcast_to(total[None, :1].astype(x.dtype), (x.shape[0], 1))
    queued.append(("XLA's row sum", kclock.later(row_sum, jnp.zeros((1, k), jnp.bfloat16), copies,
                                                 ns.iters, ns.reps)))
    title = (f"## int8 [{n}, {k}] ({n * k / 1e6:.1f} MB) times a few tokens, {jax.devices()[0].device_kind}, "
             f"read ceiling {ceiling:.0f} GB/s")
    print_reads(title, queued, kclock, n * k, ceiling)


if __name__ == "__main__":
    main()
