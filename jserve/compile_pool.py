"""Compiling start-up's programs on threads.

Where it sits: start-up. Programs are lowered in turn on the calling thread (tracing holds the
GIL) and compiled on a thread pool (XLA's compile releases it)::

    compile_in_order   the step programs (``Runner.compile_programs``: step variants,
                       speculative variants, the activation probe's). On GPU, XLA's autotuner
                       times candidate kernels on the device while it compiles, and concurrent
                       compiles spoil each other's timings (an H200: 8 threads took 106 s for 6
                       Qwen-0.5B variants, with "Delay kernel timed out" warnings), so the first
                       program of each token bucket compiles alone (that bucket's matmuls, the
                       same shapes in all its programs, are tuned there) and the rest on threads,
                       their kernels found in XLA's per-fusion autotune cache.
    compile_each       all on threads: the split step's pairs (after the step variants, whose
                       buckets' matmuls they share) and warm-up's small programs (slot writers,
                       penalty inits, logit state writers: no matmul for the autotuner).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any


def compile_in_order(programs: list[tuple[int, Callable[[], Any]]], threads: int, gpu: bool,
                     done: Callable[[int, Any, int], None] | None = None) -> list[Any]:
    """Compile ``(token bucket, lower)`` pairs -> their executables, in order; ``done(i,
    executable, how many have finished)`` as each finishes. ``gpu``: each bucket's first program
    alone first (module docstring)."""
    alone: dict[int, int] = {}
    if gpu:
        for i, (tokens, _) in enumerate(programs):
            alone.setdefault(tokens, i)
    out: list[Any] = [None] * len(programs)
    finished = 0

    def finish(i: int, compiled: Any) -> None:
        nonlocal finished
        out[i], finished = compiled, finished + 1
        if done is not None:
            done(i, compiled, finished)

    for i in alone.values():
        finish(i, programs[i][1]().compile())
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = [(i, pool.submit(lower().compile)) for i, (_, lower) in enumerate(programs)
                   if i not in alone.values()]
        for i, fut in futures:
            finish(i, fut.result())
    return out


def compile_each(lowered: dict[Hashable, Any], pool: Executor | None = None) -> dict[Hashable, Any]:
    """``{key: jax.stages.Lowered}`` -> ``{key: jax.stages.Compiled}``, on ``pool`` when given."""
    if pool is None:
        return {k: low.compile() for k, low in lowered.items()}
    futures = {k: pool.submit(low.compile) for k, low in lowered.items()}
    return {k: f.result() for k, f in futures.items()}
