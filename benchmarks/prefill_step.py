"""Prefill step benchmark: one fresh-prompt step of the whole model, attention and KV write paths.

Times the jitted model step (``jserve.model.decoder.forward``, random weights of a named shape)
on steps made only of fresh prompts, three ways in the same process:

    before   paged attention (reads the chunk back from the pages) + XLA scatter KV write
    paged    paged attention + the Pallas KV write (the engine's choice below
             ``flash_prefill_min_tokens``)
    triton   flash attention over the chunk's own K/V (the Triton-lowered kernel) + the
             Pallas KV write
    flash    the same with the engine's flash kernel (Mosaic GPU on Hopper; the engine's
             ``fresh_prefill`` variant)

The "first s" column is the first call's wall time (trace, lower, compile, run): the step's
share of engine start-up.

Median of ``--reps`` steps after a warm-up; prints a markdown table. Not a test: numbers go to
benchmarks/RESULTS.md with the GPU name and date.

    PYTHONPATH=. python3 benchmarks/prefill_step.py --model llama3.1-8b
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import numpy as np

from jserve.kv_cache import allocate_kv_cache
from jserve.model.decoder import forward
from jserve.model.params import random_params
from jserve.model.shapes import named_shape
from jserve.step_input import StepInput
from pallas_kernels.flash_attention import api as flash_api
from pallas_kernels.kv_write import api as kv_write_api
from sharding import make_mesh

PAGE = 16


def fresh_step(lens: list[int], vocab: int, rows: int) -> StepInput:
    """A step of ``len(lens)`` fresh prompts packed back to back on consecutive pages."""
    rng = np.random.default_rng(0)
    ids = [rng.integers(10, vocab, n) for n in lens]
    return StepInput.fresh_prompts(ids, sum(lens), rows, max(-(-n // PAGE) for n in lens), PAGE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cases", default="1x8192,4x2048,1x2048", help="comma list of SEQSxLEN")
    ap.add_argument("--reps", type=int, default=5)
    ns = ap.parse_args()
    cfg = named_shape(ns.model, ns.dtype)
    mesh = make_mesh(1)
    params = random_params(cfg, mesh)
    cases = [tuple(int(x) for x in c.split("x")) for c in ns.cases.split(",") if c]
    num_pages = 1 + max(s * -(-n // PAGE) for s, n in cases)
    state = {"kv": allocate_kv_cache(cfg, num_pages, PAGE, ns.dtype, mesh)}
    rows = []
    for seqs, n in cases:
        batch = jax.device_put(fresh_step([n] * seqs, cfg.vocab_size, max(seqs, 8)))
        paths = (("before", False, 1 << 30, True), ("paged", False, 0, True), ("triton", True, 0, False),
                 ("flash", True, 0, True))  # fmt: skip
        for name, fresh, kernel_min, mosaic in paths:
            kv_write_api.GPU_KERNEL_MIN_TOKENS = kernel_min  # A/B of the KV write (traced below)
            flash_api.MOSAIC_ON_HOPPER = mosaic  # A/B of the flash kernel (traced below)
            step = jax.jit(functools.partial(forward, cfg, fresh_prefill=fresh), donate_argnums=(1,))

            def run(step=step, batch=batch) -> None:
                state["kv"], logits = step(params, state["kv"], batch)
                jax.block_until_ready(logits)

            t0 = time.perf_counter()
            run()
            first = time.perf_counter() - t0
            ts = []
            for _ in range(ns.reps):
                t0 = time.perf_counter()
                run()
                ts.append(time.perf_counter() - t0)
            rows.append((f"{seqs}x{n}", name, statistics.median(ts) * 1e3, first))
    dev = jax.devices()[0]
    print(f"\n{getattr(dev, 'device_kind', str(dev))}, {ns.model} {ns.dtype}, fresh-prompt step, "
          f"median of {ns.reps}\n")
    print("| step | path | ms | vs before | first s |\n|---|---|---|---|---|")
    before = {c: ms for c, name, ms, _ in rows if name == "before"}
    for case, name, ms, first in rows:
        print(f"| {case} | {name} | {ms:.2f} | {before[case] / ms:.3f}x | {first:.1f} |")


if __name__ == "__main__":
    main()
