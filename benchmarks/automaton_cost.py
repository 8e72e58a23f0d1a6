"""What the token-automaton table costs steps that use no grammar: free sampled decode on an
engine with the table (the default) against one without (``grammar_device_states=0``).

The plain and general sampler variants read the table for every row (a free row reads the
all-allowed row: no branch, jserve/structured/automaton_step.py), so a sampled batch pays a
``[R, V]`` int16 gather and a select per step whether or not a row is constrained. Both engines
live in one process and their rounds alternate (a machine that drifts moves both alike). Prints
one markdown table for benchmarks/RESULTS.md.

    PYTHONPATH=. python3 benchmarks/automaton_cost.py --model qwen2.5-0.5b --random-weights
"""

from __future__ import annotations

import argparse
import time

import jax

from jserve.builder import EngineArgs, build_engine
from jserve.sampling_params import SamplingParams


def _batch(engine, n: int, max_tokens: int, seed: int) -> float:
    """Seconds for n free sampled requests of max_tokens tokens each."""
    for i in range(n):
        engine.add_request(None, [11 + i, 12, 13, 14 + i], SamplingParams(temperature=0.8, seed=seed + i,
                                                                  max_tokens=max_tokens, ignore_eos=True))
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    ns = ap.parse_args()
    engines = {}
    for name, states in (("table (default)", None), ("no table", 0)):
        engines[name] = build_engine(EngineArgs(
            model=ns.model, random_weights=ns.random_weights, max_num_seqs=ns.num_requests,
            max_model_len=512, gpu_memory_utilization=ns.gpu_memory_utilization,
            grammar_device_states=states))
    times: dict[str, list[float]] = {k: [] for k in engines}
    for r in range(ns.rounds + 1):   # round 0 warms up
        for name, eng in engines.items():
            s = _batch(eng, ns.num_requests, ns.max_tokens, 1000 * r)
            if r:
                times[name].append(s)
    dev = jax.devices()[0]
    table = engines["table (default)"].runner.automata
    print(f"\n## free sampled decode, {ns.num_requests} x {ns.max_tokens} tokens "
          f"({ns.model or 'code-small'}, {dev.platform} {dev.device_kind}); the table: "
          f"{table.states if table else 0} states")
    print("| engine | " + " | ".join(f"round {r + 1} tok/s" for r in range(ns.rounds)) + " |")
    print("|---|" + "---|" * ns.rounds)
    tokens = ns.num_requests * ns.max_tokens
    for name, ts in times.items():
        print(f"| {name} | " + " | ".join(f"{tokens / t:.0f}" for t in ts) + " |")


if __name__ == "__main__":
    main()
