"""Pure-jnp causal attention over packed variable-length segments (the flash kernels' oracle).

Where it sits: a step whose batch is one long fresh prompt (no cached context) can attend over
the chunk's own K/V with ``pallas_kernels.flash_attention`` instead of reading them back from
pages; CPU runs this file, GPU/TPU the kernels tested against it.

Packing (like FlashAttention's varlen ``cu_seqlens``)::

    tokens:  | seg 0 (5)   | seg 1 (3) | padding |
    cu_seqlens = [0, 5, 8]; token t of segment s sees tokens cu[s] .. t (and > t - window)

Rows past ``cu_seqlens[-1]`` are padding and get zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_CHUNK_BYTES = 64 * 1024 * 1024
_NEG = -1e30


def validate_inputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cu_seqlens: jax.Array | None,
    *,
    sliding_window: int | None,
    soft_cap: float | None,
) -> None:
    """Static shape/dtype checks shared by the reference and the kernels; raises ValueError."""
    if q.ndim != 3:
        raise ValueError(f"q must be [num_tokens, num_q_heads, head_dim], got shape {q.shape}")
    if k.ndim != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k must be [{q.shape[0]}, num_kv_heads, {q.shape[2]}], got shape {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v shape {v.shape} != k shape {k.shape}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"num_q_heads={q.shape[1]} is not a multiple of num_kv_heads={k.shape[1]}")
    if cu_seqlens is not None and (cu_seqlens.ndim != 1 or cu_seqlens.dtype != jnp.int32):
        raise ValueError(
            f"cu_seqlens must be int32[num_segments + 1], got {cu_seqlens.dtype}{cu_seqlens.shape}"
        )
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be > 0 or None, got {soft_cap}")


def segment_starts(num_tokens: int, cu_seqlens: jax.Array | None) -> jax.Array:
    """``int32[num_tokens]``: first token of each row's segment; padding rows get ``row + 1``.

    With it the visible keys of row t are exactly ``seg_start[t] <= key <= t``.
    """
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    if cu_seqlens is None:
        return jnp.zeros((num_tokens,), jnp.int32)
    seg = jnp.sum(cu_seqlens[None, 1:] <= t[:, None], axis=1, dtype=jnp.int32)  # searchsorted, "right"
    seg = jnp.clip(seg, 0, cu_seqlens.shape[0] - 2)
    start = cu_seqlens[seg]
    return jnp.where(t < cu_seqlens[-1], start, t + 1).astype(jnp.int32)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cu_seqlens: jax.Array | None = None,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Causal attention within packed segments.

    Args:
      q: ``[num_tokens, num_q_heads, head_dim]``; k, v: ``[num_tokens, num_kv_heads, head_dim]``.
      cu_seqlens: ``int32[num_segments + 1]`` segment boundaries (0 first, non-decreasing);
        None = one segment of all tokens.
      sm_scale, sliding_window, soft_cap: as in ``ragged_paged_attention``.

    Returns ``[num_tokens, num_q_heads, head_dim]`` in q's dtype; padding rows are zeros.
    """
    validate_inputs(q, k, v, cu_seqlens, sliding_window=sliding_window, soft_cap=soft_cap)
    num_tokens, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    if num_tokens == 0:
        return q
    seg = segment_starts(num_tokens, cu_seqlens)
    key_pos = jnp.arange(num_tokens, dtype=jnp.int32)
    end = num_tokens if cu_seqlens is None else cu_seqlens[-1]
    live = (key_pos < end)[:, None, None]  # padding K/V rows may hold garbage: never let them reach a sum
    kf = jnp.where(live, k.astype(jnp.float32), 0.0)
    vf = jnp.where(live, v.astype(jnp.float32), 0.0)
    chunk = max(1, min(num_tokens, _CHUNK_BYTES // (num_tokens * hq * 4)))
    num_chunks = -(-num_tokens // chunk)
    pad = num_chunks * chunk - num_tokens
    qf = jnp.pad(q.astype(jnp.float32), ((0, pad), (0, 0), (0, 0)))
    qf = qf.reshape(num_chunks, chunk, hkv, group, d)
    rows = jnp.arange(num_chunks * chunk, dtype=jnp.int32).reshape(num_chunks, chunk)
    seg_c = jnp.pad(seg, (0, pad), constant_values=num_tokens + 1).reshape(num_chunks, chunk)

    def one_chunk(args):
        qc, rc, sc = args  # [chunk, hkv, group, d], [chunk], [chunk]
        mask = (key_pos[None, :] <= rc[:, None]) & (key_pos[None, :] >= sc[:, None])
        if sliding_window is not None:
            mask &= key_pos[None, :] > rc[:, None] - sliding_window
        s = jnp.einsum("chgd,lhd->chgl", qc, kf) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        m4 = mask[:, None, None, :]
        s = jnp.where(m4, s, _NEG)
        p = jnp.where(m4, jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)), 0.0)
        o = jnp.einsum("chgl,lhd->chgd", p, vf)
        return o / jnp.maximum(jnp.sum(p, axis=-1), 1e-30)[..., None]

    if num_chunks == 1:
        out = one_chunk((qf[0], rows[0], seg_c[0]))[None]
    else:
        out = jax.lax.map(one_chunk, (qf, rows, seg_c))
    out = out.reshape(num_chunks * chunk, hq, d)[:num_tokens]
    return out.astype(q.dtype)
