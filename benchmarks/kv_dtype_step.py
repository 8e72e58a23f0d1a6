"""Decode step time at a long context with a bf16, fp8 or int8 KV pool (issue 13's KV target:
fp8 KV holds 2x the pages at <= 3% extra step time at 8k context).

For each ``--kv-dtypes`` entry, in one process: build the engine (random weights, the same
memory share), fill ``--batch`` sequences to ``--context`` tokens (random prompts, chunked
prefill), then time ``--steps`` greedy decode steps of all of them (``LLMEngine.step``, the
overlapped loop; the median of 4 runs of the steps), and the engine's own compiled decode step
called back to back on the input of one real decode step (device-fed: each call's tokens feed the
next, no host sync; the median of 4 runs), which the host's scheduling and packing cannot blur
(session 41, H200: the engine column moved 2.4-3.8 ms between arms of one call, host-bound).
Prints one table: pool pages, sequences of ``--context`` tokens that fit, ms per decode step
both ways and their ratios to the first entry's::

    PYTHONPATH=. python3 benchmarks/kv_dtype_step.py [--model qwen2.5-0.5b] [--context 8192]
        [--batch 16] [--kv-dtypes auto,fp8,int8,fp8+rope-write-quant-on]

An entry ``KV+PATCH`` builds that pool with one of ``step_floor.py``'s A/B patches in effect
(several joined by ``/``), e.g. ``fp8+rope-write-quant-on``.

``--mixed P`` times mixed steps instead: once every sequence decodes, prompts of P tokens queue
behind them (``max_tokens`` 1; by default ``max_num_seqs`` admits two at a time), so each timed
step carries the ``--batch`` long-context decodes beside a prefill chunk that fills the token
budget, in the budget's bucket. Its row bucket is the smaller of that bucket and
``--max-num-seqs``: the decode kernel's split twin serves a large row bucket's few decodes (the
8B: 33 rows or more), so its A/B needs a serving-sized ``max_num_seqs`` (session 51: at the
default, 10 rows, the twin does not exist and the A/B measured noise): ``--kv-dtypes
auto,auto+attn-split-twin-off --batch 8 --mixed 4096 --max-num-seqs 256``.

Qwen2.5-0.5B at 16 x 8k reads ~1.6 GB of bf16 K/V per step against 1 GB of weights, so the
attention's page reads (and their dequantization) dominate the step.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from collections import defaultdict
from pathlib import Path

import jax
import numpy as np

from benchmarks.device_clock import read_trace
from benchmarks.step_floor import ab_cache_dir, patched
from jserve.builder import EngineArgs, build_engine
from jserve.sampling_params import SamplingParams
from jserve.step_program import StepVariant


def device_fed(eng, steps: int, trace: str | None = None, mixed: bool = False
               ) -> tuple[float, StepVariant]:
    """(median ms per call, the variant) of the engine's step called back to back (``steps``
    calls, 4 runs) on the packed input of one real step (``LLMEngine.step``, recorded): a greedy
    decode step, or with ``mixed`` a step whose prefill chunk every call writes again (large
    buckets have no greedy variant, so it samples as the engine does there);
    the pool, slot table and tokens threaded from call to call as the engine does; every call
    writes the same slots and reads the same context. The engine's state is put back after (its
    requests can finish)."""
    r = eng.runner
    originals, seen = dict(r._compiled), []

    def recorder(variant, f):
        def call(*args):
            seen.append((variant, np.asarray(args[5]), args[6]))
            return f(*args)
        return call

    r._compiled.update({v: recorder(v, f) for v, f in originals.items()})
    try:
        eng.step()
    finally:
        r._compiled.update(originals)
    variant, host_joint, masks = seen[-1]
    if variant.burst != 1 or variant.fresh_prefill or not (variant.greedy or mixed):
        raise RuntimeError(f"device_fed: the engine's last step ran variant {variant}, not a greedy step "
                           "with context")
    step, joint = originals[variant], jax.device_put(host_joint)
    jax.block_until_ready(r._prev_tokens)
    # (the sampling variants of large buckets take the penalty state, donated, and return it)
    state = (r.kv, None if variant.greedy else r.penalty_state, r.slot_table, r._prev_tokens)

    def run(n: int) -> float:   # n calls back to back -> ms per call
        nonlocal state
        kv, pen, table, tokens = state
        t0 = time.perf_counter()
        for _ in range(n):
            kv, pen, table, tokens, *_ = step(r.params, kv, pen, table, tokens, joint, masks)
        jax.block_until_ready(tokens)
        state = (kv, pen, table, tokens)
        return (time.perf_counter() - t0) / n * 1e3

    runs = [run(steps) for _ in range(5)]   # the first run warms up
    if trace:
        jax.profiler.start_trace(trace, create_perfetto_trace=True)
        try:
            run(8)
        finally:
            jax.profiler.stop_trace()
        print_kernels(read_trace(trace).kernels, 8)
    r.kv, pen, r.slot_table, r._prev_tokens = state
    if pen is not None:
        r.penalty_state = pen
    return statistics.median(runs[1:]), variant


def print_kernels(kernels: list[tuple[float, float, str]], calls: int, top: int = 8) -> None:
    """The heaviest kernels of ``calls`` device-fed steps: us and launches per step."""
    us: dict[str, float] = defaultdict(float)
    n: dict[str, int] = defaultdict(int)
    for _, dur, name in kernels:
        us[name[:60]] += dur
        n[name[:60]] += 1
    print(f"    device clock: {sum(us.values()) / calls:.1f} us of kernels per step")
    for name, t in sorted(us.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    | {name} | {t / calls:.1f} us | {n[name] / calls:.1f} launches |")


def one(model: str, kv: str, context: int, batch: int, steps: int, dump: str | None = None,
        trace: str | None = None, cache_dir: str | None = None,
        mixed: int = 0, max_num_seqs: int = 0) -> tuple[int, float, float, int]:
    """-> (pool pages, median ms per step of the engine, the same device-fed (``device_fed``),
    page size) for one KV dtype; ``dump``: a folder for the timed step's optimized program
    (``<kv>.decode_step.hlo.txt``, for ``hlo_kernels.py``); ``cache_dir``: the engine's
    compilation cache (None: the default); ``mixed``: > 0, every timed step also prefills a
    chunk of queued prompts of that many tokens (the module's ``--mixed``); ``max_num_seqs``: the
    engine's (0: ``batch``, plus 2 with ``mixed``)."""
    budget = 2048
    # Every sequence decodes to the end: the first prompts decode while the last are prefilled
    # (~batch x context / budget steps), then the 4 + 4 x steps timed steps and device_fed's one
    # (the earliest sequences end ~batch x context / budget tokens past the context).
    room = -(-batch * context // budget) + 5 * steps + 32
    eng = build_engine(EngineArgs(model=model, random_weights=True, dtype="bfloat16",
                                  kv_cache_dtype=kv,
                                  max_num_seqs=max_num_seqs or batch + 2 * (mixed > 0),
                                  max_num_batched_tokens=budget, max_model_len=max(context + room, mixed + 1),
                                  compilation_cache_dir=cache_dir))
    rng = np.random.default_rng(0)
    vocab = eng.config.model.vocab_size
    long = [eng.add_request(None, rng.integers(10, vocab, context).tolist(),
                            SamplingParams(temperature=0.0, max_tokens=room, ignore_eos=True))
            for _ in range(batch)]
    decoding: set[str] = set()
    while len(decoding) < batch:   # prefill (chunked) until every sequence decodes
        decoding.update(o.request_id for o in eng.step() if o.outputs[0].token_ids)
    if mixed:   # enough queued prompts to put a prefill chunk in every step left (two admitted at
        #         a time: the next starts in the step that ends the last one's prefill)
        chunk = budget - batch
        for _ in range(-(-(5 * steps + 8) * chunk // mixed) + 1):
            eng.add_request(None, rng.integers(10, vocab, mixed).tolist(),
                            SamplingParams(temperature=0.0, max_tokens=1))
    for _ in range(4):
        eng.step()
    runs = []
    for _ in range(4):
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        runs.append((time.perf_counter() - t0) / steps * 1e3)
    running = sum(eng.scheduler.get_request(i) is not None for i in long)
    if running != batch:   # (session 42: finished sequences made the "64 at 8k" rows a dozen)
        raise RuntimeError(f"kv_dtype_step: {running} of {batch} sequences still decoding at the timing")
    fed, variant = device_fed(eng, steps, trace and str(Path(trace, kv)), bool(mixed))
    if mixed and variant.tokens <= eng.runner.bucket_for(batch)[0]:   # (the decodes' own bucket)
        raise RuntimeError(f"kv_dtype_step: the device-fed step ran {variant}, with mixed={mixed}")
    pages, page_size = eng.startup.pool_plan.num_pages, eng.config.cache.page_size
    if dump:
        Path(dump, f"{kv}.decode_step.hlo.txt").write_text(eng.runner._compiled[variant].as_text())
    while eng.has_unfinished_requests():
        eng.step()
    del eng
    gc.collect()
    return pages, statistics.median(runs), fed, page_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--kv-dtypes", default="auto,fp8")
    ap.add_argument("--dump", default=None, help="folder for each decode step's optimized program")
    ap.add_argument("--trace", default=None, help="folder for a profiler trace of each device-fed step")
    ap.add_argument("--mixed", type=int, default=0, help="> 0: time mixed steps, the decodes beside "
                    "a prefill chunk of queued prompts of this many tokens")
    ap.add_argument("--max-num-seqs", type=int, default=0, help="the engine's (0: --batch, plus 2 "
                    "with --mixed); the row bucket of a mixed step is the smaller of its token "
                    "bucket and this")
    ns = ap.parse_args()
    rows = []
    for entry in ns.kv_dtypes.split(","):
        kv, _, ab = entry.partition("+")
        jax.clear_caches()   # (the nested layer jit keeps the traces, and kernel choices, of the last)
        with contextlib.ExitStack() as patches:
            for patch in filter(None, ab.split("/")):
                patches.enter_context(patched(patch))
            cache = ab_cache_dir(entry) if ab else None   # patched programs apart from the default's
            rows.append((entry, *one(ns.model, kv, ns.context, ns.batch, ns.steps, ns.dump, ns.trace, cache,
                                     mixed=ns.mixed, max_num_seqs=ns.max_num_seqs)))
        print(f"  {entry}: {rows[-1][1]} pages, {rows[-1][2]:.3f} ms per step, "
              f"{rows[-1][3]:.3f} device-fed", flush=True)
    beside = f", beside a prefill chunk of {ns.mixed}-token prompts" if ns.mixed else ""
    print(f"\n## {ns.model}, {ns.batch} sequences decoding at {ns.context} tokens{beside} "
          f"({jax.devices()[0].device_kind})")
    print("| KV pool | pages | sequences of the context that fit | ms per step (engine) | vs first "
          "| device-fed step | vs first |")
    print("|---|---|---|---|---|---|---|")
    for kv, pages, ms, fed, page_size in rows:
        fit = (pages - 1) // -(-ns.context // page_size)   # page 0 is the null page
        print(f"| {kv} | {pages} | {fit} | {ms:.3f} | {ms / rows[0][2]:.3f}x | {fed:.3f} "
              f"| {fed / rows[0][3]:.3f}x |")


if __name__ == "__main__":
    main()
