"""Warm-up: each compiled step program run once over the allocated pool, before serving.

Where it sits: start-up, after ``Runner.compile`` and ``Runner.attach_pool`` (``Runner.warm``,
called by the builder). Each step variant runs on a bucket of padding rows (each twin of a
``host_outputs.HostOutputStep`` once, so both record their CUDA graphs here rather than in a
served step), one at a time so that one program's temporaries are live at once, as in
serving; then the speculative programs, the split step's pairs and the small programs (penalty
slot init per id bucket, slot writer, page mover: ``Runner.compile`` compiled them).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax

from jserve.compile_pool import buffer_addresses, out_of_memory_named, warm_memory_line
from jserve.split_step import warm_pair

log = logging.getLogger(__name__)


def warm_runner(runner: Any) -> float:
    """Run each of ``runner``'s compiled steps once (each twin once), then its small programs.
    -> seconds taken."""
    r = runner
    t0 = time.perf_counter()
    device = jax.local_devices()[0]   # this process's: another's keeps no statistics here
    if log.isEnabledFor(logging.DEBUG):
        log.debug("warm-up: before the first step: %s", warm_memory_line(None, r.kv, device))
    for variant in r.variants():
        pool = buffer_addresses(r.kv) if log.isEnabledFor(logging.DEBUG) else None
        layout = r.layout(variant[0])
        ibuf, _, _ = layout.new_buffers()
        joint = jax.device_put(layout.joint(ibuf), r._replicated)
        pen = None if variant.greedy else r.penalty_state
        masks = r.step_masks(variant.greedy)
        step = r._compiled[variant]
        with out_of_memory_named(f"step variant {variant}", step, device):
            for _ in getattr(step, "executables", (step,)):
                r.kv, pen, r.slot_table, r._prev_tokens, *_ = step(
                    r.params, r.kv, pen, r.slot_table, r._prev_tokens, joint, masks)
                jax.block_until_ready(r.kv)   # one program's temporaries at a time, as in serving
        if pen is not None:
            r.penalty_state = pen
        if pool is not None:
            log.debug("warm-up %s: %s", variant, warm_memory_line(pool, r.kv, device))
    if r.spec_steps is not None:
        r.spec_steps.warm(r)
    for t in r.split.buckets:   # each compiled split pair once, on padding rows only
        if r.split.ready(t):
            warm_pair(r, t)
    r.penalty_state = r._slot_init.warm(r.penalty_state)
    r.slot_table = r._slot_writer.warm(r.slot_table)
    r.kv = r.mover.warmup(r.kv)
    jax.block_until_ready(r.kv)
    elapsed = time.perf_counter() - t0
    log.info("ran each step variant once (token buckets %s) in %.1f s", r._buckets, elapsed)
    return elapsed
