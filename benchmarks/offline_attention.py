"""The GPU decode attention kernel's resources without a GPU: registers, shared memory and programs
per SM of each config, compiled for a deviceless H200 on a CPU machine, and the rounds of programs
a decode launch of N live sequences takes.

Where it sits: beside benchmarks/offline_ptx.py (the quantized matmul's PTX, the same deviceless
H200) and benchmarks/kv_dtype_attention.py (the same launches timed on the device). It answers
"how many of this config's programs an SM holds" in a session with no device time. The launch is
the engine's decode-only call (``max_q_len=1``: the direct decode launch over a ``--bucket``-row
token bucket, the page tables ``--max-model-len`` wide). XLA compiles Pallas Triton's kernel (its
thunk sequence gives the launch's grid and shared memory) and dumps the module's PTX, which
ptxas (JAX's CUDA wheel) reports registers and spills for. Programs per SM: the least of what
the registers (allocated per warp in 256s, 64K per SM), the shared memory (each program's plus
1 KB, 228 KB per SM) and the threads (2048 per SM) allow. A launch whose live programs (live
sequences x kv heads x splits) exceed that times the SMs runs in more than one round.

Session 47 (2026-12-06): the 8B layout over an fp8 pool (``default_config``'s unsplit launch),
64 keys per step 168 registers, 38 KB: 3 programs per SM (396 on 132 SMs); 128 keys per step
255 registers, 72 KB: 2 per SM (264); 32 keys 128 registers, 4 per SM, as a bf16 pool's 64. At
40 sequences x 8 kv heads (320 programs) 128 keys take two rounds where 64 keys take one:
session 47's step A/B (H100, the 8B at 40 x 8k: 128 keys 19.11 ms against 64 keys' 16.73).

Needs JAX's CUDA plugin in an environment of its own, as offline_hlo.py::

    JAX_PLATFORMS=cpu PYTHONPATH=. /tmp/aotvenv/bin/python benchmarks/offline_attention.py \\
        --layout 8b --pool fp8 --variants default,keys64,keys128 --live 40,64
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from benchmarks.kv_dtype_attention import LAYOUTS, PAGE
from benchmarks.offline_hlo import as_h200
from benchmarks.offline_ptx import h200_sharding
from pallas_kernels.ragged_paged_attention import gpu as rpa_gpu

SMS, REGS_PER_SM, SMEM_PER_SM, THREADS_PER_SM, SMEM_RESERVED = 132, 65536, 233472, 2048, 1024


def programs_per_sm(registers: int, smem: int, threads: int) -> int:
    """Programs of ``threads`` threads, ``registers`` each and ``smem`` bytes one SM holds."""
    warps = threads // 32
    per_warp = -(-registers * 32 // 256) * 256
    return min(REGS_PER_SM // (per_warp * warps), SMEM_PER_SM // (smem + SMEM_RESERVED),
               THREADS_PER_SM // threads)


def ptxas() -> str:
    """JAX's CUDA wheel's ptxas."""
    import nvidia.cu13  # (the plugin's CUDA 13 wheels)
    return str(Path(nvidia.cu13.__path__[0]) / "bin" / "ptxas")


def compile_launch(cfg: rpa_gpu.GpuConfig, hq: int, hkv: int, d: int, rows: int, width: int, pool: str,
                   sh: NamedSharding, dump: Path, name: str) -> tuple[int, int, int, int, int]:
    """-> (grid, threads, shared memory bytes, registers, spill bytes) of the decode launch of
    ``cfg`` over a ``rows``-row bucket with ``width``-page tables and a ``pool`` pool (bf16, fp8 as
    the engine stores it: uint8, int8), its arguments on ``sh`` (``h200_sharding``), read from XLA's dumps in
    ``dump`` (``XLA_FLAGS``, set before the backend starts), whose files carry ``name``."""
    pages = rows * width   # (the pool's size does not shape the kernel)
    dtype = {"bf16": jnp.bfloat16, "fp8": jnp.uint8, "int8": jnp.int8}[pool]

    def spec(shape: tuple, dtype: object) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

    args = [spec((rows, hq, d), jnp.bfloat16), spec((pages, PAGE, hkv, d), dtype),
            spec((pages, PAGE, hkv, d), dtype), spec((rows, width), jnp.int32), spec((rows,), jnp.int32),
            spec((rows + 1,), jnp.int32), spec((1,), jnp.int32)]
    scales = [spec((pages, hkv), jnp.float32)] * 2 if pool != "bf16" else []

    def f(q, kp, vp, pt, sl, qsl, ns, *sc):
        kw = dict(k_scales=sc[0], v_scales=sc[1]) if sc else {}
        return rpa_gpu.ragged_paged_attention(q, kp, vp, pt, sl, qsl, ns, sm_scale=d**-0.5, config=cfg,
                                              max_q_len=1, **kw)

    f.__name__ = name   # (the dump's file names)
    with as_h200():
        jax.jit(f).trace(*args, *scales).lower(lowering_platforms=("cuda",)).compile()
    files = list(dump.glob(f"*jit_{name}.*"))
    seq = "\n".join(p.read_text() for p in files if p.name.endswith("thunk_sequence.txt"))
    m = re.search(r"ragged_paged_attention grid: \[(\d+), 1, 1\] threads: \[(\d+), 1, 1\]\s+"
                  r"shared_memory: (\d+) bytes", seq)
    if m is None:
        raise SystemExit(f"no ragged_paged_attention launch in {name}'s thunk sequence ({dump})")
    regs = spills = None
    for ptx in (p for p in files if p.suffix == ".ptx"):
        if ".entry ragged_paged_attention" not in ptx.read_text():
            continue
        out = subprocess.run([ptxas(), "-arch=sm_90a", "-v", str(ptx), "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
        part = out[out.index("'ragged_paged_attention'"):]
        regs = int(re.search(r"Used (\d+) registers", part).group(1))
        spills = int(re.search(r"(\d+) bytes spill stores", part).group(1))
    if regs is None:
        raise SystemExit(f"no ragged_paged_attention PTX for {name} ({dump})")
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), regs, spills


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", default="8b", choices=sorted(LAYOUTS))
    ap.add_argument("--pool", default="fp8", choices=("fp8", "int8", "bf16"))
    ap.add_argument("--bucket", type=int, default=64, help="the token bucket's rows (= page-table rows)")
    ap.add_argument("--max-model-len", type=int, default=8544, help="the page tables' width in tokens")
    ap.add_argument("--variants", default="default,keys64,keys128",
                    help="comma list: default (default_config's decode launch), keysN (N keys per step), "
                         "warpsN, stagesN, float8 (kv_compute), int8bits (GpuConfig.int8_f16_bits), "
                         "joined by +")
    ap.add_argument("--live", default="40,64", help="comma list of live sequences for the rounds column")
    ns = ap.parse_args()
    hq, hkv, d = LAYOUTS[ns.layout]
    width = -(-ns.max_model_len // PAGE)
    base = rpa_gpu.default_config(ns.bucket, ns.bucket, hq, hkv, PAGE, width,
                                  kv_pool=None if ns.pool == "bf16" else ns.pool, head_dim=d)
    base = base.decode if isinstance(base, rpa_gpu.GpuPlan) else base
    # One launch per row: a narrow / wide pair's narrow one (its twin is a keysN variant).
    base = dataclasses.replace(base, wide_pages_per_block=None)
    live = [int(v) for v in ns.live.split(",")]
    print(f"## {ns.layout} decode attention over a {ns.pool} pool, {ns.bucket}-row bucket, "
          f"{width}-page tables, compiled for a deviceless H200 (default: {base})\n")
    print("| variant | keys per step | warps | grid | shared memory | registers | spills | programs per SM | "
          + " | ".join(f"rounds at {n} live" for n in live) + " |")
    print("|---" * (8 + len(live)) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        # XLA reads its flags once, when the first backend starts: one dump folder for every compile.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={tmp} "
                                   "--xla_dump_hlo_as_text --xla_gpu_dump_llvmir --xla_dump_emitter_re=.*")
        sh = h200_sharding()
        for i, variant in enumerate(ns.variants.split(",")):
            cfg = base
            for part in filter(lambda p: p != "default", variant.split("+")):
                if part.startswith("keys"):
                    cfg = dataclasses.replace(cfg, pages_per_block=int(part[4:]) // PAGE)
                elif part.startswith("warps"):
                    cfg = dataclasses.replace(cfg, num_warps=int(part[5:]))
                elif part.startswith("stages"):
                    cfg = dataclasses.replace(cfg, num_stages=int(part[6:]))
                elif part == "float8":
                    cfg = dataclasses.replace(cfg, kv_compute="float8")
                elif part == "int8bits":
                    cfg = dataclasses.replace(cfg, int8_f16_bits=True)
                else:
                    raise SystemExit(f"--variants: unknown part {part!r}")
            grid, threads, smem, regs, spills = compile_launch(cfg, hq, hkv, d, ns.bucket, width, ns.pool, sh,
                                                               Path(tmp), f"attention_{i}")
            per_sm = programs_per_sm(regs, smem, threads)
            splits = cfg.num_splits
            rounds = [-(-n * hkv * splits // (per_sm * SMS)) for n in live]
            print(f"| {variant} | {cfg.pages_per_block * PAGE} | {threads // 32} | {grid} | "
                  f"{smem / 1024:.1f} KB | {regs} | {spills} | {per_sm} | "
                  + " | ".join(map(str, rounds)) + " |", flush=True)


if __name__ == "__main__":
    main()
