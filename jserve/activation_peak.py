"""The activation peak: device bytes a step needs beyond its arguments, measured at start-up.

Where it sits: start-up, between loading the weights and sizing the KV pool (DESIGN invariant
1). The pool takes what the weights, the runner's state and this peak leave of the usable memory
(``kv_cache.MemoryBudget``), instead of a fixed share held back for activations::

    probe runner: the real params, an abstract pool of PROBE_PAGES pages (nothing allocated)
    for each step program of the largest token bucket (general, greedy, flash, speculative):
        lower -> compile -> memory_analysis(): temp + (outputs - outputs aliased to donated inputs)
    activation bytes = the largest of them

The steps' temporaries (hidden states, MLP activations, attention scratch, logits and the
sampler's sorts) grow with the token and row buckets, not with the pool: the pool is donated
and updated in place, so a 2-page probe measures what the real steps need (start-up logs both).
The probe compiles are cached by JAX's persistent cache like the steps (a restart re-reads
them). Steps of smaller buckets need less; the page mover and slot writers run between steps,
never beside them, and need far less than a step.

``estimate_activation_bytes`` is ``jserve plan``'s figure without a device: an upper bound
from the shapes (the engine logs the measured one; ``--activation-memory-bytes`` plans with it).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from typing import Any

from jax.sharding import Mesh

from jserve.config import DTYPE_BYTES, EngineConfig
from jserve.kv_cache import abstract_kv_cache
from jserve.runner import Runner
from jserve.spec.draft import DraftModel

log = logging.getLogger(__name__)

PROBE_PAGES = 2   # the probe's pool: page 0 (null) and one page; its shape is all that matters


def compiled_extra_bytes(compiled: Any) -> int:
    """Bytes a compiled program allocates while it runs, beyond its arguments: temporaries plus
    the outputs that do not reuse a donated input's buffer."""
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes) + max(0, int(m.output_size_in_bytes) - int(m.alias_size_in_bytes))


def measure_activation_bytes(config: EngineConfig, params: Any, mesh: Mesh,
                             draft: DraftModel | None = None) -> int:
    """The activation peak of the engine's step programs (module docstring), per device."""
    kv = abstract_kv_cache(config.model, PROBE_PAGES, config.cache.page_size, config.kv_dtype, mesh)
    probe_draft = None
    if draft is not None:
        probe_draft = dataclasses.replace(draft, kv=abstract_kv_cache(
            draft.cfg, PROBE_PAGES, config.cache.page_size, config.kv_dtype, mesh))
    runner = Runner(config, params, kv, mesh, probe_draft)
    largest = config.scheduler.token_buckets[-1]
    lowered = [runner.lower_step(v) for v in runner.variants() if v.tokens == largest]
    if runner.spec_steps is not None:
        lowered.append(runner.spec_steps._lower(runner, (largest, False)))
    peak = max(compiled_extra_bytes(low.compile()) for low in lowered)
    count = len(lowered)
    del runner, lowered
    gc.collect()   # the probe's slot and penalty state go before the pool is allocated
    log.info("activation peak: %.1f MiB per device (the largest of %d step programs of %d tokens)",
             peak / 2**20, count, largest)
    return peak


def estimate_activation_bytes(config: EngineConfig) -> int:
    """An upper bound of the measured peak from the shapes alone (``jserve plan``): the largest
    token bucket T's hidden-size and MLP activations and the row bucket R's float32 logits with
    the sampler's copies (softmax, sort values and indices, filtered logits), per device::

        T x (2 x hidden + QKV + 3 x intermediate) / tp x dtype bytes + 6 x R x vocab x 4 B
    """
    m, s = config.model, config.scheduler
    tp = config.parallel.tensor_parallel_size
    t = s.token_buckets[-1]
    r = s.seq_bucket(t)
    qkv = m.num_kv_heads * (m.q_per_kv_padded + 2) * m.head_dim
    per_token = (2 * m.hidden_size + (qkv + 3 * m.intermediate_size) // tp) * DTYPE_BYTES[m.dtype]
    return t * per_token + 6 * r * m.vocab_size * 4
