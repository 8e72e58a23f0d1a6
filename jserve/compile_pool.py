"""Compiling a family of small programs at once (warm-up's slot writers, penalty inits, logit
state writers).

Where it sits: start-up, ``Runner.warm``. Each family lowers its programs in turn on the calling
thread (tracing holds the GIL) and hands them here; XLA's compile releases the GIL, so the
compiles run on the runner's thread pool. None of these programs has a matmul for the GPU
autotuner to time, so concurrent compiles do not disturb each other (unlike the step programs:
``Runner.compile_programs``).
"""

from __future__ import annotations

from collections.abc import Hashable
from concurrent.futures import Executor
from typing import Any


def compile_each(lowered: dict[Hashable, Any], pool: Executor | None = None) -> dict[Hashable, Any]:
    """``{key: jax.stages.Lowered}`` -> ``{key: jax.stages.Compiled}``, on ``pool`` when given."""
    if pool is None:
        return {k: low.compile() for k, low in lowered.items()}
    futures = {k: pool.submit(low.compile) for k, low in lowered.items()}
    return {k: f.result() for k, f in futures.items()}
