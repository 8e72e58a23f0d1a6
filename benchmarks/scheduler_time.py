"""Host time of the scheduler alone: ``Scheduler.schedule`` + ``update`` per step with N decoding
rows and no model (the overlapped loop's shape: one step in flight, its tokens fed back one step
later). Prints one line for benchmarks/RESULTS.md (median over the steps of a run, best of 5).

    PYTHONPATH=. python3 benchmarks/scheduler_time.py [--rows 256] [--spec draft_model|ngram]

``--spec``: the scheduler of a speculating engine (k = 4, the default ``disable_by_batch_size``)
under the same load, where speculation is off above the threshold: its host cost beside the
plain scheduler's (issue 12's >= 0.95x at 256 running).
"""

from __future__ import annotations

import argparse
import statistics
import time

from jserve.config import SchedulerConfig
from jserve.page_pool import PagePool
from jserve.request import Request
from jserve.sampling_params import SamplingParams
from jserve.scheduler import Scheduler
from jserve.scheduler_output import RunnerOutput
from jserve.spec.config import SpeculativeConfig


def one_run(rows: int, prompt_len: int, max_tokens: int, spec: str | None = None) -> tuple[float, float]:
    """-> median (schedule, update) seconds per step of one run to completion."""
    pages = rows * (-(-(prompt_len + max_tokens) // 16) + 2) + 1
    sc = None if spec is None else SpeculativeConfig(method=spec, num_speculative_tokens=4,
                                                     model="code-draft" if spec == "draft_model" else None)
    sched = Scheduler(SchedulerConfig(max_num_seqs=rows, max_num_batched_tokens=max(2048, rows),
                                      max_model_len=prompt_len + max_tokens), PagePool(pages, 16), sc)
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i in range(rows):
        sched.add_request(Request(f"r{i}", list(range(1, prompt_len + 1)), sp))
    prev, t_sched, t_update = None, [], []
    while True:
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        if prev is not None:
            sched.update(prev, RunnerOutput([[7] if c.samples else [] for c in prev.chunks]))
        t_sched.append(t1 - t0)
        t_update.append(time.perf_counter() - t1)
        prev = out if out.chunks else None
        if prev is None and not sched.num_running and not sched.num_waiting:
            return statistics.median(t_sched), statistics.median(t_update)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=100)
    ap.add_argument("--spec", choices=("draft_model", "ngram"), default=None,
                    help="also time a speculating engine's scheduler (k = 4) under the same load")
    ns = ap.parse_args()
    for spec in (None, ns.spec) if ns.spec else (None,):
        runs = [one_run(ns.rows, ns.prompt_len, ns.max_tokens, spec) for _ in range(5)]
        s, u = min(r[0] for r in runs), min(r[1] for r in runs)
        print(f"| {ns.rows} rows, {spec or 'no speculation'} | schedule {1e3 * s:.3f} ms | update "
              f"{1e3 * u:.3f} ms | per step, median of a run's steps, best of 5 |", flush=True)


if __name__ == "__main__":
    main()
