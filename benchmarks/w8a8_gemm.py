"""w8a8 through XLA's fp8 dot at prefill sizes: the GEMM alone and everything around it.

Where it sits: beside ``pallas_kernels/quant_matmul/api.py``, whose dispatcher hands GPU w8a8
matmuls of ``W8A8_XLA_MIN_M`` tokens and more to ``reference.w8a8_matmul(native=True)``. On the
device clock (``device_clock.DeviceClock``), per shape and M: bf16's GEMM, the w8a8 path
(per-token activation quantization, the fp8 dot, the scales) with float32 sums (before session
34) and with bf16 sums (the engine's since), and the engine's form compiled with XLA's Triton
GEMMs allowed.
Columns: the heaviest kernel's median (the GEMM) and every kernel of the call. Compiled with the
engine's option for wide models (``xla_gpu_enable_triton_gemm=false``) unless marked::

    PYTHONPATH=. python3 benchmarks/w8a8_gemm.py --ms 256,2048 --shapes 28672x4096,4096x14336
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.device_clock import DeviceClock
from pallas_kernels.quant_matmul import reference as ref

CUBLAS = {"xla_gpu_enable_triton_gemm": False}


def engine_form(x: jax.Array, w: jax.Array, s: jax.Array) -> jax.Array:
    """The engine's route (since session 34: bf16 sums for a bf16 result)."""
    return ref.w8a8_matmul(x, w, s, None, jnp.bfloat16, native=True)


def float32_sums(x: jax.Array, w: jax.Array, s: jax.Array) -> jax.Array:
    """The route before session 34: float32 sums, then the scales and the bf16 cast."""
    xq, xs = ref.quantize_activations(x, None)
    acc = jax.lax.dot_general(xq, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (acc * xs[:, None] * s[None, :]).astype(jnp.bfloat16)


def dense(x: jax.Array, w: jax.Array, s: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", default="256,2048", help="comma list of token counts")
    ap.add_argument("--shapes", default="28672x4096,4096x14336", help="comma list of NxK weights")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--trace-dir", default="/tmp/w8a8_gemm")
    ns = ap.parse_args()
    clock = DeviceClock(ns.trace_dir)
    rng = np.random.default_rng(0)
    arms = (("bf16", dense, False, True), ("w8a8, float32 sums", float32_sums, True, True),
            ("w8a8 (engine: bf16 sums)", engine_form, True, True),
            ("w8a8, Triton allowed", engine_form, True, False))
    print(f"## w8a8 GEMMs through XLA ({jax.devices()[0].device_kind}), us per call")
    print("| M | weight | arm | GEMM | all kernels |")
    print("|---|---|---|---|---|")
    for m in (int(v) for v in ns.ms.split(",")):
        for n, k in (tuple(int(d) for d in sh.split("x")) for sh in ns.shapes.split(",")):
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            w8 = jnp.asarray(rng.standard_normal((n, k)), ref.FP8)
            wb = jnp.asarray(rng.standard_normal((n, k)), jnp.bfloat16)
            s = jnp.ones((n,), jnp.float32)
            labels = []
            for name, f, fp8, cublas in arms:
                w = w8 if fp8 else wb
                exe = jax.jit(f).lower(x, w, s).compile(compiler_options=CUBLAS if cublas else None)
                labels.append((name, clock.run(f"{m} {n}x{k} {name}", exe, x, w, s, reps=ns.reps)))
            stats = clock.flush()
            for name, label in labels:
                st = stats[label]
                print(f"| {m} | [{n}, {k}] | {name} | {st.median_us:.1f} | {st.all_us:.1f} |", flush=True)


if __name__ == "__main__":
    main()
