"""What one call of the compiled decode step costs the host (XLA re-pointing its CUDA graph).

The profiler trace of the Qwen2.5-0.5B decode step (H200, RESULTS.md, v2 section) shows each call
spending ~1 ms in ``command_buffer::update`` before ``cuGraphLaunch``: XLA re-records the CUDA
graph's nodes whose buffers moved since the last call. (Measured before the fix: 1.66 ms per
call, ~1 ms of it the update of all 334 nodes: the fed-back tokens, the fresh outputs and the
step buffers moved.) The step now keeps every buffer it rewrites at a fixed address
(``jserve/step_state.py``). This probe times one call on an idle device, per XLA command-buffer update mode:

  reused       the step buffers uploaded once and passed again every call
  uploaded     fresh step buffers every call (the engine's way: one device_put per step)

Run on the GPU (from the repository root, PYTHONPATH=.), optionally with
``TF_CPP_VMODULE=command_buffer_thunk=3 TF_CPP_MIN_LOG_LEVEL=0`` to have XLA log the update:

    python3 benchmarks/cmdbuf_probe.py qwen2.5-0.5b
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from benchmarks.step_floor import decode_inputs
from jserve.builder import EngineArgs, build_engine


def idle_call_ms(engine, step, upload: bool, n: int = 30) -> float:
    """Median host ms of one call of ``step`` started on an idle device."""
    r = engine.runner
    ibuf, fbuf = decode_inputs(engine)
    host = np.asarray(ibuf), np.asarray(fbuf)
    kv, table, state = r.kv, r.slot_table, r.state
    times = []
    for i in range(n + 5):
        if upload:
            ibuf, fbuf = jax.device_put(host)
        jax.block_until_ready((kv, table, state, ibuf, fbuf))
        t0 = time.perf_counter()
        kv, _, table, state, tokens, *_ = step(r.params, kv, None, table, state, ibuf, fbuf)
        if i >= 5:
            times.append(time.perf_counter() - t0)
    jax.block_until_ready(tokens)
    r.kv, r.slot_table, r.state = kv, table, state
    return float(np.median(times)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ns = ap.parse_args()
    eng = build_engine(EngineArgs(model=ns.model, random_weights=True, dtype="bfloat16", max_num_seqs=16,
                                  max_num_batched_tokens=16, max_model_len=1024, num_pages=512))
    r = eng.runner
    variant = (r.bucket_for(1)[0], False, True, True)
    steps = {"default": r._compiled[variant]}
    for mode in ("SKIP_TEMP", "SKIP_PROFILED"):
        steps[mode] = r.lower_step(variant).compile(
            compiler_options={"xla_gpu_command_buffer_update_mode": mode})
    print(f"\n## {ns.model} ({jax.devices()[0].device_kind}): host ms of one decode-step call, idle device")
    print("| compile | step buffers reused | uploaded every call |")
    print("|---|---|---|")
    for name, step in steps.items():
        print(f"| {name} | {idle_call_ms(eng, step, False):.3f} | {idle_call_ms(eng, step, True):.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
