"""The model's attention entry: KV write + ragged paged attention over the page pool.

Where it sits: called once per layer by ``decoder``. It adapts the packed ``StepInput`` to the
kernel signatures of ``pallas_kernels`` (which picks the Pallas kernel on GPU/TPU and the
pure-jnp reference on CPU). A step made only of fresh prompts (the runner's ``fresh_prefill``
variant) attends over the chunk's own K/V with flash attention (packed segments =
``query_start_loc``); every other step reads the context back from the pages.
"""

from __future__ import annotations

import jax

import pallas_kernels
from jserve.step_input import StepInput


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
             slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """k/v: [T, Nkv, d] into pages [num_pages, page_size, Nkv, d] at ``slot_mapping`` int32[T]."""
    return pallas_kernels.write_kv(k_pages, v_pages, k, v, slot_mapping)


def fresh_prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, batch: StepInput, *,
                            sm_scale: float, sliding_window: int | None) -> jax.Array:
    """q: [T, Nq, d], k/v: [T, Nkv, d] of a step whose every row is a fresh prompt (its whole
    context is this chunk) -> [T, Nq, d]; causal within each row's segment, padding rows zero."""
    return pallas_kernels.flash_attention(q, k, v, batch.query_start_loc, sm_scale=sm_scale,
                                          sliding_window=sliding_window)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, batch: StepInput, *,
                    sm_scale: float, sliding_window: int | None) -> jax.Array:
    """q: [T, Nq, d] -> [T, Nq, d], each token attending causally to its request's pages."""
    return pallas_kernels.ragged_paged_attention(
        q, k_pages, v_pages, batch.page_table, batch.seq_lens, batch.query_start_loc,
        batch.num_seqs, sm_scale=sm_scale, sliding_window=sliding_window)
