"""The activation peak: device bytes a step needs beyond its arguments, measured at start-up.

Where it sits: start-up, between loading the weights and sizing the KV pool (DESIGN invariant
1). The pool takes what the weights, the runner's state and this peak leave of the usable memory
(``kv_cache.MemoryBudget``), instead of a fixed share held back for activations::

    probe runner: the real params, an abstract pool of PROBE_PAGES pages (nothing allocated)
    for each step program of the largest token bucket (general, greedy, flash, speculative),
    and the split step's pair of its largest bucket (GPU/TPU, jserve/split_step.py), the
    plain-sampler step of the largest decode bucket when that pair does not stand for it (its
    sampler keeps every [R, V] pass), and the burst programs (``num_scheduler_steps``):
        lower -> compile -> memory_analysis(): temp + (outputs - outputs aliased to donated inputs)
    + the page mover's largest gather to host memory (swap, host tier), measured the same way:
      its pages wait on the device for their copy while the next step runs; plus as many bytes
      uploaded from host memory and the largest scatter of them into the pool
    activation bytes = the largest step + the largest move

The steps' temporaries (hidden states, MLP activations, attention scratch, logits and the
sampler's sorts) grow with the token and row buckets, not with the pool: the pool is donated
and updated in place, so a 2-page probe measures what the real steps need (start-up logs both).
The probe compiles are cached by JAX's persistent cache like the steps, and its result is kept
beside them (``jserve/startup_cache.py``): a restart of the same engine skips the probe.
Steps of smaller buckets need less; slot writers and penalty inits need far less.
Not counted: the extra prefill of a ``prompt_logprobs`` request (jserve/prompt_logprobs.py),
compiled on first use, whose peak grows with the prompt; with long scored prompts keep room
(a lower ``gpu_memory_utilization`` or a larger ``activation_memory_bytes``).

``estimate_activation_bytes`` is ``jserve plan``'s figure without a device, from the shapes
(the engine logs the measured one; ``--activation-memory-bytes`` plans with it). It models GPU
and TPU steps, whose attention kernels read pages in place; CPU's reference attention gathers
each sequence's pages and measures more.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import time
from typing import Any

from jax.sharding import Mesh

from jserve.compile_pool import compiled_extra_bytes, split_peak_bytes
from jserve.config import DTYPE_BYTES, EngineConfig, ModelConfig
from jserve.host_kv import host_slot_counts
from jserve.kv_cache import abstract_kv_cache, kv_bytes_per_token, kv_scale_bytes_per_page
from jserve.kv_transfer import transfer_buckets
from jserve.runner import Runner
from jserve.spec.draft import DraftModel
from jserve.startup_cache import StartupCache, engine_fingerprint

log = logging.getLogger(__name__)

PROBE_PAGES = 2   # the probe's pool: page 0 (null) and one page; its shape is all that matters


def mover_peak_bytes(moves: list[Any]) -> int:
    """The page mover's peak from its lowered largest gather and scatter
    (``KVPageMover.lower_largest_moves``; none without host moves): a step can swap pages out
    and in at once, so the gathered pages wait for their copy to host memory while the pages
    uploaded from it (as many bytes as the gather's output) are scattered into the pool."""
    if not moves:
        return 0
    gather, scatter = (low.compile() for low in moves)
    upload = int(gather.memory_analysis().output_size_in_bytes)
    return compiled_extra_bytes(gather) + upload + compiled_extra_bytes(scatter)


def measure_activation_bytes(config: EngineConfig, params: Any, mesh: Mesh,
                             draft: DraftModel | None = None, cache: StartupCache | None = None) -> int:
    """The activation peak of the engine's step programs (module docstring), per device;
    ``cache``: kept there, and read back by a later start of the same engine."""
    fingerprint = None
    if cache is not None and cache.path is not None:
        fingerprint = engine_fingerprint(config, params, mesh, None if draft is None else draft.cfg)
        kept = cache.get(fingerprint, "activation_bytes")
        if kept is not None:
            log.info("activation peak: %.1f MiB per device, as measured by an earlier start of this "
                     "engine (%s)", kept / 2**20, cache.path)
            return kept
    t0 = time.perf_counter()
    peak, move, count, largest = _probe(config, params, mesh, draft)
    # The probe runner sits in reference cycles (its split programs and speculative steps hold
    # it): collected only now, after _probe's frame let go of it. Collected inside that frame
    # (as before session 51), it outlived the probe until some later collection, and its state
    # (the token-automaton table: 32 MiB for the bundled model, 0.25 GiB for a 128k vocabulary)
    # was freed only after the real runner's state was allocated beyond it, leaving a hole that
    # no pool array fits (H100: the bundled model's pool then missed by tens of MiB).
    gc.collect()
    log.info("activation peak: %.1f MiB per device: the largest of %d step programs of %d tokens "
             "(%.1f MiB) + the largest page move to host memory (%.1f MiB); measured in %.1f s",
             (peak + move) / 2**20, count, largest, peak / 2**20, move / 2**20,
             time.perf_counter() - t0)
    if fingerprint is not None:
        cache.put(fingerprint, "activation_bytes", peak + move)
    return peak + move


def _probe(config: EngineConfig, params: Any, mesh: Mesh,
           draft: DraftModel | None) -> tuple[int, int, int, int]:
    """The probe runner's measurements -> (largest step peak, largest page move, step programs
    measured, the largest token bucket)."""
    kv = abstract_kv_cache(config.model, PROBE_PAGES, config.cache.page_size, config.kv_dtype, mesh)
    probe_draft = None
    if draft is not None:
        probe_draft = dataclasses.replace(draft, kv=abstract_kv_cache(
            draft.cfg, PROBE_PAGES, config.cache.page_size, config.kv_dtype, mesh))
    runner = Runner(config, params, kv, mesh, probe_draft)
    largest = config.scheduler.token_buckets[-1]
    variants = runner.variants()
    steps = [v for v in variants if v.tokens == largest]
    split = runner.split_wanted() and runner.split.buckets
    covered = max(runner.split.buckets) if split else 0   # the split pair's plain sampler
    plain = [v for v in variants if v.plain and covered < v.tokens < largest]
    if plain:
        steps.append(max(plain))
    steps += [v for v in variants if v.burst > 1 and v.tokens != largest]   # N steps in one program
    programs = [(v.tokens, functools.partial(runner.lower_step, v)) for v in steps]
    if runner.spec_steps is not None:
        programs.append((largest, functools.partial(runner.spec_steps._lower, runner, (largest, False))))
    count = len(programs)
    if split:
        pair = runner.lower_split(covered)
        programs += [(covered, lambda low=low: low) for low in pair]
    compiled = runner.compile_programs(programs)   # on GPU each bucket's first alone: autotuning
    peak = max(compiled_extra_bytes(c) for c in compiled[:count])
    if split:
        peak = max(peak, split_peak_bytes(*compiled[count:]))
        count += 1
    move = mover_peak_bytes(runner.mover.lower_largest_moves(runner.kv))
    if runner.spec_steps is not None and runner.spec_steps.mover is not None:
        move += mover_peak_bytes(runner.spec_steps.mover.lower_largest_moves(probe_draft.kv))
    return peak, move, count, largest


def estimate_activation_bytes(config: EngineConfig, draft: ModelConfig | None = None) -> int:
    """The measured peak estimated from the shapes alone (``jserve plan``), per device: the
    largest token bucket T's hidden-size and MLP activations, the row bucket R's float32 logits
    with the sampler's copies (softmax, sort values and indices, filtered logits), and, when
    pages can move to host memory, the largest move's pages five times (gathered: stacked, then
    split; brought back: uploaded, stacked, then scattered)::

        T x (2 x hidden + QKV + 3 x intermediate) / tp x dtype bytes + 6 x R x vocab x 4 B
        + 5 x move bucket x page bytes (target + draft)
    """
    m, s = config.model, config.scheduler
    tp = config.parallel.tensor_parallel_size
    t = s.token_buckets[-1]
    r = s.seq_bucket(t)
    qkv = m.num_kv_heads * (m.q_per_kv_padded + 2) * m.head_dim
    per_token = (2 * m.hidden_size + (qkv + 3 * m.intermediate_size) // tp) * DTYPE_BYTES[m.dtype]
    step = t * per_token + 6 * r * m.vocab_size * 4
    if not host_slot_counts(config):
        return step
    bucket = transfer_buckets(max(config.pages_per_seq, s.max_num_seqs))[-1]
    page = sum(kv_bytes_per_token(c, config.kv_dtype, tp) * config.cache.page_size
               + kv_scale_bytes_per_page(c, config.kv_dtype, tp) for c in (m, draft) if c is not None)
    return step + 5 * bucket * page
