"""Host packing time of one batch-1 decode step (``Runner.pack`` over a recorded plan).

Builds the tiny golden llama (the model does not matter: packing is host work over the plan),
records the plan of a batch-1 decode step and times ``Runner.pack`` on it in a loop. Not a test.

    PYTHONPATH=. python3 benchmarks/pack_time.py [--max-model-len 2048] [--iters 20000]
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
    a = ap.parse_args()
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


if __name__ == "__main__":
    main()
