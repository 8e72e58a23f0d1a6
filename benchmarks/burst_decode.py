"""Bursts (``num_scheduler_steps``) against one step at a time, batch 1 and a few rows.

One engine per model, built with ``--steps`` N (so the burst program is compiled at start-up);
the rows without bursts run the same engine with the scheduler's burst decision pinned to 1
(benchmark only), so both columns share the machine, the compile and the pool. Greedy, random
weights, ``--tokens`` tokens per request, the first token excluded; tokens are checked equal.

    PYTHONPATH=. python3 benchmarks/burst_decode.py code-small [--steps 8]
        [--num-pages 8192 --analysis-pages 2,8192,376139 --hlo-dir /tmp/burst_hlo]

``--trace DIR``: a profiler trace of one batch-1 request's ``--tokens`` tokens each way, and per
token: device kernel time, kernels, the span from first to last kernel, and the top host events.

``--analysis-pages``: the burst and decode-step programs compiled again against abstract pools
of those page counts (nothing allocated, as the start-up probe does at 2 pages), printing their
``memory_analysis``: does a burst's scratch grow with the pool? ``--hlo-dir``: the optimized HLO
of both programs at the largest of them, and their 12 largest temporaries by shape.

One model per process: a finished engine's pool stays allocated in its process, so a second
model's memory budget would find none.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import time
from collections import Counter

import jax
import numpy as np

from jserve.builder import EngineArgs, build_engine
from jserve.kv_cache import abstract_kv_cache
from jserve.runner import Runner
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


def device_summary(path: str) -> tuple[float, int, float]:
    """A perfetto trace -> (kernel ms summed, kernel count, ms from the first kernel's start to
    the last one's end) over the device processes."""
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    dev = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
           and "device" in e["args"].get("name", "").lower() and "host" not in e["args"].get("name", "")}
    ks = [e for e in events if e.get("ph") == "X" and e["pid"] in dev and e.get("dur", 0) > 0]
    if not ks:
        return 0.0, 0, 0.0
    span = max(e["ts"] + e["dur"] for e in ks) - min(e["ts"] for e in ks)
    return sum(e["dur"] for e in ks) / 1e3, len(ks), span / 1e3


def trace(eng, burst, tokens: int, folder: str) -> None:
    """Profile one batch-1 request each way (module docstring)."""
    from launch_trace import top_host_events  # (benchmarks/: the script's folder)
    print(f"\n## trace, batch 1, {tokens} tokens per run: per token")
    print("| mode | kernel ms | kernels | device span ms | wall ms |")
    print("|---|---|---|---|---|")
    hosts = {}
    for on in (False, True):
        eng.scheduler._burst = burst if on else (lambda: 1)
        decode(eng, 1, tokens)
        sub = f"{folder}/{'burst' if on else 'step'}"
        t = time.perf_counter()
        with jax.profiler.trace(sub, create_perfetto_trace=True):
            decode(eng, 1, tokens)
        wall = (time.perf_counter() - t) * 1e3
        path = glob.glob(f"{sub}/**/perfetto_trace.json.gz", recursive=True)[0]
        kms, n, span = device_summary(path)
        print(f"| {'bursts' if on else 'one step'} | {kms / tokens:.3f} | {n / tokens:.0f} | "
              f"{span / tokens:.3f} | {wall / tokens:.3f} |", flush=True)
        hosts[on] = top_host_events(path, tokens, 12)
    eng.scheduler._burst = burst
    for on, rows in hosts.items():
        print(f"\n## host events per token, {'bursts' if on else 'one step'}")
        print("| thread | event | count | ms per token |")
        print("|---|---|---|---|")
        for th, name, cnt, ms in rows:
            print(f"| {th} | {name} | {cnt} | {ms:.3f} |")


def analysis(eng, steps: int, pages: list[int], hlo_dir: str | None) -> None:
    """The burst and the decode step compiled against abstract pools of ``pages`` pages."""
    cfg = eng.config
    burst = eng.runner.steps.burst(steps, True)
    for n in pages:
        kv = abstract_kv_cache(cfg.model, n, cfg.cache.page_size, cfg.kv_dtype, eng.runner.mesh)
        probe = Runner(cfg, eng.runner.params, kv, eng.runner.mesh)
        for v in (burst._replace(burst=1), burst):
            c = probe.lower_step(v).compile()
            m = c.memory_analysis()
            name = "burst" if v.burst > 1 else "decode step"
            print(f"  {name} at {n} pages: temp {m.temp_size_in_bytes / 2**20:.1f} MiB, arguments "
                  f"{m.argument_size_in_bytes / 2**20:.1f} MiB, outputs {m.output_size_in_bytes / 2**20:.1f}"
                  f" MiB, aliased {m.alias_size_in_bytes / 2**20:.1f} MiB", flush=True)
            if hlo_dir and n == max(pages):
                os.makedirs(hlo_dir, exist_ok=True)
                text = c.as_text()
                with open(f"{hlo_dir}/{name.replace(' ', '_')}_{n}.hlo", "w") as f:
                    f.write(text)
                shapes = Counter(re.findall(r"= ([a-z0-9]+\[[0-9,]+\])", text))
                size = {sh: np.prod([int(d) for d in sh[sh.index("[") + 1:-1].split(",")]) for sh in shapes}
                big = sorted(shapes, key=lambda sh: -size[sh])
                print(f"    {name}: largest value shapes "
                      + ", ".join(f"{sh} x{shapes[sh]}" for sh in big[:12]))
        del probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", help="a model, or a comma list with --num-pages set")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rows", default="1,4,16")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--num-pages", type=int, default=None, help="a fixed pool instead of the share")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--pipeline-parallel-size", type=int, default=1,
                    help="> 1: greedy bursts circle through the stages in row groups")
    ap.add_argument("--analysis-pages", default="", help="comma list of abstract pool sizes")
    ap.add_argument("--hlo-dir", default=None)
    ap.add_argument("--trace", default=None, help="a folder for profiler traces")
    a = ap.parse_args()
    for model in a.models.split(","):
        t = time.perf_counter()
        eng = build_engine(EngineArgs(model=model, random_weights=True, dtype="bfloat16",
                                      max_num_seqs=a.max_num_seqs,
                                      max_num_batched_tokens=max(16, a.max_num_seqs), max_model_len=1024,
                                      pipeline_parallel_size=a.pipeline_parallel_size,
                                      gpu_memory_utilization=a.gpu_memory_utilization,
                                      num_scheduler_steps=a.steps, num_pages=a.num_pages))
        build = time.perf_counter() - t
        burst = eng.scheduler._burst
        one = eng.runner.steps.burst(a.steps, True)._replace(burst=1)
        for v in (one, eng.runner.steps.burst(a.steps, True)):   # what each program allocates
            m = eng.runner._compiled[v].memory_analysis()
            print(f"  {'burst' if v.burst > 1 else 'decode step'}: temp {m.temp_size_in_bytes / 2**20:.1f} "
                  f"MiB, outputs {m.output_size_in_bytes / 2**20:.1f} MiB, aliased "
                  f"{m.alias_size_in_bytes / 2**20:.1f} MiB", flush=True)
        if a.analysis_pages:
            analysis(eng, a.steps, [int(n) for n in a.analysis_pages.split(",")], a.hlo_dir)
        print(f"\n## {model}, pp {a.pipeline_parallel_size}: bursts of {a.steps} against one step at a "
              f"time (engine build {build:.0f} s)")
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
        if a.trace:
            trace(eng, burst, a.tokens, a.trace)
        del eng


if __name__ == "__main__":
    main()
