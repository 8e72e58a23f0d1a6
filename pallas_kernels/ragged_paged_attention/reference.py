"""Pure-jnp ragged paged attention: the semantics every kernel is tested against.

Where it sits: the model's attention layer calls ``pallas_kernels.ragged_paged_attention``
inside the jitted step; on CPU that dispatches here, and the GPU/TPU kernels in this
sub-package are tested against this file in interpret mode.

The ragged batch (one row of ``query_start_loc`` per sequence)::

    q rows:   | seq 0 chunk (3) | seq 1 (1) | seq 2 chunk (4)   | padding ...  |
              0                 3           4                   8 = qsl[num_seqs]
    seq 2 context (seq_lens[2] = 10), its chunk is the LAST 4 positions:
              [ 0 1 2 3 4 5 | 6 7 8 9 ]     query j sits at position 6 + j and sees
                                             positions <= its own (and > pos - window)

Keys/values live in ``[num_pages, page_size, num_kv_heads, head_dim]`` pools; row ``i`` of
``page_table`` lists the pages of sequence ``i`` in order (unused entries are 0: page 0 is a
real page that may hold garbage or NaN, so every masked value is removed with ``where``
before it can reach a sum: ``0 * NaN`` is NaN).

Memory: tokens are processed in static chunks (``lax.map``) and each chunk gathers the pages
of its tokens' sequences: ``[chunk, pages_per_seq * page_size, num_kv_heads, head_dim]``,
bounded by ``_CHUNK_BYTES``. A decode batch (one token per sequence) therefore gathers each
sequence's pages once. A prefill chunk gathers its context once per token (work of the same
order as its score FLOPs / G); gathering once per sequence and scoring every token against all
sequence slots measured 2x slower on CPU for 3 slots x 258 tokens, so this path stays single.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import kv_format

# Bytes of gathered float32 K (or V) one token chunk may hold; bounds the reference's memory.
_CHUNK_BYTES = 64 * 1024 * 1024
_NEG = -1e30


def validate_inputs(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    seq_lens: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
    *,
    sliding_window: int | None,
    soft_cap: float | None,
    k_scales: jax.Array | None,
    v_scales: jax.Array | None,
) -> None:
    """Static (shape/dtype) checks shared by the reference and the kernels; raises ValueError."""
    if q.ndim != 3:
        raise ValueError(f"q must be [num_tokens, num_q_heads, head_dim], got shape {q.shape}")
    if k_pages.ndim != 4:
        raise ValueError(
            f"k_pages must be [num_pages, page_size, num_kv_heads, head_dim], got shape {k_pages.shape}"
        )
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages shape {v_pages.shape} != k_pages shape {k_pages.shape}")
    if v_pages.dtype != k_pages.dtype:
        raise ValueError(f"v_pages dtype {v_pages.dtype} != k_pages dtype {k_pages.dtype}")
    _, num_q_heads, head_dim = q.shape
    _, _, num_kv_heads, kv_head_dim = k_pages.shape
    if kv_head_dim != head_dim:
        raise ValueError(f"head_dim mismatch: q has {head_dim}, k_pages has {kv_head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if page_table.ndim != 2:
        raise ValueError(f"page_table must be int32[max_seqs, pages_per_seq], got shape {page_table.shape}")
    max_seqs = page_table.shape[0]
    if seq_lens.shape != (max_seqs,):
        raise ValueError(f"seq_lens must be int32[{max_seqs}] (max_seqs), got shape {seq_lens.shape}")
    if query_start_loc.shape != (max_seqs + 1,):
        raise ValueError(
            f"query_start_loc must be int32[{max_seqs + 1}] (max_seqs + 1), got shape {query_start_loc.shape}"
        )
    if num_seqs.shape != (1,):
        raise ValueError(f"num_seqs must be int32[1], got shape {num_seqs.shape}")
    for name, a in (
        ("page_table", page_table),
        ("seq_lens", seq_lens),
        ("query_start_loc", query_start_loc),
        ("num_seqs", num_seqs),
    ):
        if a.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {a.dtype}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be > 0 or None, got {soft_cap}")
    quantized = kv_format.is_quantized(k_pages.dtype)
    if (k_scales is None) != (v_scales is None):
        raise ValueError("k_scales and v_scales must be given together")
    if quantized and k_scales is None:
        raise ValueError(f"k_pages dtype {k_pages.dtype} is quantized: k_scales/v_scales are required")
    if k_scales is not None:
        want = (k_pages.shape[0], num_kv_heads)
        for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
            if s.shape != want:
                raise ValueError(f"{name} must be float32[num_pages, num_kv_heads]={want}, got {s.shape}")


def token_metadata(
    num_tokens: int,
    seq_lens: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per query row: its sequence index, its absolute position, and whether it is real.

    Returns ``(seq_idx int32[num_tokens], pos int32[num_tokens], valid bool[num_tokens])``.
    Padding rows (``>= query_start_loc[num_seqs]``) get ``valid=False``, seq 0 and position -1.
    """
    max_seqs = seq_lens.shape[0]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    n = jnp.clip(num_seqs[0], 0, max_seqs)
    end = query_start_loc[n]
    # = searchsorted(query_start_loc[1:], t, "right"), as one compare-and-count (no while loop).
    seq_idx = jnp.sum(query_start_loc[None, 1:] <= t[:, None], axis=1, dtype=jnp.int32)
    seq_idx = jnp.clip(seq_idx, 0, max_seqs - 1)
    valid = t < end
    q_start = query_start_loc[seq_idx]
    q_len = query_start_loc[seq_idx + 1] - q_start
    pos = seq_lens[seq_idx] - q_len + (t - q_start)
    seq_idx = jnp.where(valid, seq_idx, 0)
    pos = jnp.where(valid, pos, -1)
    return seq_idx, pos, valid


