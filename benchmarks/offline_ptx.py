"""The Hopper decode kernels' PTX without a GPU: each config compiled for a deviceless H200 on a
CPU machine, and its instructions counted.

Where it sits: beside benchmarks/offline_hlo.py (XLA's side of a step, the same deviceless H200)
and benchmarks/decode_stream.py (the same kernels timed on the device). It answers "what does
the kernel's body issue per weight tile" in a session with no device time: Mosaic GPU lowers
the kernel to PTX and runs ptxas while XLA compiles the custom call, and its dump options
(``MOSAIC_GPU_DUMP_PTX``, ``MOSAIC_GPU_DUMP_TO``, read at each compile) write the PTX and
ptxas' report (and tries nvdisasm for SASS, which the plugin lacks: its error lines are
harmless). One row per (weight dtype, x dtype, variant): registers, spills, and the counts
of the instruction classes that convert the weight tile, load it from SMEM, and multiply.

Session 46 (2026-12-06), the 8B's o projection at 16 tokens: the int8 -> f16 convert is two
``cvt`` per value (256 per thread per 256-column tile), the bf16 one ``prmt`` / two ``and`` /
``sub.bf16x2`` per pair (256), ``int8_f16_bits`` one ``xor`` / ``add.f16x2`` per pair (128).

Needs JAX's CUDA plugin in an environment of its own, as offline_hlo.py::

    JAX_PLATFORMS=cpu PYTHONPATH=. /tmp/aotvenv/bin/python benchmarks/offline_ptx.py \\
        --shape 4096x4096 --m 16 --weights int8 --x bfloat16,float16 --variants default,int8_f16_bits=0
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import os
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pallas_kernels.quant_matmul import mgpu, mgpu_decode
from pallas_kernels.quant_matmul import reference as ref

# XLA's GpuTargetConfigProto (text) of an H200 as the H200 reports itself (132 SMs, 60 MiB of L2,
# compute capability 9.0); the CUDA and cuDNN versions of the device image.
H200_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000 l2_cache_size: 62914560 clock_rate_ghz: 1.98
  device_memory_size: 150754820096 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536 registers_per_block_limit: 65536
}
platform_name: "CUDA" dnn_version_info { major: 9 minor: 28 } runtime_version { major: 13 }
device_description_str: "NVIDIA H200"
"""

def h200_sharding() -> NamedSharding:
    """The one device of a deviceless H200 (``H200_TARGET``): abstract arguments placed on it
    compile for that GPU on a CPU machine."""
    topo = topologies.get_topology_desc(platform="cuda", target_config=H200_TARGET, topology="1x1x1")
    return NamedSharding(Mesh(np.array(topo.devices).reshape(1), ("x",)), PartitionSpec())


# Instruction classes counted per row: name -> opcode prefixes.
CLASSES = {
    "cvt": ("cvt.rn.f16", "cvt.s16", "cvt.rn.bf16", "cvt.f32", "cvt.rn.f32"),
    "prmt": ("prmt",),
    "and/xor": ("and.b32", "xor.b32"),
    "sub/add x2": ("sub.bf16x2", "sub.f16x2", "add.f16x2", "add.bf16x2"),
    "ld.shared": ("ld.shared",),
    "wgmma": ("wgmma.mma_async",),
}


def opcode_counts(ptx: str) -> collections.Counter:
    """Each instruction's opcode (with its type suffixes) in a PTX text, counted (also those in
    inline-asm braces, as Mosaic GPU emits wgmma)."""
    ops = re.findall(r"(?:^|[;{])\s*(?:@!?%p\d+\s+)?([a-z][a-z0-9_.:]*)", ptx, re.M)
    return collections.Counter(op for op in ops if not op.endswith(":"))


def variant_config(base: mgpu_decode.DecodeConfig, variant: str) -> mgpu_decode.DecodeConfig:
    """``base`` with a variant's DecodeConfig fields set: "default" (none), or fields joined by
    +: a boolean NAME set true, or false as NAME=0 (``int8_f16_bits=0``); an integer as
    NAME=VALUE (``per_cta=2+stages=2``)."""
    fields = {}
    for f in ([] if variant == "default" else variant.split("+")):
        name, _, value = f.partition("=")
        if isinstance(getattr(base, name), bool):
            fields[name] = value != "0"
        else:
            fields[name] = int(value)
    return dataclasses.replace(base, **fields)


def compile_ptx(fn, args: tuple, dump: Path) -> tuple[str, str]:
    """``fn`` compiled for the deviceless H200 with Mosaic GPU's dumps in ``dump``: its kernels'
    PTX (joined) and ptxas' reports."""
    dump.mkdir(parents=True, exist_ok=True)
    os.environ.update(MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_TO=str(dump))
    jax.jit(fn).trace(*args).lower().compile()
    ptx = "\n".join(p.read_text() for p in sorted(dump.glob("*.ptx")))
    return ptx, "\n".join(p.read_text() for p in sorted(dump.glob("*.ptxas")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="4096x4096", help="the weight's N x K")
    ap.add_argument("--m", type=int, default=16, help="tokens (<= 64: the persistent decode kernel)")
    ap.add_argument("--kernel", choices=("decode", "gated"), default="decode",
                    help="the decode matmul (mgpu.kernel_config) or the gate/up kernel (N = 2I)")
    ap.add_argument("--weights", default="int8,fp8", help="comma list: int8, fp8")
    ap.add_argument("--x", default="bfloat16,float16", help="comma list of x dtypes")
    ap.add_argument("--variants", default="default",
                    help="comma list: default (the engine's config), or DecodeConfig boolean fields "
                         "joined by +, each set true, or false as NAME=0 (int8_f16_bits=0)")
    ns = ap.parse_args()
    n, k = (int(v) for v in ns.shape.split("x"))
    sharding = h200_sharding()
    base = (mgpu.silu_gate_config(ns.m, n, k, sms=132) if ns.kernel == "gated"
            else mgpu.kernel_config(ns.m, n, k))
    if not isinstance(base, mgpu_decode.DecodeConfig):
        raise SystemExit(f"{ns.kernel}: no persistent decode config for M={ns.m}, {ns.shape}")
    print(f"## {ns.kernel} kernel, w [{n}, {k}], M = {ns.m}: {base}\n")
    print("| weights | x | variant | registers | spills | " + " | ".join(CLASSES) + " | instructions |")
    print("|---" * (6 + len(CLASSES)) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (wname, xname, variant) in enumerate(itertools.product(
                ns.weights.split(","), ns.x.split(","), ns.variants.split(","))):
            cfg = variant_config(base, variant)
            wdt = jnp.int8 if wname == "int8" else ref.FP8
            args = tuple(jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in
                         (((ns.m, k), jnp.dtype(xname)), ((n, k), wdt), ((n,), jnp.float32)))
            call = mgpu.quant_matmul_silu_gate if ns.kernel == "gated" else mgpu.quant_matmul
            ptx, report = compile_ptx(lambda x, w, s, cfg=cfg, call=call: call(x, w, s, config=cfg),
                                      args, Path(tmp) / str(i))
            ops = opcode_counts(ptx)
            regs = re.findall(r"Used (\d+) registers", report)
            spills = re.findall(r"(\d+) bytes spill stores", report)
            counts = [sum(c for op, c in ops.items() if op.startswith(pre)) for pre in CLASSES.values()]
            print(f"| {wname} | {xname} | {variant} | {','.join(regs)} | {','.join(spills)} | "
                  + " | ".join(map(str, counts)) + f" | {sum(ops.values())} |", flush=True)


if __name__ == "__main__":
    main()
