"""Staged step inputs: the packed host input copied into a device buffer that keeps its address.

Where it sits: ``Runner._joint`` hands each step its one packed int32 input. Handed over as a
host array, the executable's argument is a fresh device buffer every call, and XLA then
updates every CUDA-graph node that reads it before the launch (RESULTS_v2_sessions_5-8.md and _9-12.md: ~1
ms per call on the Qwen2.5-0.5B decode step). Staged, a one-copy program writes the host array
into the bucket's donated device buffer in place, so the step's graph sees the same address on
every call; only the copy program's single node moves::

    host int32[n]  --(copy program, dst donated)-->  buffer[bucket] (same address)  -> step

One compiled copy per token bucket (tiny). The split step (jserve/split_step.py) stages its
packed input this way. For the fused step it is a benchmark A/B, off in the engine
(``stage_inputs(runner)`` turns it on): on an H200 it cut Qwen2.5-0.5B's overlapped batch-1 step
1.369 -> 1.221 ms but the copy call itself costs the host ~0.35 ms, so code-small's step went
0.958 -> 1.175 ms (benchmarks/RESULTS.md, session 14).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding


def _copy_into(dst: jax.Array, src: jax.Array) -> jax.Array:
    """dst (donated) := src, written in place (an update of all of dst; returning src itself
    would leave the donation unused)."""
    return jax.lax.dynamic_update_slice(dst, src, (0,) * dst.ndim)


class StagedInputs:
    """Per input length one device buffer and the compiled copy into it."""

    def __init__(self, sizes: list[int], sharding: Sharding) -> None:
        self._sharding = sharding
        self._bufs: dict[int, jax.Array] = {}
        self._copy: dict[int, jax.stages.Compiled] = {}
        fn = jax.jit(_copy_into, donate_argnums=0, out_shardings=sharding)
        for n in sorted(set(sizes)):
            self._bufs[n] = jax.device_put(np.zeros(n, np.int32), sharding)
            spec = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding)
            self._copy[n] = fn.lower(spec, spec).compile()

    def put(self, host: np.ndarray) -> jax.Array:
        """-> the device buffer of ``host``'s length holding ``host`` (int32[n])."""
        n = host.shape[0]
        buf = self._bufs[n] = self._copy[n](self._bufs[n], host)
        return buf


def stage_inputs(runner: Any) -> None:
    """From now on ``runner`` (a single-process ``Runner``) copies each step's input into a
    fixed device buffer per token bucket. A benchmark A/B: the engine never calls it."""
    sizes = [runner.layout(t).int_size + runner.layout(t).float_size
             for t in runner.config.scheduler.token_buckets]
    runner.staged_inputs = StagedInputs(sizes, runner._replicated)
