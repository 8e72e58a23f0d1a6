"""Bursts (``num_scheduler_steps``) against one step at a time, batch 1 and a few rows.

One engine per model, built with ``--steps`` N (so the burst program is compiled at start-up);
the rows without bursts run the same engine with the scheduler's burst decision pinned to 1
(benchmark only), so both columns share the machine, the compile and the pool. Greedy, random
weights, ``--tokens`` tokens per request, the first token excluded; tokens are checked equal.

    PYTHONPATH=. python3 benchmarks/burst_decode.py code-small [--steps 8]

One model per process: a finished engine's pool stays allocated in its process, so a second
model's memory budget would find none.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from jserve.builder import EngineArgs, build_engine
from jserve.sampling_params import SamplingParams


def decode(engine, rows: int, tokens: int) -> tuple[float, list]:
    """Out tokens per second of ``rows`` requests decoding ``tokens`` each (after the first
    token of every row), and their token ids."""
    rng = np.random.default_rng(0)
    sp = SamplingParams(temperature=0.0, max_tokens=tokens + 1, ignore_eos=True)
    vocab = engine.config.model.vocab_size
    ids = [engine.add_request(None, rng.integers(10, vocab, 16).tolist(), sp) for _ in range(rows)]
    done, t0 = {}, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if t0 is None:   # the first token out: prefill done, decoding from here
                t0 = time.perf_counter()
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    dt = time.perf_counter() - t0
    return rows * tokens / dt, [done[i] for i in ids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", help="a model, or a comma list with --num-pages set")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    a = ap.parse_args()
    for model in a.models.split(","):
        t = time.perf_counter()
        eng = build_engine(EngineArgs(model=model, random_weights=True, dtype="bfloat16", max_num_seqs=16,
                                      max_num_batched_tokens=16, max_model_len=1024,
                                      gpu_memory_utilization=a.gpu_memory_utilization,
                                      num_scheduler_steps=a.steps))
        build = time.perf_counter() - t
        burst = eng.scheduler._burst
        one = eng.runner.steps.burst(a.steps)._replace(burst=1)
        for v in (one, eng.runner.steps.burst(a.steps)):   # what each program allocates
            m = eng.runner._compiled[v].memory_analysis()
            print(f"  {'burst' if v.burst > 1 else 'decode step'}: temp {m.temp_size_in_bytes / 2**20:.1f} "
                  f"MiB, outputs {m.output_size_in_bytes / 2**20:.1f} MiB, aliased "
                  f"{m.alias_size_in_bytes / 2**20:.1f} MiB", flush=True)
        print(f"\n## {model}: bursts of {a.steps} against one step at a time (engine build {build:.0f} s)")
        print("| rows | one step at a time, out tok/s | bursts, out tok/s | speed-up | tokens equal |")
        print("|---|---|---|---|---|")
        for rows in (int(r) for r in a.rows.split(",")):
            res = {}
            for on in (False, True, False, True):   # twice each, the better run kept
                eng.scheduler._burst = burst if on else (lambda: 1)
                tps, toks = decode(eng, rows, a.tokens)
                if on not in res or tps > res[on][0]:
                    res[on] = (tps, toks)
            eng.scheduler._burst = burst
            (off, toks_off), (on, toks_on) = res[False], res[True]
            print(f"| {rows} | {off:.0f} | {on:.0f} | {on / off:.2f}x | {toks_on == toks_off} |", flush=True)
        del eng


if __name__ == "__main__":
    main()
