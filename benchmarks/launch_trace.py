"""Where a many-row decode step's host time goes: per-step time and a profiler trace, per sampler.

Builds one engine (random weights), keeps ``--rows`` requests decoding, and for each
temperature in ``--temperatures`` times ``--steps`` engine steps, then records a
``jax.profiler`` trace of ``--trace-steps`` more and prints the host events that take the most
time per step (Python frames of the engine, XLA's executable launch: the command buffer's
update and ``cuGraphLaunch``, conditional thunks, uploads). Temperature 0 takes the greedy
variant; a sampled batch the plain sampler in decode buckets (``step_program``); ``--regex``
constrains every row (the split step's two programs, ``jserve/split_step.py``). Session 11 used
it to find the general sampler's conditional blocking the launch (benchmarks/RESULTS.md)::

    PYTHONPATH=. python3 benchmarks/launch_trace.py --model qwen2.5-0.5b --out /tmp/trace
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import time
from collections import defaultdict

import jax
import numpy as np

from jserve.builder import EngineArgs, build_engine
from jserve.sampling_params import SamplingParams

MAX_MODEL_LEN = 512
PROMPT_LEN = 30


def top_host_events(path: str, steps: int, rows: int = 40) -> list[tuple[str, str, int, float]]:
    """A perfetto JSON trace (``create_perfetto_trace``) -> [(thread, event, count, ms per
    step)] of the ``rows`` host events with the largest total time (nested events overlap)."""
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    threads = {(e["pid"], e.get("tid")): e["args"].get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    hosts = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
             and "host" in e["args"].get("name", "")}
    total: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("ph") == "X" and e["pid"] in hosts:
            key = (threads.get((e["pid"], e.get("tid")), "?")[:24], e["name"][:80])
            total[key][0] += 1
            total[key][1] += e.get("dur", 0) / 1e3
    ranked = sorted(total.items(), key=lambda kv: -kv[1][1])[:rows]
    return [(t, name, n, ms / steps) for (t, name), (n, ms) in ranked]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--temperatures", default="0.8,0.0")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--trace-steps", type=int, default=8, help="0: time only, no trace")
    ap.add_argument("--out", default="/tmp/launch_trace", help="folder for the traces")
    ap.add_argument("--random-weights", action=argparse.BooleanOptionalAction, default=True,
                    help="--no-random-weights: a bundled model's own (code-small)")
    ap.add_argument("--regex", default=None,
                    help="constrain every request to this regex (host-masked rows: the split step, "
                         "e.g. '[a-z ]{400}')")
    ap.add_argument("--speculative-config", default=None,
                    help='JSON, as jserve serve\'s (e.g. {"method": "draft_model", "model": '
                         '"code-draft", "num_speculative_tokens": 4})')
    ns = ap.parse_args()
    eng = build_engine(EngineArgs(model=ns.model, random_weights=ns.random_weights, dtype="bfloat16",
                                  max_num_seqs=max(ns.rows, 8), max_model_len=MAX_MODEL_LEN,
                                  gpu_memory_utilization=0.5,
                                  speculative_config=json.loads(ns.speculative_config)
                                  if ns.speculative_config else None))
    rng = np.random.default_rng(0)
    vocab = eng.config.model.vocab_size
    # a speculating step emits up to k + 1 tokens: enough for every step, within the context
    per_step = 1 + (json.loads(ns.speculative_config).get("num_speculative_tokens", 0)
                    if ns.speculative_config else 0)
    max_tokens = min((ns.steps + ns.trace_steps + 30) * per_step, MAX_MODEL_LEN - PROMPT_LEN - 1)
    for temp in (float(t) for t in ns.temperatures.split(",")):
        for i in range(ns.rows):
            eng.add_request(None, rng.integers(10, vocab, PROMPT_LEN).tolist(), SamplingParams(
                temperature=temp, seed=i, max_tokens=max_tokens, ignore_eos=True,
                structured_outputs={"regex": ns.regex} if ns.regex else None))
        for _ in range(12):   # prefill and the first decode steps
            eng.step()
        t0 = time.perf_counter()
        for _ in range(ns.steps):
            eng.step()
        ms = (time.perf_counter() - t0) / ns.steps * 1e3
        folder = f"{ns.out}/t{temp}"
        if not eng.has_unfinished_requests():
            raise SystemExit("the requests finished before the timed steps did: lower --steps")
        if ns.trace_steps:
            with jax.profiler.trace(folder, create_perfetto_trace=True):
                for _ in range(ns.trace_steps):
                    eng.step()
        while eng.has_unfinished_requests():
            eng.step()
        print(f"\n## {ns.model}, {ns.rows} decoding rows, temperature {temp} "
              f"({jax.devices()[0].device_kind}): {ms:.3f} ms per engine step (no profiler)")
        if not ns.trace_steps:
            continue
        trace = max(glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True), key=os.path.getmtime)
        print("| thread | host event (profiled) | count | ms per step |")
        print("|---|---|---|---|")
        for thread, name, n, per_step in top_host_events(trace, ns.trace_steps, 80):
            print(f"| {thread} | {name} | {n} | {per_step:.3f} |", flush=True)


if __name__ == "__main__":
    main()
