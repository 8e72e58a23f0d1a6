"""Cost of one verification step (1 + k query rows per request) against a 1-token decode step.

The issue's real-scale target: on a Llama-3.1-8B shape (random weights), the device time of a
step whose every request verifies k drafts (the speculative greedy variant: 1 + k tokens per
row, logits and the rejection sampler at every position) relative to the plain greedy decode
step (1 token per row), at each batch size, over a context of each of ``--contexts`` tokens. The steps
are packed by hand (``SchedulerOutput`` values: no scheduler, no proposer) and timed end to end
(dispatch -> tokens on the host), median of ``--iters``.

    PYTHONPATH=. python benchmarks/spec_verify_step.py --model llama3.1-8b --k 4 --batches 1,64

With acceptance rate a per draft (from benchmarks/spec_decode.py), a verify step emits on
average (1 - a^(k+1)) / (1 - a) tokens; the implied speed-up over plain decode is that divided by
(verify cost / decode cost) (draft proposal cost not included: n-gram is host-side and ~free).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from jserve.builder import EngineArgs, build_engine
from jserve.sampling_params import SamplingParams
from jserve.scheduler_output import NewRequestData, ScheduledChunk, SchedulerOutput


def _steps(batch: int, context: int, k: int, page_size: int, first_page: int):
    """(first step with new-request data, steady-state step) for ``batch`` requests each at
    ``context`` computed tokens, verifying k drafts (k = 0: a plain decode row)."""
    sp = SamplingParams(temperature=0.0)
    pages_each = -(-(context + k + 1) // page_size)
    first, steady = [], []
    for r in range(batch):
        rid = f"r{r}"
        pages = tuple(range(first_page + r * pages_each, first_page + (r + 1) * pages_each))
        toks = tuple([100 + r] * (1 + k))
        common = dict(req_id=rid, start=context, num_tokens=1 + k, token_ids=toks, samples=True,
                      num_draft=k)
        first.append(ScheduledChunk(**common, page_start=0, page_ids=pages,
                                    new=NewRequestData(rid, sp, 0)))
        steady.append(ScheduledChunk(**common))
    return SchedulerOutput(chunks=first), SchedulerOutput(chunks=steady), batch * pages_each


def _time(runner, first: SchedulerOutput, steady: SchedulerOutput, iters: int) -> tuple[float, float]:
    """-> (median seconds of one step dispatched and read, seconds per step of ``iters`` steps
    dispatched back to back and read once at the end: the device's time where the host keeps up)."""
    runner.dispatch(first).result()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        runner.dispatch(steady).result()
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    handles = [runner.dispatch(steady) for _ in range(iters)]
    handles[-1].result()
    chained = (time.perf_counter() - t0) / iters
    runner.rows.drop([c.req_id for c in first.chunks])
    return statistics.median(times), chained


def _dump(runner, folder: Path) -> None:
    """The smallest bucket's greedy verify and greedy decode-only programs, optimized HLO."""
    folder.mkdir(parents=True, exist_ok=True)
    t = min(tokens for tokens, greedy in runner.spec_steps._compiled if greedy)
    (folder / "verify.hlo.txt").write_text(runner.spec_steps._compiled[(t, True)].as_text())
    decode = [c for v, c in runner._compiled.items()
              if v.tokens == t and v.greedy and v.decode_only and v.burst == 1]
    (folder / "decode.hlo.txt").write_text(decode[0].as_text())
    print(f"wrote {folder}/verify.hlo.txt and decode.hlo.txt ({t}-token bucket)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--random-weights", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--contexts", default="1024", help="comma list of context lengths (computed tokens)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--draft-model", default=None,
                    help="verify with this draft model's proposals in the step (e.g. code-draft; "
                         "default: n-gram, whose lookup is part of the step)")
    ap.add_argument("--acceptance", default="0.5,0.7,0.8", help="per-draft acceptance rates for "
                    "the implied speed-up column")
    ap.add_argument("--dump", default=None, metavar="DIR",
                    help="write the optimized programs of the smallest bucket's greedy verify "
                         "step and greedy decode step (verify.hlo.txt, decode.hlo.txt) for "
                         "benchmarks/hlo_kernels.py")
    ns = ap.parse_args()
    batches = [int(b) for b in ns.batches.split(",")]
    contexts = [int(c) for c in ns.contexts.split(",")]
    seqs = max(batches)
    engine = build_engine(EngineArgs(
        model=ns.model, random_weights=ns.random_weights, max_num_seqs=seqs,
        max_model_len=max(contexts) + 2 * ns.k + 16, max_num_batched_tokens=max(512, seqs * (1 + ns.k)),
        speculative_config=({"method": "draft_model", "model": ns.draft_model, "num_speculative_tokens": ns.k}
                            if ns.draft_model else {"method": "ngram", "num_speculative_tokens": ns.k})))
    runner, ps = engine.runner, engine.config.cache.page_size
    if ns.dump:
        _dump(runner, Path(ns.dump))
    rates = [float(a) for a in ns.acceptance.split(",")]
    print(f"{ns.model}: k = {ns.k}; median of {ns.iters} steps")
    print(f"{'context':>7} {'batch':>5} {'decode ms':>10} {'verify ms':>10} {'ratio':>6}  "
          + "  ".join(f"x@a={a:g}" for a in rates) + "  back to back: decode / verify ms")
    for context in contexts:
        for b in batches:
            f0, s0, n = _steps(b, context, 0, ps, 1)
            f1, s1, _ = _steps(b, context, ns.k, ps, 1)
            if n >= engine.pool.num_total:
                raise SystemExit(f"batch {b} needs {n} pages, the pool has {engine.pool.num_total}")
            dec, dec_chained = _time(runner, f0, s0, ns.iters)
            ver, ver_chained = _time(runner, f1, s1, ns.iters)
            ratio = ver / dec
            gains = [((1 - a ** (ns.k + 1)) / (1 - a)) / ratio for a in rates]
            print(f"{context:>7} {b:>5} {dec * 1e3:10.3f} {ver * 1e3:10.3f} {ratio:6.2f}  "
                  + "  ".join(f"{g:7.2f}" for g in gains)
                  + f"  {dec_chained * 1e3:.3f} / {ver_chained * 1e3:.3f}", flush=True)


if __name__ == "__main__":
    main()
