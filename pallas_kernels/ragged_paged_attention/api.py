"""Dispatching entry point for ragged paged attention: picks reference or kernel by backend.

Where it sits: called by the model's attention layer inside the jitted step. CPU runs the
pure-jnp reference; GPU and TPU run the Pallas kernels (``interpret=True`` runs a kernel in
Pallas interpret mode on any backend, for tests).
"""

from __future__ import annotations

import jax

from pallas_kernels.ragged_paged_attention import reference


def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    seq_lens: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """See ``reference.ragged_paged_attention`` for shapes and semantics.

    ``q: [num_tokens, num_q_heads, head_dim]``, ``k_pages/v_pages: [num_pages, page_size,
    num_kv_heads, head_dim]`` -> ``[num_tokens, num_q_heads, head_dim]``.
    """
    del interpret  # no kernel registered yet for any backend: every backend runs the reference
    return reference.ragged_paged_attention(
        q, k_pages, v_pages, page_table, seq_lens, query_start_loc, num_seqs,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        k_scales=k_scales, v_scales=v_scales,
    )  # fmt: skip
