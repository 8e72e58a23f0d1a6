"""Batch-1 decode: where the time of one step goes in the v2 loop (prints one table per model).

For each model shape (random weights, bf16):
  A  the compiled decode step called back to back, each step's sampled token fed to the next on
     the device, no host sync: the device-bound floor of the engine's own step, and the host
     time spent inside the call (dispatch)
  B  LLMEngine.step, overlapped loop (async_scheduling=True), batch 1
  C  LLMEngine.step, synchronous loop (async_scheduling=False), batch 1
  and the kernels per step: instructions of the optimized step program that launch work.

    PYTHONPATH=. python3 benchmarks/step_floor.py qwen2.5-0.5b,llama3.1-8b [--dump DIR]
        [--trace DIR] [--compile-threads N]

--host-outputs adds A and B rows with the decode step's host-facing outputs fresh (the program
before session 58), in place through one executable, and in place with a twin executable per
buffer (jserve/host_outputs.py). --staged adds A3 and
B3: each step's input copied into a fixed device buffer (``staged_input.stage_inputs``), so the step's
CUDA graph sees no moved input. --rows N times the A rows at N decode rows of 300 tokens (the
decode attention's A/Bs at a small batch; B and C stay batch 1).
--dump writes the optimized program of each model's decode step
(``<model>[.<quantization>].decode_step.hlo.txt``; ``hlo_kernels.py`` compares two of them)
for reading its kernels offline; --trace records a profiler trace of 20 steps of A (host and
device timelines: is the call waiting for the device?); --compile-threads overrides how many
step variants start-up compiles at once (an A/B of the GPU autotuner under concurrent compiles).
Command buffers are an XLA flag: run once more with
``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` to compare without them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import re
import time

import jax
import numpy as np

from benchmarks.hlo_kernels import INSTR, NOT_KERNELS, computations
from jserve.builder import EngineArgs, build_engine, default_cache_dir
from jserve.compile_pool import compiler_options, cublas_min_tokens
from jserve.executable_cache import load_again
from jserve.host_outputs import HostOutputStep
from jserve.sampling_params import SamplingParams
from jserve.staged_input import stage_inputs
from jserve.step_program import StepVariant


def count_kernels(hlo_text: str) -> int:
    """Instructions of the ENTRY computation that launch device work (fusions, library calls,
    copies; a command buffer's call counts once: ``hlo_kernels.census`` opens it)."""
    entry, bodies = computations(hlo_text)
    return sum(1 for line in bodies[entry]
               if (m := INSTR.match(line)) and m.group(2) not in NOT_KERNELS)


def decode_inputs(engine, context: int = 300, rows: int = 1) -> list[jax.Array]:
    """The packed buffers of a decode step of ``rows`` sequences at ``context`` (sequence r in
    slot r, pages of its own), whose input tokens are the previous call's rows:
    ``StepLayout.joint`` on the device. The step's page-table entries travel in the diff lists
    of the buffers in turn (a bucket's list holds ceil(T / page_size) + 2R); the last buffer is
    the step to time, its list the last entries again (a diff applied twice changes nothing)."""
    r = engine.runner
    layout = r.layout(r.bucket_for(rows)[0])
    ps = engine.config.cache.page_size
    ibuf, fbuf, f = layout.new_buffers()
    room = len(f["pt_diff"])
    if rows == 1:   # (a small bucket's diff list holds fewer pages: one call's worth)
        context = min(context, room * ps)
    pp = -(-context // ps)
    if 1 + rows * pp > engine.config.cache.num_pages or rows > len(f["seq_lens"]):
        raise ValueError(f"step_floor: {rows} rows x {context} tokens do not fit the engine's pool "
                         "or its bucket")
    entries = np.array([(row, i, 1 + row * pp + i) for row in range(rows) for i in range(pp)], np.int32)
    for row in range(rows):
        last = 1 + row * pp + (context - 1) // ps
        f["positions"][row] = context - 1
        f["slot_mapping"][row] = last * ps + (context - 1) % ps
        f["prev_index"][row] = row              # the token sampled by the previous call, row r
        f["row_slot"][row], f["samples"][row] = row, 1   # slot r: its row of the device slot table
        f["seq_lens"][row] = context
        f["query_start_loc"][row + 1:] = row + 1
    f["num_seqs"][0] = rows
    out = []
    for start in range(0, len(entries), room):
        f["pt_diff"][:] = -1
        chunk = entries[start:start + room]
        f["pt_diff"][:len(chunk)] = chunk
        out.append(jax.device_put(layout.joint(ibuf).copy()))   # (a CPU device_put may alias)
    return out


def floor_a(engine, step=None, n: int = 200, context: int = 300, dump: str | None = None,
            trace: str | None = None, staged=None, rows: int = 1) -> tuple[float, float, float, int]:
    """-> (ms per step, host ms inside the call back to back, host ms of one call on an idle
    device, kernels per step) for the bucket of ``rows`` decode rows (``decode_inputs``);
    ``step`` defaults to the engine's own greedy decode-only variant. ``staged``: a
    ``StagedInputs``: each call's input is the host array copied into its fixed device buffer
    (timed with the call), else one device array."""
    r = engine.runner
    step = step or r._compiled[StepVariant(r.bucket_for(rows)[0], False, True, True)]
    *setup, joint = decode_inputs(engine, context, rows)
    host_joint = np.asarray(joint)

    def arg():
        return joint if staged is None else staged.put(host_joint)

    kv, table, tokens = r.kv, r.slot_table, r._prev_tokens
    for x in setup:   # the page-table entries that the last buffer's diff list cannot hold
        kv, _, table, tokens, *_ = step(r.params, kv, None, table, tokens, x, None)
    for _ in range(6):  # the greedy variant takes no penalty or logit state (None)
        kv, _, table, tokens, *_ = step(r.params, kv, None, table, tokens, arg(), None)
    jax.block_until_ready(tokens)
    host = 0.0
    t0 = time.perf_counter()
    for _ in range(n):
        th = time.perf_counter()
        kv, _, table, tokens, *_ = step(r.params, kv, None, table, tokens, arg(), None)
        host += time.perf_counter() - th
    jax.block_until_ready(tokens)
    dt = (time.perf_counter() - t0) / n
    idle = []
    for _ in range(20):  # the dispatch cost alone: each call starts with the device idle
        jax.block_until_ready(tokens)
        th = time.perf_counter()
        kv, _, table, tokens, *_ = step(r.params, kv, None, table, tokens, arg(), None)
        idle.append(time.perf_counter() - th)
    jax.block_until_ready(tokens)
    if trace:
        with jax.profiler.trace(trace, create_perfetto_trace=True):   # (trace_kernels.py reads it)
            for _ in range(20):
                kv, _, table, tokens, *_ = step(r.params, kv, None, table, tokens, joint, None)
            jax.block_until_ready(tokens)
    r.kv, r.slot_table, r._prev_tokens = kv, table, tokens
    text = step.as_text()
    if dump:
        with open(dump, "w") as fh:
            fh.write(text)
    return dt * 1e3, host / n * 1e3, float(np.median(idle)) * 1e3, count_kernels(text)


def engine_decode(engine, n_tokens: int = 128) -> float:
    """ms per decode step of LLMEngine.step at batch 1 (first token excluded)."""
    vocab = engine.config.model.vocab_size
    rng = np.random.default_rng(0)
    sp = SamplingParams(temperature=0.0, max_tokens=n_tokens + 1, ignore_eos=True)
    best = float("inf")
    for _ in range(2):
        engine.add_request(None, rng.integers(10, vocab, 16).tolist(), sp)
        first, done = None, 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                n = len(out.outputs[0].token_ids)
                if first is None and n:
                    first, done = time.perf_counter(), n
                elif n:
                    last, done_n = time.perf_counter(), n
        best = min(best, (last - first) / (done_n - done) * 1e3)
    return best


def attention_plan(patch: str, default):
    """The GPU attention kernel's ``default_config`` with the decode launch patched:
    ``attn-nosplit`` (one program per item and kv head: no split merge), ``attn-fused-combine``
    (the splits' last program merges them) or ``attn-minblocks1`` (an item splits down to one
    block of keys per program: at batch 1 and 300 tokens 5 splits of one block each, not 3 of
    two)."""
    import dataclasses

    from pallas_kernels.ragged_paged_attention.gpu import GpuPlan

    def patched(*a, **k):
        cfg = default(*a, **k)
        dec = cfg.decode if isinstance(cfg, GpuPlan) else cfg
        change = {"attn-nosplit": {"num_splits": 1, "num_warps": 4},
                  "attn-fused-combine": {"fused_combine": True},
                  "attn-minblocks1": {"min_blocks_per_split": 1}}[patch]
        dec = dataclasses.replace(dec, **change)
        return dataclasses.replace(cfg, decode=dec) if isinstance(cfg, GpuPlan) else dec

    return patched


# A/B patches that set one module constant: name -> (module, constant, value).
MODULE_PATCHES = {
    # quantized matmuls through XLA's fused convert, not the kernel
    "quant-xla": ("pallas_kernels.quant_matmul.api", "MOSAIC_ON_HOPPER", False),
    # the decode kernel with programmatic dependent launch (mgpu_decode)
    "quant-pdl": ("pallas_kernels.quant_matmul.mgpu", "DECODE_PDL", True),
    # the decode kernel's CTAs exit after their stores' SMEM reads
    "quant-exit-ro": ("pallas_kernels.quant_matmul.mgpu", "DECODE_EXIT_READ_ONLY", True),
    # the persistent decode kernel's out^T partials (before session 24)
    "quant-out-t": ("pallas_kernels.quant_matmul.mgpu", "DECODE_STORE_MN", False),
    # the decode kernel's ring in shorter K tiles (deeper: as deep as its SMEM allows, up to 4
    # stages, or 8 with quant-stages8)
    "quant-bk128": ("pallas_kernels.quant_matmul.mgpu", "DECODE_BLOCK_K", 128),
    "quant-bk256": ("pallas_kernels.quant_matmul.mgpu", "DECODE_BLOCK_K", 256),
    "quant-stages8": ("pallas_kernels.quant_matmul.mgpu", "DECODE_MAX_STAGES", 8),
    # 128-row decode units (256-column steps at 16 tokens): half the x tile bytes per weight byte
    "quant-bn128": ("pallas_kernels.quant_matmul.mgpu", "DECODE_BLOCK_N", 128),
    # the o / down projections' split-K sum, residual add and next RMSNorm back in XLA's two
    # kernels (the engine's default since session 37: one Mosaic GPU kernel, residual_norm.py)
    "quant-residual-norm-off": ("pallas_kernels.quant_matmul.api", "RESIDUAL_NORM_ON_HOPPER", False),
    # a decode step's QKV epilogue, RoPE and K/V write back in XLA's kernels (the engine's
    # default since session 38, after a w8a16 projection or a dense one's GEMM: one Mosaic GPU
    # kernel, rope_write.py)
    "rope-write-off": ("pallas_kernels.kv_write.api", "ROPE_WRITE_ON_HOPPER", False),
    "rope-write-dense-off": ("pallas_kernels.kv_write.api", "ROPE_WRITE_DENSE_ON_HOPPER", False),
    # the MLP's gate/up back in the split-K decode kernel and XLA's sum, scale and SiLU gate (the
    # engine's default since session 40: one kernel with the gate in its epilogue, gated.py)
    "silu-gate-off": ("pallas_kernels.quant_matmul.api", "SILU_GATE_ON_HOPPER", False),
    # the gate epilogue's step issues both tiles' wgmmas before one wait (gated.py's paired_wait)
    "gated-paired-wait": ("pallas_kernels.quant_matmul.mgpu", "GATED_PAIRED_WAIT", True),
    # the persistent decode kernel's accumulator without a step's wgmmas left in flight (the
    # default since session 43 keeps them: mgpu_decode's async_acc, its ring 4 deep at 16 tokens)
    "quant-async-off": ("pallas_kernels.quant_matmul.mgpu", "DECODE_ASYNC", False),
    # a CTA's units of one tile each stored as a partial of its own, as before session 54 (the
    # default sums a CTA's run of one tile's units in one carry: mgpu_decode's tile_runs)
    "quant-tile-runs-off": ("pallas_kernels.quant_matmul.mgpu", "DECODE_TILE_RUNS", False),
    # int8 weights with an f16 x (a float16 model) converted by Mosaic GPU's per-element int8 ->
    # f16 convert in the decode and gate kernels, as before session 46 (the default assembles the
    # f16 from the byte's bits: mgpu_decode.dequant_tile)
    "quant-int8-f16-bits-off": ("pallas_kernels.quant_matmul.mgpu", "DECODE_INT8_F16_BITS", False),
    # an int8 / fp8 pool's RoPE and quantizing K/V write in one Triton kernel (gpu_rope_quant.py)
    "rope-write-quant-on": ("pallas_kernels.kv_write.api", "ROPE_WRITE_QUANT_ON_GPU", True),
    # the direct decode attention launch and its combine read num_seqs, query_start_loc and
    # seq_lens in three dependent rounds of loads (one round by default since session 43)
    "attn-meta-three-rounds": ("pallas_kernels.ragged_paged_attention.gpu_splits", "DIRECT_ONE_ROUND", False),
    # an int8 / fp8 pool's unsplit decode launch at head_dim >= 128 is one launch of N keys per
    # step (by default, head_dim 128: a 64-key launch with a 128-key twin, picked by the live
    # count; gpu_config.QUANT_DECODE_KEYS)
    "attn-quant-keys-64": ("pallas_kernels.ragged_paged_attention.gpu_config", "QUANT_DECODE_KEYS", 64),
    "attn-quant-keys-128": ("pallas_kernels.ragged_paged_attention.gpu_config", "QUANT_DECODE_KEYS", 128),
    "attn-quant-keys-32": ("pallas_kernels.ragged_paged_attention.gpu_config", "QUANT_DECODE_KEYS", 32),
    # an int8 pool's K / V converted by Triton's cvt at 128 keys per step (the default until
    # session 49), not by bit assembly with fp8's narrow / wide pair of decode launches
    "attn-int8-f16-bits-off": ("pallas_kernels.ragged_paged_attention.gpu_config", "INT8_KV_F16_BITS", False),
    # an unsplit decode launch without the split twin that serves few live sequences (a mixed
    # step's decodes in a large bucket; on since session 49)
    "attn-split-twin-off": ("pallas_kernels.ragged_paged_attention.gpu_config", "DECODE_SPLIT_TWIN", False),
}


def ab_cache_dir(tag: str) -> str:
    """A compilation cache folder of its own for engines built while an in-process A/B (a patch,
    a module constant) is in effect (benchmark only). The engine's stored step executables
    (jserve/executable_cache.py) are keyed by its configuration and source, not by module
    constants a benchmark sets, so such an engine in the default folder loads the programs an
    unpatched one stored (session 43: kv_dtype_step's fp8+rope-write-quant-on arm ran the fp8
    arm's executable, without the fused kernel, in sessions 42 and 43)."""
    return os.path.join(default_cache_dir(), "ab", re.sub(r"[^A-Za-z0-9_.=-]+", "+", tag))


@contextlib.contextmanager
def module_constant(module, name: str, value: object):
    """``module.name`` set to ``value`` inside the block, put back after (benchmark only)."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


@contextlib.contextmanager
def patched(patch: str):
    """One named A/B patch of the decode step in effect while compiling; yields the compile
    options it needs (benchmark only)."""
    import pallas_kernels.kv_write.api as kv_write_api

    if patch == "kv-write-kernel":  # the Pallas K/V write (one launch) instead of two XLA scatters
        saved = kv_write_api.GPU_KERNEL_MIN_TOKENS
        kv_write_api.GPU_KERNEL_MIN_TOKENS = 1
        try:
            yield None
        finally:
            kv_write_api.GPU_KERNEL_MIN_TOKENS = saved
    elif patch in ("attn-nosplit", "attn-fused-combine", "attn-minblocks1"):   # the decode attention's plan
        from pallas_kernels.ragged_paged_attention import gpu as attn_gpu

        default = attn_gpu.default_config
        attn_gpu.default_config = attention_plan(patch, default)
        try:
            yield None
        finally:
            attn_gpu.default_config = default
    elif patch in MODULE_PATCHES:   # a module constant of the kernels, set while compiling
        path, name, value = MODULE_PATCHES[patch]
        with module_constant(importlib.import_module(path), name, value):
            yield None
    elif patch.startswith("xla:"):  # XLA debug options for this compile, e.g. xla:NAME=false
        from benchmarks.compile_ab import options

        yield options(patch[4:])
    else:
        raise ValueError(f"unknown A/B patch {patch!r}")


@contextlib.contextmanager
def read_first(engine):
    """The loop's order before session 15, as an A/B (benchmark only): a finished step in
    flight is read right after scheduling, before the next launch, instead of after it."""
    from jserve.step_handle import StepHandle

    plain = engine.scheduler.schedule

    def schedule():
        out = plain()
        h = engine._in_flight
        if isinstance(h, StepHandle) and h.tokens.is_ready():
            h.tokens = np.asarray(h.tokens)
        return out

    engine.scheduler.schedule = schedule
    try:
        yield
    finally:
        engine.scheduler.schedule = plain


def engine_options(engine, variant) -> dict:
    """The XLA options the engine compiled ``variant`` with (``compile_pool.compiler_options``):
    an A/B's arm must differ from the engine's program only by its patch (session 37: without
    them the 8B's bf16 recompile took XLA's autotuned Triton GEMMs instead of cuBLAS)."""
    return compiler_options(variant.tokens, jax.default_backend() == "gpu",
                            cublas_min_tokens(engine.runner.config.model.hidden_size))


def _recompiled(engine, variant, patch: str):
    """The engine's ``variant`` compiled again, with the engine's options, under named A/B
    patches joined by ``/``."""
    with contextlib.ExitStack() as stack:
        opts = [stack.enter_context(patched(p)) for p in patch.split("/")]
        merged = engine_options(engine, variant)
        merged.update({k: v for o in opts if o for k, v in o.items()})
        # The patches act at trace time: drop the traces cached before them (the nested-jit
        # layer among them; session 15's first dk call recompiled the cached trace: 1 s, and
        # the kernel counts did not move), and again after, so later compiles see no patch.
        jax.clear_caches()
        try:
            return engine.runner.wrap_compiled(
                variant, engine.runner.lower_step(variant).compile(compiler_options=merged or None))
        finally:
            jax.clear_caches()


def host_output_arms(engine, decode: StepVariant) -> dict:
    """The A/B arms of the decode step's host-facing outputs (jserve/host_outputs.py): the
    program before session 58 (fresh outputs: they move whenever the previous one is held), in
    place through one executable (its two buffers alternate in one CUDA graph), and in place
    with a twin executable per buffer (each graph sees one address)."""
    r = engine.runner
    fresh = r.lower_step(decode, host_out=False).compile(engine_options(engine, decode) or None)
    exe = r._compiled[decode].executables[0]
    buffers = functools.partial(r.host_buffers, decode)
    arms = {"host outputs fresh (before session 58)": fresh,
            "host outputs in place, one executable": HostOutputStep((exe,), buffers)}
    if jax.default_backend() != "cpu":   # (XLA:CPU's loaded programs fail to run: no twin there)
        arms["host outputs in place, twin executables"] = HostOutputStep((exe, load_again(exe)), buffers)
    return arms


def probe(model: str, dump_dir: str | None = None, trace_dir: str | None = None,
          ab: tuple[str, ...] = (), max_tokens: int = 64, quantization: str | None = None,
          host_outputs: bool = False, staged: bool = False, rows: int = 1, dtype: str = "bfloat16") -> None:
    res = {}
    t0 = time.perf_counter()
    lm_head = quantization is not None and quantization.endswith("+lm_head")   # quantize_lm_head
    eng = build_engine(EngineArgs(model=model, random_weights=True, dtype=dtype,
                                  max_num_seqs=min(16, max_tokens), max_num_batched_tokens=max_tokens,
                                  max_model_len=1024, num_pages=512, quantize_lm_head=lm_head,
                                  quantization=quantization.removesuffix("+lm_head") if lm_head
                                  else quantization),
                       progress=lambda line: print("  " + line, flush=True))
    build_s = time.perf_counter() - t0
    tag = (model.replace("/", "_") + (f".{quantization}" if quantization else "")
           + f".{dtype}" * (dtype != "bfloat16"))
    dump = f"{dump_dir}/{tag}.decode_step.hlo.txt" if dump_dir else None
    trace = f"{trace_dir}/{tag}" if trace_dir else None
    res["A"] = floor_a(eng, dump=dump, trace=trace, rows=rows)
    t = eng.runner.bucket_for(rows)[0]
    extra = {"A' greedy variant with prefill launches (before: decode steps ran it)":
             eng.runner._compiled[StepVariant(t, False, True, False)]}
    for patch in ab:
        tc = time.perf_counter()
        try:
            fn = _recompiled(eng, StepVariant(t, False, True, True), patch)
        except Exception as e:  # noqa: BLE001 - report the failed patch, keep the run going
            print(f"  A/B patch {patch} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        extra[f"A + {patch} (recompiled in {time.perf_counter() - tc:.0f} s)"] = fn
    decode = StepVariant(t, False, True, True)
    arms = host_output_arms(eng, decode) if host_outputs else {}
    extra.update({f"A {name}": fn for name, fn in arms.items()})
    extra_res = {name: floor_a(eng, step=fn, rows=rows) for name, fn in extra.items()}
    for key, overlap in (("B", True), ("C", False)):
        eng._overlap = overlap   # the async_scheduling option, toggled on one engine (benchmark only)
        res[key] = engine_decode(eng)
    eng._overlap = True
    own = eng.runner._compiled[decode]
    for name, fn in arms.items():   # the engine's loop with the arm's decode step
        eng.runner._compiled[decode] = fn
        res[f"B {name}"] = engine_decode(eng)
    eng.runner._compiled[decode] = own
    with read_first(eng):
        res["B5"] = engine_decode(eng)
    if staged:   # the step input copied into a fixed device buffer (jserve/staged_input.py)
        eng._overlap = True
        stage_inputs(eng.runner)
        res["B3"] = engine_decode(eng)
        res["A3"] = floor_a(eng, staged=eng.runner.staged_inputs, rows=rows)
    p_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(eng.runner.params))
    leaves = len(jax.tree_util.tree_leaves(eng.runner.params)) + 2 * len(eng.runner.kv) + 4
    del eng
    floor = p_bytes / 3.3e12 * 1e3
    print(f"\n## {model}, weights {quantization or 'bf16'} ({jax.devices()[0].device_kind}): "
          f"{p_bytes / 1e9:.2f} GB; "
          f"{leaves} arrays per step call; HBM floor at 3.3 TB/s = {floor:.2f} ms/step; "
          f"engine build {build_s:.1f} s; A rows: {rows} decode rows at 300 tokens")
    print("| path | ms/step | tok/s | host ms in the call, back to back | host ms of one call, "
          "device idle | kernels per step |")
    print("|---|---|---|---|---|---|")
    rows = {"A compiled greedy decode step back to back, device-fed, no sync": res["A"], **extra_res}
    for name, (ms, host, idle, kernels) in rows.items():
        print(f"| {name} | {ms:.3f} | {1e3 / ms:.0f} | {host:.3f} | {idle:.3f} | {kernels} |")
    print(f"| B LLMEngine.step, overlapped | {res['B']:.3f} | {1e3 / res['B']:.0f} | | | |")
    print(f"| C LLMEngine.step, synchronous | {res['C']:.3f} | {1e3 / res['C']:.0f} | | | |", flush=True)
    print(f"| B5 as B, a finished step read before the next launch (the order before session 15) | "
          f"{res['B5']:.3f} | {1e3 / res['B5']:.0f} | | | |", flush=True)
    for name in arms:
        print(f"| B {name} | {res[f'B {name}']:.3f} | {1e3 / res[f'B {name}']:.0f} | | | |", flush=True)
    if "B3" in res:
        ms, host, idle, kernels = res["A3"]
        print(f"| A3 as A, a numpy input staged into a fixed device buffer each call | {ms:.3f} | "
              f"{1e3 / ms:.0f} | {host:.3f} | {idle:.3f} | {kernels} |")
        print(f"| B3 LLMEngine.step, overlapped, inputs staged | {res['B3']:.3f} | "
              f"{1e3 / res['B3']:.0f} | | | |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", help="comma list of named shapes or model directories")
    ap.add_argument("--dump", default=None, help="folder for the decode step's optimized program")
    ap.add_argument("--trace", default=None, help="folder for a profiler trace of 20 steps of A")
    ap.add_argument("--ab", default="", help="comma list of A/B patches of the decode step to "
                    "recompile and time beside it (several joined by /): kv-write-kernel, attn-nosplit, "
                    "attn-fused-combine, attn-minblocks1, xla:OPTION=VALUE, " + ", ".join(MODULE_PATCHES))
    ap.add_argument("--max-num-batched-tokens", type=int, default=64,
                    help="the engine's largest token bucket (16: one bucket, the fewest compiles)")
    ap.add_argument("--compile-threads", type=int, default=None,
                    help="step variants compiled at once at start-up (default: the runner's choice)")
    ap.add_argument("--quantization", default="none",
                    help="comma list of weight quantizations to probe in turn: none, int8, fp8, "
                         "fp8_w8a8, each with '+lm_head' for quantize_lm_head (int8+lm_head)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"),
                    help="the model's activation dtype (float16: int8 weights meet an f16 x)")
    ap.add_argument("--host-outputs", action="store_true",
                    help="also time A and B with the decode step's host outputs fresh (before session "
                    "58), in place through one executable, and in place with twin executables")
    ap.add_argument("--rows", type=int, default=1,
                    help="decode rows of the A rows' step (300 tokens each; B and C stay batch 1)")
    ap.add_argument("--staged", action="store_true",
                    help="also time A3 and B3: each step's input staged into a fixed device buffer")
    ns = ap.parse_args()
    if ns.compile_threads is not None:
        from jserve.runner import Runner

        Runner.compile_threads = lambda self: ns.compile_threads  # benchmark A/B only
    for m in ns.models.split(","):
        for q in ns.quantization.split(","):
            probe(m, ns.dump, ns.trace, tuple(p for p in ns.ab.split(",") if p), ns.max_num_batched_tokens,
                  None if q == "none" else q, host_outputs=ns.host_outputs, staged=ns.staged,
                  rows=ns.rows, dtype=ns.dtype)


if __name__ == "__main__":
    main()
