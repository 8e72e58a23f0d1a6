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

Fitted (the builder's default where ``fit_layers`` allows): the probe runs twice, over the
model's first 2 and first 4 layers (``PROBE_LAYERS``, the params cut as shapes), and extends both
figures along the line through them to the model's layer count. Layers run one after another, so
each adds the same bytes or none: on CPU, where XLA materializes each layer's weight slices,
Qwen2.5-0.5B's figure grew 28.9 MiB a layer and the fit from 2 and 4 layers equalled the
24-layer probe to the byte. Two small probes compile in a fraction of one whole-model probe
(the Llama-3.1-8B's took 21.8 s of a 72.6 s cold start on an H200). The fit is checked: once the
real step programs are compiled, their own peak (``Runner.steps_peak``) must not exceed the
fitted one (``ActivationPeak.shortfall``); where it does, the builder sizes the pool again from
it and compiles again, and keeps that figure for later starts.
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

import jax
from jax.sharding import Mesh

from jserve.compile_pool import compiled_extra_bytes, split_peak_bytes
from jserve.config import DTYPE_BYTES, EngineConfig, ModelConfig
from jserve.host_kv import host_slot_counts
from jserve.kv_cache import abstract_kv_cache, kv_bytes_per_token, kv_scale_bytes_per_page
from jserve.kv_transfer import transfer_buckets
from jserve.model.params import param_specs
from jserve.runner import Runner
from jserve.spec.draft import DraftModel
from jserve.startup_cache import StartupCache, engine_fingerprint

log = logging.getLogger(__name__)

PROBE_PAGES = 2   # the probe's pool: page 0 (null) and one page; its shape is all that matters
PROBE_LAYERS = (2, 4)   # the layer counts a fitted probe measures (module docstring)


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


@dataclasses.dataclass(frozen=True)
class ActivationPeak:
    """The probe's figure, per device: the step programs' peak and the page mover's (bytes).
    ``fitted``: both fitted to the model's layer count from ``PROBE_LAYERS``-layer probes, and
    checked against the real steps once they are compiled (``shortfall``)."""

    steps: int
    moves: int
    fitted: bool = False
    cache: StartupCache | None = None   # where the figure is kept, under ``fingerprint``
    fingerprint: str | None = None

    @property
    def total(self) -> int:
        return self.steps + self.moves

    def shortfall(self, compiled_steps: int) -> int | None:
        """None when the compiled step programs' own peak (``Runner.steps_peak``) fits this
        figure or it was not fitted; else the figure they need, kept in the cache instead."""
        if not self.fitted or compiled_steps <= self.steps:
            return None
        need = compiled_steps + self.moves
        if self.fingerprint is not None:
            self.cache.put(self.fingerprint, "activation_bytes", need)
        return need


def measure_activation_bytes(config: EngineConfig, params: Any, mesh: Mesh,
                             draft: DraftModel | None = None, cache: StartupCache | None = None) -> int:
    """``measure_activation_peak(...).total`` with every layer probed."""
    return measure_activation_peak(config, params, mesh, draft, cache).total


def measure_activation_peak(config: EngineConfig, params: Any, mesh: Mesh, draft: DraftModel | None = None,
                            cache: StartupCache | None = None, fit: bool = False) -> ActivationPeak:
    """The activation peak of the engine's step programs (module docstring), per device;
    ``cache``: kept there, and read back by a later start of the same engine; ``fit``: from
    probes of the first ``PROBE_LAYERS`` layers where the model allows (``fit_layers``)."""
    fingerprint = None
    if cache is not None and cache.path is not None:
        fingerprint = engine_fingerprint(config, params, mesh, None if draft is None else draft.cfg)
        kept = cache.get(fingerprint, "activation_bytes")
        if kept is not None:
            log.info("activation peak: %.1f MiB per device, as measured by an earlier start of this "
                     "engine (%s)", kept / 2**20, cache.path)
            return ActivationPeak(kept, 0)
    t0 = time.perf_counter()
    layers = fit_layers(config, draft) if fit else None
    if layers:
        (sa, ma, count), (sb, mb, _) = (_probe(*first_layers(config, params, n), mesh) for n in layers)
        steps, moves = (max(yb, yb + -(-(yb - ya) * (config.model.num_layers - layers[1])
                                       // (layers[1] - layers[0])))
                        for ya, yb in ((sa, sb), (ma, mb)))
        how = f"fitted to {config.model.num_layers} layers from probes of {layers[0]} and {layers[1]}"
    else:
        steps, moves, count = _probe(config, params, mesh, draft)
        how = "measured"
    log.info("activation peak: %.1f MiB per device: the largest of %d step programs of %d tokens "
             "(%.1f MiB) + the largest page move to host memory (%.1f MiB); %s in %.1f s",
             (steps + moves) / 2**20, count, config.scheduler.token_buckets[-1], steps / 2**20,
             moves / 2**20, how, time.perf_counter() - t0)
    if fingerprint is not None:
        cache.put(fingerprint, "activation_bytes", steps + moves)
    return ActivationPeak(steps, moves, bool(layers), cache, fingerprint)


def fit_layers(config: EngineConfig, draft: DraftModel | None = None) -> tuple[int, int] | None:
    """``PROBE_LAYERS`` when the probe may fit its figure to the layer count: a model of more
    layers, one pipeline stage, no speculative decoding, and its first layers of every kind
    (sliding windows)."""
    m, n = config.model, PROBE_LAYERS[0]
    if (draft is not None or config.speculative is not None or config.parallel.pipeline_parallel_size > 1
            or m.num_layers <= PROBE_LAYERS[1] or set(m.sliding_windows[:n]) != set(m.sliding_windows)):
        return None
    return PROBE_LAYERS


def first_layers(config: EngineConfig, params: Any, n: int) -> tuple[EngineConfig, Any]:
    """(the engine's config, its params as shapes) cut to the model's first ``n`` layers."""
    m = config.model
    cut = dataclasses.replace(config, model=dataclasses.replace(m, num_layers=n,
                                                                sliding_windows=m.sliding_windows[:n]))
    stacked = {k for k, spec in param_specs(m).items() if spec.logical_axes[:1] == ("layers",)}

    def first(a: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((n, *a.shape[1:]), a.dtype, sharding=a.sharding)

    return cut, {k: jax.tree.map(first, v) if k in stacked else v for k, v in params.items()}


def _probe(config: EngineConfig, params: Any, mesh: Mesh, draft: DraftModel | None = None
           ) -> tuple[int, int, int]:
    """One probe runner over a 2-page pool -> (the step programs' peak, the page mover's, how
    many step programs it compiled)."""
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
    compiled = runner.compile_programs(programs, measure_only=True)   # (GPU: no code optimization)
    peak = max(compiled_extra_bytes(c) for c in compiled[:count])
    if split:
        peak = max(peak, split_peak_bytes(*compiled[count:]))
        count += 1
    move = mover_peak_bytes(runner.mover.lower_largest_moves(runner.kv))
    if runner.spec_steps is not None and runner.spec_steps.mover is not None:
        move += mover_peak_bytes(runner.spec_steps.mover.lower_largest_moves(probe_draft.kv))
    del runner, compiled
    gc.collect()   # the probe's slot and penalty state go before the pool is allocated
    return peak, move, count


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
