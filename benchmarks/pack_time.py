"""Host packing time of one decode step (``Runner.pack`` over a recorded plan).

Builds the tiny golden llama (the model does not matter: packing is host work over the plan),
records the plan of a decode step of ``--rows`` requests (steady state: every row one token
over its placeholder, most without a page change) and times ``Runner.pack`` on it in a loop.
Not a test.

    PYTHONPATH=. python3 benchmarks/pack_time.py [--rows 1] [--max-model-len 2048] [--iters 20000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from jserve.builder import EngineArgs, build_engine
from jserve.sampling_params import SamplingParams

GOLDEN_LLAMA = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "golden" / "llama"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--rows", type=int, default=1)
    a = ap.parse_args()
    if a.rows > 1:
        return many_rows(a)
    engine = build_engine(EngineArgs(model=str(GOLDEN_LLAMA), dtype="float32",
                                     max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                                     max_num_batched_tokens=64, num_pages=512))
    runner = engine.runner
    plans = []
    dispatch = runner.dispatch

    def recording(out):
        plans.append(out)
        return dispatch(out)

    runner.dispatch = recording
    engine.add_request(None, list(range(5, 40)), SamplingParams(temperature=0.0, max_tokens=12,
                                                                ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    # a decode step of a request still held: replay it against a fresh hold of the same request
    plan = next(p for p in plans[3:] if len(p.chunks) == 1 and p.chunks[0].new is None)
    first = plans[0]
    runner.rows.drop([first.chunks[0].req_id])
    runner.pack(first)  # takes the slot again
    for _ in range(100):
        runner.pack(plan)
    per = []  # 50 timed rounds: the minimum and median resist other load on the host
    for _ in range(50):
        t0 = time.perf_counter()
        for _ in range(a.iters // 50):
            runner.pack(plan)
        per.append((time.perf_counter() - t0) / (a.iters // 50) * 1e6)
    print(f"pages per seq {runner.config.pages_per_seq}, rows bucket "
          f"{runner.bucket_for(plan.num_tokens)[1]}: runner.pack per batch-1 decode step: "
          f"min {min(per):.1f} us, median {float(np.median(per)):.1f} us")


def many_rows(a: argparse.Namespace) -> None:
    """``--rows`` > 1: N requests decoding; a steady plan is replayed while they are held."""
    engine = build_engine(EngineArgs(model=str(GOLDEN_LLAMA), dtype="float32", max_model_len=512,
                                     max_num_seqs=a.rows, max_num_batched_tokens=max(2048, a.rows),
                                     num_pages=a.rows * 34 + 1))
    runner = engine.runner
    plans = []
    dispatch = runner.dispatch
    runner.dispatch = lambda out: (plans.append(out), dispatch(out))[1]
    for _ in range(a.rows):
        engine.add_request(None, list(range(5, 45)), SamplingParams(temperature=0.0, max_tokens=400,
                                                                    ignore_eos=True))
    while not plans or len(plans[-1].chunks) < a.rows or any(
            c.new is not None or c.num_tokens != 1 for c in plans[-1].chunks):
        engine.step()
    for _ in range(3):   # past the step that completed the prompts' last pages
        engine.step()
    plan = min(plans[-3:], key=lambda p: sum(bool(c.page_ids) for c in p.chunks))
    iters = max(50, a.iters // a.rows)
    for _ in range(10):
        runner.pack(plan)
    per = []
    for _ in range(20):
        t0 = time.perf_counter()
        for _ in range(iters // 20):
            runner.pack(plan)
        per.append((time.perf_counter() - t0) / (iters // 20) * 1e6)
    print(f"{a.rows} decode rows ({sum(bool(c.page_ids) for c in plan.chunks)} with a page change): "
          f"runner.pack min {min(per):.1f} us, median {float(np.median(per)):.1f} us")


if __name__ == "__main__":
    main()
