"""Offline engine benchmark: batch-1 decode tok/s and N-request throughput.

Runs the engine on an HF model directory or on random weights of a named shape
(``llama3.1-8b``, ``qwen2.5-0.5b``) and prints one table. Not a test: numbers go to
benchmarks/RESULTS.md with the GPU name and date.

    PYTHONPATH=. python3 benchmarks/offline.py --model qwen2.5-0.5b --random-weights \
        --num-requests 256 --input-len 200 --output-len 180
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import jax
import numpy as np

from benchmarks.step_floor import ab_cache_dir
from jserve.builder import EngineArgs, build_engine
from jserve.sampling_params import RequestOutputKind, SamplingParams
from pallas_kernels.quant_matmul import api as quant_api


def _run(engine, prompts, max_tokens, buckets=None):
    """Only finished outputs, as ``LLM.generate`` asks for them (output_kind FINAL_ONLY); the
    first token's time comes from the outputs' metrics. ``buckets``: a dict that collects, per
    token bucket, the seconds of the ``engine.step`` calls that waited for a step of it (the
    overlapped loop reads step N in the call that dispatches step N + 1, so each call's time is
    put on the bucket the previous call dispatched; device-bound steps: their device time)."""
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                        output_kind=RequestOutputKind.FINAL_ONLY)
    for p in prompts:
        engine.add_request(None, p, sp)
    t0, m0 = time.perf_counter(), time.monotonic()
    first = None
    out_tokens = 0
    steps = 0
    dispatched = _dispatch_log(engine) if buckets is not None else None
    while engine.has_unfinished_requests():
        t_step = time.perf_counter()
        outs = engine.step()
        if dispatched is not None and len(dispatched) >= 2:
            b = dispatched[-2]
            buckets.setdefault(b, []).append(time.perf_counter() - t_step)
        for o in outs:
            if o.finished:
                out_tokens += len(o.outputs[0].token_ids)
                ft = o.metrics.get("first_token_time")
                if ft is not None and (first is None or ft - m0 < first):
                    first = ft - m0
        steps += 1
    if dispatched is not None:
        del engine.runner.dispatch   # the instance attribute _dispatch_log set: the method again
    return time.perf_counter() - t0, out_tokens, steps, first


def _dispatch_log(engine) -> list[int]:
    """Record the token bucket of every plan the runner dispatches (-> the growing list)."""
    runner, log = engine.runner, []
    sizes = engine.config.scheduler.token_buckets
    real = runner.dispatch

    def dispatch(out):
        log.append(next((b for b in sizes if b >= out.num_tokens), out.num_tokens))
        return real(out)

    runner.dispatch = dispatch
    return log


def _bucket_table(buckets: dict[int, list[float]]) -> None:
    print("\n| token bucket (throughput run) | steps | ms per step (median) | s in all |")
    print("|---|---|---|---|")
    for b in sorted(buckets):
        v = sorted(buckets[b])
        print(f"| {b} | {len(v)} | {v[len(v) // 2] * 1e3:.2f} | {sum(v):.2f} |")


class _Timer:
    """Wraps callables to accumulate wall time per name (host view; device work is async)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}

    def wrap(self, name, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t
        return timed


def _decode_breakdown(engine, prompt, n_tokens):
    """Per-step host breakdown of batch-1 decode: where the milliseconds go (host view)."""
    from jserve.runner import StepHandle

    timer = _Timer()
    r, s = engine.runner, engine.scheduler
    saved = (r.pack, r.dispatch, s.schedule, s.update, StepHandle.result)
    r.pack = timer.wrap("runner.pack (host packing)", r.pack)
    r.dispatch = timer.wrap("runner.dispatch (incl. pack)", r.dispatch)
    s.schedule, s.update = timer.wrap("schedule", s.schedule), timer.wrap("update", s.update)
    StepHandle.result = timer.wrap("result (wait for tokens)", StepHandle.result)
    try:
        dt, n, steps, _ = _run(engine, [prompt], n_tokens)
    finally:
        r.pack, r.dispatch, s.schedule, s.update, StepHandle.result = saved
    print(f"\n| batch-1 decode breakdown ({steps} steps, {dt / steps * 1e3:.2f} ms/step) | ms/step |")
    print("|---|---|")
    for k, v in timer.total.items():
        print(f"| {k} | {v / steps * 1e3:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=200)
    ap.add_argument("--output-len", type=int, default=180)
    ap.add_argument("--decode-len", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false")
    ap.add_argument("--quantization", default=None, help="int8 | fp8 | fp8_w8a8 (8-bit projections)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8 | int8 (1-byte KV pages)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--log-level", default="WARNING", help="jserve's log level (INFO: start-up memory)")
    ap.add_argument("--w8a8-xla-min-m", type=int, default=None,
                    help="A/B: w8a8 matmuls of this many tokens and more take XLA's fp8 dot "
                         "(pallas_kernels.quant_matmul.api.W8A8_XLA_MIN_M; default: the dispatcher's)")
    ap.add_argument("--triton-gemm-all", action="store_true",
                    help="A/B: XLA's autotuned Triton GEMMs allowed in every bucket (the engine gives "
                         "wide models' buckets from 32 tokens cuBLAS only: jserve/compile_pool.py)")
    ap.add_argument("--triton-gemm-from", type=int, default=None,
                    help="A/B: XLA's autotuned Triton GEMMs allowed in buckets of this many tokens and "
                         "more, cuBLAS below (w8a8's XLA fp8 dots start at 128 tokens)")
    ap.add_argument("--bucket-times", action="store_true",
                    help="also print the throughput run's step time per token bucket")
    ns = ap.parse_args()
    if ns.triton_gemm_all:
        import jserve.runner

        jserve.runner.cublas_min_tokens = lambda hidden_size: 1 << 30
    if ns.triton_gemm_from is not None:
        import jserve.compile_pool as compile_pool
        import jserve.split_step as split_step

        plain = compile_pool.compiler_options

        def options(tokens: int, gpu: bool, cublas_from: int = compile_pool.CUBLAS_MIN_TOKENS) -> dict:
            out = plain(tokens, gpu, cublas_from)
            if tokens >= ns.triton_gemm_from:
                out.pop("xla_gpu_enable_triton_gemm", None)
            return out

        compile_pool.compiler_options = split_step.compiler_options = options   # benchmark A/B only
    if ns.w8a8_xla_min_m is not None:
        quant_api.W8A8_XLA_MIN_M = ns.w8a8_xla_min_m
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jserve").setLevel(ns.log_level)

    t0 = time.perf_counter()
    engine = build_engine(EngineArgs(
        model=ns.model, random_weights=ns.random_weights, dtype=ns.dtype,
        max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
        max_model_len=ns.max_model_len, async_scheduling=ns.async_scheduling,
        quantization=ns.quantization, kv_cache_dtype=ns.kv_cache_dtype,
        gpu_memory_utilization=ns.gpu_memory_utilization,
        compilation_cache_dir=(None if ns.w8a8_xla_min_m is None     # (a module constant: programs apart)
                               else ab_cache_dir(f"w8a8_xla_min_m={ns.w8a8_xla_min_m}"))))
    startup = time.perf_counter() - t0
    vocab = engine.config.model.vocab_size
    rng = np.random.default_rng(0)

    # Batch-1 decode: one short prompt, time the decode tokens after the first.
    _run(engine, [rng.integers(10, vocab, 16).tolist()], 4)  # warm path
    dt, n, steps, ttft = _run(engine, [rng.integers(10, vocab, 16).tolist()], ns.decode_len)
    b1 = (n - 1) / (dt - ttft)
    _decode_breakdown(engine, rng.integers(10, vocab, 16).tolist(), ns.decode_len)

    prompts = [rng.integers(10, vocab, ns.input_len).tolist() for _ in range(ns.num_requests)]
    buckets = {} if ns.bucket_times else None
    dt2, n2, steps2, _ = _run(engine, prompts, ns.output_len, buckets)
    if buckets:
        _bucket_table(buckets)

    dev = jax.devices()[0]
    rows = {
        "w8a8_xla_min_m": quant_api.W8A8_XLA_MIN_M, "triton_gemm_all": ns.triton_gemm_all,
        "triton_gemm_from": ns.triton_gemm_from,
        "device": getattr(dev, "device_kind", str(dev)), "model": ns.model, "dtype": ns.dtype,
        "startup_s": round(startup, 1), "batch1_decode_tok_s": round(b1, 1),
        "throughput_requests": ns.num_requests, "input_len": ns.input_len,
        "output_len": ns.output_len, "throughput_out_tok_s": round(n2 / dt2, 1),
        "throughput_total_s": round(dt2, 2), "throughput_steps": steps2,
        "pool_pages": engine.startup.kv_pages_total,
    }
    print("\n| metric | value |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v} |")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
