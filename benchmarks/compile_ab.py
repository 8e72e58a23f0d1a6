"""How much of a GPU start-up is XLA's GEMM autotuning? Compile seconds and run ms of the step
programs of large token buckets under XLA options, in one process.

Session 13 (owed case u, H200): Qwen2.5-0.5B at max_num_seqs 256 / budget 2048 spent 75 s in
the activation probe and then compiled 6 of its 16 step variants in the next 72 s. This
benchmark builds a small engine (one 16-token bucket, 16 rows: none of the buckets below is
compiled, or autotuned, while it starts), turns JAX's persistent compilation cache off, and
for each token bucket in ``--buckets`` and each option set in ``--modes``, in that order::

    lower the bucket's greedy step (16 rows) -> compile under the options (timed)
    -> count its slice copies (``slice_copies``: layer weights XLA copies out of their stacked
       arrays before a library call) and library calls
    -> run it back to back on an all-padding input: every GEMM still runs the whole bucket;
       attention has no rows -> ms per call

Session 34 (H200, Qwen2.5-0.5B fp8_w8a8, the 256-token step compiled for cuBLAS): every fp8
projection weight reached its cuBLASLt fp8 GEMM through such a copy (96 calls, 347 MiB per
step). The engine now holds w8a8 projections one array per layer (``linear.unstack_layers``);
``--quantization`` picks the engine's weights and ``--layouts per-layer,stacked`` compiles each
bucket with them and restacked (the layout before), the A/B.

Order matters: XLA keeps autotuning results in the process, so an autotuned compile of the same
GEMMs after another autotuned one is cheaper. Put ``default`` last (the level-0 and cuBLAS modes
autotune no Triton GEMMs before it). A mode is ``default`` or ``NAME=VALUE[+NAME=VALUE]``
(XLA debug options given to that compile only), e.g.:

    PYTHONPATH=. python3 benchmarks/compile_ab.py --model qwen2.5-0.5b --buckets 2048,256 \\
        --modes xla_gpu_autotune_level=0,xla_gpu_enable_triton_gemm=false,default
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp

from benchmarks.hlo_kernels import census
from jserve.builder import EngineArgs, build_engine
from jserve.model.linear import QuantizedWeight
from jserve.step_program import StepVariant


def options(mode: str) -> dict[str, object]:
    """``NAME=VALUE[+NAME=VALUE]`` -> compiler options ({} for ``default``)."""
    if mode == "default":
        return {}
    out: dict[str, object] = {}
    for part in mode.split("+"):
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise ValueError(f"mode {mode!r}: expected NAME=VALUE")
        out[name] = {"true": True, "false": False}.get(value.lower(), value)
    return out


HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}
SLICE_COPY = re.compile(r"\s*%wrapped_slice[\w.]* = (\w+)\[([\d,]*)\]\{[^}]*\} fusion\(.*kind=kLoop")


def slice_copies(hlo_text: str) -> tuple[int, float]:
    """(count, MiB) of the slice-wrapping loop fusions of an optimized program: slices handed to
    a library call (a layer's weight out of its stacked array) that XLA materializes with a copy
    kernel instead of passing them in place."""
    n, nbytes = 0, 0
    for line in hlo_text.splitlines():
        if m := SLICE_COPY.match(line):
            n += 1
            nbytes += math.prod(int(d) for d in m.group(2).split(",") if d) * HLO_BYTES.get(m.group(1), 4)
    return n, nbytes / 2**20


def run_ms(engine, step, bucket: int, n: int = 20) -> float:
    """ms per call of ``step`` (a greedy step of ``bucket``) back to back, all-padding input."""
    r = engine.runner
    layout = r.layout(bucket)
    joint = jax.device_put(layout.joint(layout.new_buffers()[0]))
    kv, table, tokens = r.kv, r.slot_table, r._prev_tokens
    for _ in range(3):
        kv, _, table, tokens, *_ = step(r.params, kv, None, table, tokens, joint, None)
    jax.block_until_ready(tokens)
    t0 = time.perf_counter()
    for _ in range(n):
        kv, _, table, tokens, *_ = step(r.params, kv, None, table, tokens, joint, None)
    jax.block_until_ready(tokens)
    r.kv, r.slot_table, r._prev_tokens = kv, table, tokens
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--buckets", default="2048,256", help="comma list of token buckets")
    ap.add_argument("--modes", default="xla_gpu_autotune_level=0,xla_gpu_enable_triton_gemm=false,default")
    ap.add_argument("--quantization", default=None, help="the engine's weight quantization (e.g. fp8_w8a8)")
    ap.add_argument("--layouts", default="per-layer",
                    help="comma list: per-layer (the engine's w8a8 arrays), stacked (restacked: the A/B)")
    ns = ap.parse_args()
    buckets = [int(b) for b in ns.buckets.split(",")]
    modes = ns.modes.split(",")
    for m in modes:
        options(m)   # a bad mode fails before the engine builds
    t0 = time.perf_counter()
    quantization = None if ns.quantization == "none" else ns.quantization
    eng = build_engine(EngineArgs(model=ns.model, random_weights=True, dtype="bfloat16", max_num_seqs=16,
                                  max_num_batched_tokens=16, max_model_len=max(1024, max(buckets)),
                                  num_pages=512, quantization=quantization),
                       progress=lambda line: print("  " + line, flush=True))
    print(f"  engine built in {time.perf_counter() - t0:.1f} s", flush=True)
    jax.config.update("jax_enable_compilation_cache", False)
    rows = []
    per_layer = eng.runner.params
    for layout in ns.layouts.split(","):
        eng.runner.params = per_layer if layout == "per-layer" else restacked(per_layer)
        for t in buckets:
            for m in modes:
                lowered = eng.runner.lower_step(StepVariant(t, False, True, False), host_out=False)
                tc = time.perf_counter()
                try:
                    step = lowered.compile(compiler_options=options(m))
                except Exception as e:  # noqa: BLE001 - report the failed mode, keep the run going
                    print(f"  {m} at {t} tokens failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                compile_s = time.perf_counter() - tc
                text = step.as_text()
                copies = slice_copies(text)
                calls = {k: n for k, n in census(text).items() if k.startswith("custom-call")}
                ms = run_ms(eng, step, t)
                print(f"  bucket {t}, {layout}, {m}: compiled in {compile_s:.1f} s, {ms:.3f} ms per call, "
                      f"slice copies {copies[0]} ({copies[1]:.0f} MiB), library calls {calls}", flush=True)
                rows.append((t, layout, m, compile_s, ms, copies))
        eng.runner.params = per_layer
    print(f"\n## compile A/B, {ns.model} {ns.quantization or 'bf16'} ({jax.devices()[0].device_kind}), "
          "greedy step, 16 rows")
    print("| token bucket | w8a8 weights | XLA options | compile s | ms per call | vs default "
          "| slice copies (MiB) |")
    print("|---|---|---|---|---|---|---|")
    base = {(t, lay): ms for t, lay, m, _, ms, _ in rows if m == "default"}
    for t, lay, m, cs, ms, (n, mib) in rows:
        ratio = f"{ms / base[t, lay]:.3f}x" if (t, lay) in base else "-"
        print(f"| {t} | {lay} | {m} | {cs:.1f} | {ms:.3f} | {ratio} | {n} ({mib:.0f}) |")


def restacked(params: dict) -> dict:
    """The engine's params with per-layer w8a8 arrays stacked again (the layout before session
    34: each layer's weight a slice of its stack), for the A/B."""
    out = {}
    for name, w in params.items():
        if isinstance(w, QuantizedWeight) and isinstance(w.q, tuple):
            stack = jax.jit(lambda *a: jnp.concatenate(a), out_shardings=w.q[0].sharding)
            w = dataclasses.replace(w, q=stack(*w.q))
        out[name] = w
    return out

if __name__ == "__main__":
    main()
