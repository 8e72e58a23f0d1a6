"""The memory budget on a real device: what start-up allocates against what ``jserve plan`` says.

Run it in a fresh process (the engine sets JAX's allocator share before the backend starts)::

    PYTHONPATH=. python3 benchmarks/memory_budget.py [--model llama3.1-8b] [--context 8192]
        [--gpu-memory-utilization 0.9] [--max-num-seqs 64] [--max-num-batched-tokens 512]

Named shapes run with random weights. Prints one table (device bytes_limit, usable, weights,
runner state, activations measured at start-up against the planner's estimate, KV pages and
sequences from the engine, from the plan with the measured activations, and from the plain
plan), then the same figures as one JSON line (tests/gpu/test_memory_gpu.py reads it).
"""

from __future__ import annotations

import argparse
import json
import logging
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3.1-8b")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--kv-cache-dtype", default="auto")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import jax

    from jserve.builder import EngineArgs, build_engine
    from jserve.plan import plan_capacity
    from jserve.runner import Runner

    # The allocator's peak before warm-up, reported beside the one after: the pool's allocation
    # with its hold in place can set it (its last array may take the rest of its free block: the
    # BFC allocator hands out a whole block when the excess is under 128 MiB), and warm-up's
    # scratch can then take the rest of the freed hold's block, so neither peak says how much
    # room warm-up left (the GPU test checks the budget's sum instead).
    before_warmup: dict = {}
    warm = Runner.warm

    def warm_after_reading(runner: Runner) -> float:
        before_warmup.update(jax.devices()[0].memory_stats() or {})
        return warm(runner)

    Runner.warm = warm_after_reading

    opts = dict(max_model_len=a.context, gpu_memory_utilization=a.gpu_memory_utilization,
                max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                kv_cache_dtype=a.kv_cache_dtype)
    named = a.model not in ("code-small",) and "/" not in a.model
    t0 = time.perf_counter()
    engine = build_engine(EngineArgs(model=a.model, random_weights=named, **opts))
    startup_s = time.perf_counter() - t0
    stats = jax.devices()[0].memory_stats() or {}
    mem = engine.startup.memory
    if mem is None:
        raise SystemExit(f"{jax.devices()[0].platform}: the backend reports no memory limit, so the "
                         "engine sizes its pool for every sequence; run this on a GPU or TPU")
    pool = engine.startup.pool_plan
    measured = plan_capacity(a.model if a.model != "code-small" else None, gpu=mem.usable_bytes,
                             activation_memory_bytes=mem.activation_bytes, **opts)
    plain = plan_capacity(a.model if a.model != "code-small" else None, gpu=mem.usable_bytes, **opts)
    rows = [
        ("device bytes_limit", stats.get("bytes_limit", 0), ""),
        ("usable (gpu_memory_utilization)", mem.usable_bytes, ""),
        ("weights per device", mem.weight_bytes, f"plan {measured.memory.weight_bytes:,}"),
        ("runner state", mem.runner_state_bytes, f"plan {measured.memory.runner_state_bytes:,}"),
        ("activations", mem.activation_bytes, f"plan estimate {plain.memory.activation_bytes:,}"),
        ("other in use at start-up", mem.other_bytes, ""),
        ("KV budget", mem.kv_bytes, f"plan {measured.budget_bytes:,}"),
        ("KV pages (engine)", pool.num_pages, f"plan {measured.pool.num_pages:,} (measured acts), "
                                             f"{plain.pool.num_pages:,} (estimated)"),
        ("sequences of the context", pool.max_concurrent_seqs,
         f"plan {measured.pool.max_concurrent_seqs} / {plain.pool.max_concurrent_seqs}"),
        ("KV bytes allocated", sum(x.nbytes for x in jax.tree.leaves(engine.runner.kv))
         // engine.config.parallel.tensor_parallel_size, f"pool_bytes {pool.pool_bytes:,}"),
        ("peak bytes in use before warm-up", before_warmup.get("peak_bytes_in_use", 0), ""),
        ("peak bytes in use after warm-up", stats.get("peak_bytes_in_use", 0), ""),
    ]
    print(f"{a.model}, context {a.context}, gpu_memory_utilization {a.gpu_memory_utilization}, "
          f"{jax.devices()[0].device_kind}, start-up {startup_s:.1f} s")
    print(f"| {'figure':34} | {'bytes':>18} | vs |")
    print(f"|{'-' * 36}|{'-' * 20}|----|")
    for name, value, note in rows:
        print(f"| {name:34} | {value:>18,} | {note} |")
    print(json.dumps({
        "bytes_limit": stats.get("bytes_limit", 0), "usable": mem.usable_bytes,
        "weights": mem.weight_bytes, "state": mem.runner_state_bytes,
        "activations": mem.activation_bytes, "estimated_activations": plain.memory.activation_bytes,
        "other": mem.other_bytes, "page_bytes": pool.bytes_per_page, "engine_pages": pool.num_pages,
        "plan_pages": measured.pool.num_pages, "plan_pages_estimated": plain.pool.num_pages,
        "plan_weights": measured.memory.weight_bytes, "plan_state": measured.memory.runner_state_bytes,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use", 0),
        "peak_before_warmup": before_warmup.get("peak_bytes_in_use", 0)}))


if __name__ == "__main__":
    main()
