"""Prefix-caching benchmark: a shared-prefix workload with the cache off, on, and with a
device pool too small to keep the prefix (host KV tier on vs recompute).

Workload (the issue's): ``--num-requests`` 100 requests = a common ``--prefix-len`` 4,096-token
prefix + a unique ``--suffix-len`` 64-token suffix, ``--output-len`` 128 greedy tokens each.

    off       prefix caching off; all requests arrive at once
    on        prefix caching on (the first request computes the prefix, the rest hit it)
    small-recompute / small-host-tier
              a device pool of ~ prefix + one wave of requests; the requests arrive in waves of
              ``--wave-size``; before every wave, untimed filler prompts push the prefix out of
              the device pool: it comes back from the host tier (host_kv_cache_gb) or is
              recomputed (tier off)

Per config: TTFT p50/p95 (arrival -> first token, queueing included), output tokens/s over the
timed part, mean cached prompt tokens per request and the KV cache counters. Not a test:
numbers go to benchmarks/RESULTS.md with the GPU name and date.

    PYTHONPATH=. python3 benchmarks/prefix_cache.py --model llama3.1-8b --random-weights
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import jax
import numpy as np

from jserve.builder import EngineArgs, build_engine
from jserve.engine import LLMEngine
from jserve.sampling_params import SamplingParams

CONFIGS = ("off", "on", "small-recompute", "small-host-tier")


def run_batch(engine: LLMEngine, prompts: list[list[int]], max_tokens: int
              ) -> tuple[list[float], list[int], int, float]:
    """All prompts arrive now; -> (TTFTs s, cached tokens per request, output tokens, seconds)."""
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.monotonic()
    ids = [engine.add_request(None, p, sp, arrival_time=t0) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    elapsed = time.monotonic() - t0
    outs = [done[i] for i in ids]
    ttft = [o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outs]
    return ttft, [o.num_cached_tokens for o in outs], sum(len(o.outputs[0].token_ids) for o in outs), elapsed


def engine_args(ns: argparse.Namespace, config: str, small_pages: int) -> EngineArgs:
    small = config.startswith("small")
    return EngineArgs(
        model=ns.model, random_weights=ns.random_weights, dtype=ns.dtype, page_size=ns.page_size,
        max_model_len=ns.max_model_len, max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        num_pages=small_pages if small else None,
        enable_prefix_caching=config != "off",
        host_kv_cache_gb=ns.host_kv_cache_gb if config == "small-host-tier" else 0.0)


def bench_config(ns: argparse.Namespace, config: str) -> dict:
    ps = ns.page_size
    prefix_pages = -(-ns.prefix_len // ps)
    own_pages = -(-(ns.suffix_len + ns.output_len) // ps) + 1
    small_pages = 1 + prefix_pages + ns.wave_size * own_pages + 16
    t0 = time.perf_counter()
    engine = build_engine(engine_args(ns, config, small_pages))
    startup = time.perf_counter() - t0
    vocab = engine.config.model.vocab_size
    rng = np.random.default_rng(0)
    rand = lambda n: rng.integers(10, vocab, n).tolist()  # noqa: E731
    run_batch(engine, [rand(32)], 4)  # warm the path (not the prefix)
    prefix = rand(ns.prefix_len)
    prompts = [prefix + rand(ns.suffix_len) for _ in range(ns.num_requests)]
    before = engine.kv_cache_stats()
    ttft, cached, out_tokens, seconds = [], [], 0, 0.0
    if config in ("off", "on"):
        ttft, cached, out_tokens, seconds = run_batch(engine, prompts, ns.output_len)
    else:
        run_batch(engine, [prefix + rand(ns.suffix_len)], 1)  # the prefix exists somewhere
        fillers = -(-small_pages * ps // ns.prefix_len) + 1
        for w in range(0, len(prompts), ns.wave_size):
            run_batch(engine, [rand(ns.prefix_len) for _ in range(fillers)], 1)  # evict the prefix
            t, c, n, s = run_batch(engine, prompts[w:w + ns.wave_size], ns.output_len)
            ttft += t
            cached += c
            out_tokens += n
            seconds += s
    after = engine.kv_cache_stats()
    delta = {k: after[k] - before.get(k, 0) for k in ("prefix_cache_queries", "prefix_cache_hits_device",
                                                       "prefix_cache_hits_host", "host_tier_pages_loaded",
                                                       "pages_swapped_out", "preemptions")}
    row = dict(config=config, requests=len(prompts), pool_pages=engine.startup.kv_pages_total,
               ttft_p50_ms=round(float(np.percentile(ttft, 50)) * 1e3, 1),
               ttft_p95_ms=round(float(np.percentile(ttft, 95)) * 1e3, 1),
               out_tok_s=round(out_tokens / seconds, 1), seconds=round(seconds, 2),
               mean_cached_tokens=round(float(np.mean(cached)), 1), startup_s=round(startup, 1), **delta)
    del engine
    gc.collect()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-requests", type=int, default=100)
    ap.add_argument("--prefix-len", type=int, default=4096)
    ap.add_argument("--suffix-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--wave-size", type=int, default=10, help="small-pool configs: requests per wave")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="default: prefix + suffix + output, rounded up to a page")
    ap.add_argument("--host-kv-cache-gb", type=float, default=16.0)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {CONFIGS}")
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    total = ns.prefix_len + ns.suffix_len + ns.output_len
    ns.max_model_len = ns.max_model_len or -(-total // ns.page_size) * ns.page_size
    configs = [c for c in ns.configs.split(",") if c]
    bad = sorted(set(configs) - set(CONFIGS))
    if bad:
        raise SystemExit(f"--configs: unknown {bad}; choose from {CONFIGS}")

    rows = [bench_config(ns, c) for c in configs]
    dev = jax.devices()[0]
    print(f"\n{getattr(dev, 'device_kind', str(dev))}, {ns.model} {ns.dtype}: {ns.num_requests} requests, "
          f"{ns.prefix_len}-token shared prefix + {ns.suffix_len} unique, {ns.output_len} output tokens\n")
    cols = ("config", "pool_pages", "ttft_p50_ms", "ttft_p95_ms", "out_tok_s", "mean_cached_tokens",
            "prefix_cache_hits_host", "preemptions")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    by = {r["config"]: r for r in rows}
    if "off" in by and "on" in by:
        print(f"\ncached / uncached TTFT p50: {by['on']['ttft_p50_ms'] / by['off']['ttft_p50_ms']:.1%} "
              f"(goal <= 10%)")
    if "small-recompute" in by and "small-host-tier" in by:
        print(f"host tier / recompute TTFT p50: "
              f"{by['small-host-tier']['ttft_p50_ms'] / by['small-recompute']['ttft_p50_ms']:.1%}")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
