"""Dispatching entry point for ragged paged attention: picks reference or kernel by backend.

Where it sits: called by the model's attention layer inside the jitted step. The backend is
``jax.default_backend()`` at trace time:

    cpu -> reference.py (pure jnp)     gpu -> gpu.py (Pallas, Triton lowering)
    tpu -> tpu.py (Pallas Mosaic TPU)

``interpret=True`` runs the backend's kernel in Pallas interpret mode; on CPU it runs the GPU
kernel's Triton interpret mode (tests call ``gpu``/``tpu`` directly for a specific one).
"""

from __future__ import annotations

import jax

from pallas_kernels.ragged_paged_attention import gpu, reference, tpu


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
    max_q_len: int | None = None,
    decode_rows: int = 1,
) -> jax.Array:
    """See ``reference.ragged_paged_attention`` for shapes and semantics.

    ``max_q_len`` (static): a promise that no sequence has more query rows than this (decode
    steps: 1); the GPU kernel then runs its decode launch only. ``decode_rows`` (static): query
    rows per sequence the GPU kernel's decode class should hold (speculative verify rows: 1 +
    k), so such sequences take its split-KV launch instead of the prefill tiles. Neither ever
    changes the result.

    ``q: [num_tokens, num_q_heads, head_dim]``, ``k_pages/v_pages: [num_pages, page_size,
    num_kv_heads, head_dim]`` -> ``[num_tokens, num_q_heads, head_dim]``.
    """
    args = (q, k_pages, v_pages, page_table, seq_lens, query_start_loc, num_seqs)
    kw = dict(
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        k_scales=k_scales,
        v_scales=v_scales,
    )
    backend = jax.default_backend()
    if backend == "tpu":
        return tpu.ragged_paged_attention(*args, interpret=interpret, **kw)
    if backend == "gpu" or interpret:
        return gpu.ragged_paged_attention(*args, interpret=interpret, max_q_len=max_q_len,
                                          decode_rows=decode_rows, **kw)
    return reference.ragged_paged_attention(*args, **kw)