def _dequant(pages: jax.Array, scales: jax.Array | None, page_ids: jax.Array) -> jax.Array:
    """Gather ``pages[page_ids]`` as float32, times its per-page-per-head scale if given.

    ``page_ids: [c, pages_per_seq]`` -> ``[c, pages_per_seq * page_size, num_kv_heads, head_dim]``.
    """
    c, pps = page_ids.shape
    _, page_size, kvh, d = pages.shape
    x = kv_format.values(pages[page_ids]).astype(jnp.float32)  # [c, pps, page_size, kvh, d]
    if scales is not None:
        x = x * scales[page_ids][:, :, None, :, None].astype(jnp.float32)
    return x.reshape(c, pps * page_size, kvh, d)


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
) -> jax.Array:
    """Causal attention of a ragged batch of query chunks over paged K/V (pure jnp, jittable).

    Args:
      q: ``[num_tokens, num_q_heads, head_dim]``; rows of sequence i are
        ``query_start_loc[i]:query_start_loc[i+1]``, rows past ``query_start_loc[num_seqs]`` are padding.
      k_pages, v_pages: ``[num_pages, page_size, num_kv_heads, head_dim]`` (bf16/fp16/f32, or
        int8/fp8 with scales).
      page_table: ``int32[max_seqs, pages_per_seq]`` page ids of each sequence, 0-padded.
      seq_lens: ``int32[max_seqs]`` context length of each sequence including this chunk.
      query_start_loc: ``int32[max_seqs + 1]`` row offsets into q (padding rows repeat the last).
      num_seqs: ``int32[1]`` number of real sequences.
      sm_scale: multiplier of ``q . k`` (usually ``head_dim ** -0.5``).
      sliding_window: W -> a query at position p sees positions ``p - W + 1 .. p``.
      soft_cap: c -> scores become ``c * tanh(score / c)`` (after ``sm_scale``).
      k_scales, v_scales: ``float32[num_pages, num_kv_heads]``: K/V value = page value * scale.

    Returns:
      ``[num_tokens, num_q_heads, head_dim]`` in q's dtype; padding rows are zeros.
    """
    validate_inputs(
        q, k_pages, v_pages, page_table, seq_lens, query_start_loc, num_seqs,
        sliding_window=sliding_window, soft_cap=soft_cap, k_scales=k_scales, v_scales=v_scales,
    )  # fmt: skip
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    pages_per_seq = page_table.shape[1]
    ctx = pages_per_seq * page_size
    group = num_q_heads // num_kv_heads
    if num_tokens == 0:
        return q

    seq_idx, pos, valid = token_metadata(num_tokens, seq_lens, query_start_loc, num_seqs)

    key_pos = jnp.arange(ctx, dtype=jnp.int32)
    per_token = ctx * num_kv_heads * head_dim * 4  # bytes of one token's gathered float32 K
    chunk = max(1, min(num_tokens, _CHUNK_BYTES // per_token))
    num_chunks = -(-num_tokens // chunk)
    pad = num_chunks * chunk - num_tokens
    qf = jnp.pad(q.astype(jnp.float32), ((0, pad), (0, 0), (0, 0)))
    qf = qf.reshape(num_chunks, chunk, num_kv_heads, group, head_dim)
    seq_c = jnp.pad(seq_idx, (0, pad)).reshape(num_chunks, chunk)
    pos_c = jnp.pad(pos, (0, pad), constant_values=-1).reshape(num_chunks, chunk)

    def softmax_pv(s: jax.Array, mask: jax.Array, v: jax.Array, pv: str) -> jax.Array:
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        m4 = mask[:, None, None, :]
        s = jnp.where(m4, s, _NEG)
        p = jnp.where(m4, jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)), 0.0)
        return jnp.einsum(pv, p, v) / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)

    def one_chunk(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        qc, sc, pc = args  # [chunk, kvh, group, d], [chunk], [chunk]
        # A key is visible iff causal (<= own position; padding rows have pos -1 -> none) and in window.
        mask = key_pos[None, :] <= pc[:, None]  # [chunk, keys]
        if sliding_window is not None:
            mask &= key_pos[None, :] > pc[:, None] - sliding_window
        pages = page_table[sc]  # [chunk, pages_per_seq]
        k = jnp.where(mask[:, :, None, None], _dequant(k_pages, k_scales, pages), 0.0)
        v = jnp.where(mask[:, :, None, None], _dequant(v_pages, v_scales, pages), 0.0)
        s = jnp.einsum("chgd,clhd->chgl", qc, k) * sm_scale
        return softmax_pv(s, mask, v, "chgl,clhd->chgd")

    if num_chunks == 1:
        out = one_chunk((qf[0], seq_c[0], pos_c[0]))[None]
    else:
        out = jax.lax.map(one_chunk, (qf, seq_c, pos_c))
    out = out.reshape(num_chunks * chunk, num_q_heads, head_dim)[:num_tokens]
    out = jnp.where(valid[:, None, None], out, 0.0)
    return out.astype(q.dtype)
