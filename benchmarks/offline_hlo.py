"""An H200 step program's optimized HLO without a GPU: the engine's step lowered and compiled by
XLA's GPU compiler for a deviceless H200 on a CPU machine, then counted.

Where it sits: beside benchmarks/compile_ab.py (compiles and times the same programs on the
device) and benchmarks/hlo_kernels.py (the census). It answers "which kernels, copies and
library calls does XLA make of this step on the H200" in a session with no device time: the
engine is built on CPU (random weights), then each bucket's greedy fused step is traced with
``jax.default_backend()`` answering "gpu" and the Hopper checks true (so the kernels the H200
runs are chosen, as there), every argument abstract on a one-GPU deviceless topology
(``jax.experimental.topologies`` with ``H200_TARGET``), and compiled with the engine's XLA
options for that bucket (``compile_pool.compiler_options``). What differs from the device: XLA
cannot autotune, so GEMMs take its default configs (cuBLAS algorithm 0; default Triton tiles
where Triton GEMMs are allowed); fusion, copies and custom calls come from the same passes.

Session 35 checked it against session 34's device census: Qwen2.5-0.5B fp8_w8a8, 256-token step,
weights restacked: 122 slice copies, 347 MiB (the device: 96 weight copies, 347 MiB, + 7 small).

Needs JAX's CUDA plugin for jax 0.11.2, in an environment of its own (in the project's, tests
would start a CUDA backend)::

    python3.12 -m venv /tmp/aotvenv && /tmp/aotvenv/bin/pip install "jax[cuda13]==0.11.2" flax \\
        numpy ml_dtypes safetensors tokenizers llguidance outlines-core jinja2 tqdm orbax-checkpoint
    JAX_PLATFORMS=cpu PYTHONPATH=. /tmp/aotvenv/bin/python benchmarks/offline_hlo.py \\
        --model qwen2.5-0.5b --quantization fp8_w8a8 --buckets 256 --layouts per-layer,stacked
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from benchmarks.compile_ab import restacked, slice_copies
from benchmarks.hlo_kernels import census
from benchmarks.offline_ptx import H200_TARGET
from benchmarks.step_floor import patched
from jserve.builder import EngineArgs, build_engine
from jserve.compile_pool import compiler_options, cublas_min_tokens
from jserve.model import shapes
from jserve.step_program import StepVariant, fused_step
from pallas_kernels import hopper
from pallas_kernels.flash_attention import mgpu as flash_mgpu
from pallas_kernels.quant_matmul import mgpu as quant_mgpu


@contextlib.contextmanager
def as_h200() -> Iterator[None]:
    """Traces inside choose the H200's kernels: the backend reads "gpu", the Hopper checks pass,
    Pallas' Triton lowering takes the H200's GPU info (it would ask a device)."""
    from jax._src.pallas.triton import gpu_info, pallas_call_registration

    saved = (jax.default_backend, quant_mgpu.on_hopper, flash_mgpu.on_hopper, hopper.on_hopper,
             pallas_call_registration.gpu_info_lib.get_gpu_info)
    jax.clear_caches()   # (nested jits traced for the CPU engine would keep its kernel choices)
    jax.default_backend = lambda: "gpu"
    quant_mgpu.on_hopper = flash_mgpu.on_hopper = hopper.on_hopper = lambda: True
    pallas_call_registration.gpu_info_lib.get_gpu_info = (
        lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200))
    try:
        yield
    finally:
        (jax.default_backend, quant_mgpu.on_hopper, flash_mgpu.on_hopper, hopper.on_hopper,
         pallas_call_registration.gpu_info_lib.get_gpu_info) = saved
        jax.clear_caches()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b", help="a named shape")
    ap.add_argument("--layers", type=int, default=None,
                    help="the shape with this many layers (to fit host memory)")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--dtype", default="bfloat16", help="the model's dtype (activations, KV pool)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="the KV pool's dtype (auto, fp8, int8)")
    ap.add_argument("--buckets", default="16,256", help="comma list of token buckets")
    ap.add_argument("--layouts", default="per-layer", help="per-layer, stacked: w8a8 arrays")
    ap.add_argument("--dump", default=None, help="a folder for each program's optimized HLO text")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (N > 1: run with "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=N for the CPU engine)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline_parallel_size (the same)")
    ap.add_argument("--decode-only", action="store_true", help="the greedy decode-only variant "
                    "(the one step_floor times: attention's decode launch alone)")
    ap.add_argument("--ab", default="", help="comma list of step_floor's A/B patches in effect "
                    "(e.g. quant-residual-norm-off, xla:NAME=VALUE)")
    ns = ap.parse_args()
    patches = contextlib.ExitStack()   # step_floor's A/B patches, in effect for the whole run
    xla: dict[str, object] = {}
    for opts in [patches.enter_context(patched(p)) for p in filter(None, ns.ab.split(","))]:
        xla.update(opts or {})
    model, buckets = ns.model, [int(b) for b in ns.buckets.split(",")]
    if ns.layers:
        model = f"{ns.model}-{ns.layers}-layers"
        shapes.NAMED_SHAPES[model] = dict(shapes.NAMED_SHAPES[ns.model], num_hidden_layers=ns.layers)
    eng = build_engine(EngineArgs(model=model, random_weights=True, dtype=ns.dtype, max_num_seqs=16,
                                  max_num_batched_tokens=16, max_model_len=max(1024, max(buckets)),
                                  num_pages=512, quantization=ns.quantization,
                                  kv_cache_dtype=ns.kv_cache_dtype, tensor_parallel_size=ns.tp,
                                  pipeline_parallel_size=ns.pp))
    jax.config.update("jax_enable_compilation_cache", False)
    r = eng.runner
    topology = topologies.get_topology_desc(platform="cuda", target_config=H200_TARGET,
                                            topology=f"1x1x{ns.tp * ns.pp}")
    mesh = Mesh(np.array(topology.devices).reshape(r.mesh.devices.shape), r.mesh.axis_names)

    def abstract(x: object) -> object:
        if not isinstance(x, jax.Array):
            return x
        spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else PartitionSpec()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    rows = []
    for layout_name in ns.layouts.split(","):
        params = r.params if layout_name == "per-layer" else restacked(r.params)
        for t in buckets:
            layout = r.layout(t)
            fn = functools.partial(fused_step, r.config.model, layout, r._num_out, r._num_spec,
                                   StepVariant(t, False, True, ns.decode_only), mesh)
            args = jax.tree.map(abstract, (params, r.kv, None, r.slot_table, r._prev_tokens,
                                           jax.device_put(layout.joint(layout.new_buffers()[0])),
                                           r.step_masks(True, flush=False)))
            with as_h200():
                lowered = jax.jit(fn, donate_argnums=(1, 2, 3, 4)).trace(*args).lower(
                    lowering_platforms=("cuda",))
            t0 = time.perf_counter()
            text = lowered.compile(compiler_options(
                t, True, cublas_min_tokens(r.config.model.hidden_size)) | xla).as_text()
            seconds = time.perf_counter() - t0
            if ns.dump:
                Path(ns.dump).mkdir(parents=True, exist_ok=True)
                par = f"_tp{ns.tp}_pp{ns.pp}" if ns.tp * ns.pp > 1 else ""
                ab = ns.ab and "_" + ns.ab.replace(":", "-").replace("=", "-")
                kv = "" if ns.kv_cache_dtype == "auto" else f"_kv-{ns.kv_cache_dtype}"
                dec = "_decode-only" if ns.decode_only else ""
                name = f"{model}_{ns.quantization or 'bf16'}{kv}{par}_{t}{dec}_{layout_name}{ab}.hlo"
                (Path(ns.dump) / name).write_text(text)
            kinds = census(text)
            rows.append((t, layout_name, seconds, kinds, slice_copies(text)))
            print(f"  bucket {t}, {layout_name}: compiled in {seconds:.1f} s; "
                  f"{dict(kinds.most_common())}", flush=True)
    print(f"\n## {model} {ns.quantization or 'bf16'}{ns.ab and ' + ' + ns.ab}: greedy step, 16 rows, "
          "compiled for a deviceless H200")
    print("| token bucket | w8a8 weights | compile s | kernels | slice copies (MiB) | library calls |")
    print("|---|---|---|---|---|---|")
    for t, lay, seconds, kinds, (n, mib) in rows:
        calls = ", ".join(f"{k.split(' ', 1)[1]} x{v}" for k, v in kinds.items()
                          if k.startswith("custom-call"))
        print(f"| {t} | {lay} | {seconds:.1f} | {sum(kinds.values())} | {n} ({mib:.1f}) | {calls} |")


if __name__ == "__main__":
    main()
