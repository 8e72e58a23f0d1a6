"""Pure-jnp reference of the fused decode layer: one Llama-family decoder layer over short rows.

Where it sits: ``pallas_kernels.decode_layer`` runs it on CPU (and anywhere the GPU kernel,
``gpu.py``, does not apply); the kernel's tests compare against it. Built for the draft
model's forwards over short rows, where a whole layer in one launch would replace ~13 small
kernels (not wired into the engine: ``api.py`` says why).

Rows are ragged (``query_start_loc``): row r's tokens are ``[qsl[r], qsl[r + 1])``, at
``positions``; a token attends its row's pages at positions below its own (the context and
the row's earlier tokens, whose K/V this layer writes first) and its own new K/V. Every token's
K/V is written at ``slot_mapping[t]``. Rows at or past ``num_rows[0]`` are idle, and so are the
tokens past the live rows': x passes through, nothing is written. Shapes::

    x              [T, H]                  the residual stream (bf16 / f32)
    weights: every layer's, stacked ([L, ...]); ``layer`` (static) picks one (a slice of a
    stacked array passed to a custom call would be a copy kernel per weight)
    ln_attn, ln_mlp [L, H]                 RMSNorm weights
    wqkv           [L, H, Nkv, G + 2, d]   per kv head: G query heads, k, v (G a power of two)
    bqkv           [L, Nkv, G + 2, d] | None  the qkv bias (Qwen2)
    wo             [L, Nkv * G * d, H]
    wgu            [L, H, 2, I]            gate, up
    wd             [L, I, H]
    cos, sin       f32[T, d]               RoPE at each token's position ("rotate half" layout)
    k/v_pages      [N, ps, Nkv, d]         the layer's pool (16-bit; page 0 is the null page)
    page_table     int32[R, P]; query_start_loc int32[R + 1]
    positions, slot_mapping  int32[T]; num_rows int32[1]
    -> (x [T, H], k_pages, v_pages)

Roundings follow the unfused layer: every projection's output, the RoPE'd q/k, the attention
output and each residual sum are rounded to x's dtype; statistics and dot products in f32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30


def rms(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """[R, H] -> [R, H] in x's dtype (f32 statistics, scaled like HF)."""
    xf = x.astype(jnp.float32)
    return w * (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [R, heads, d], cos/sin f32[R, d] -> rotated, in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos[:, None] + rot * sin[:, None]).astype(x.dtype)


def _attend(q: jax.Array, k_new: jax.Array, v_new: jax.Array, k_pages: jax.Array,
            v_pages: jax.Array, tables: jax.Array, positions: jax.Array,
            sm_scale: float) -> jax.Array:
    """q f32[T, Nkv, G, d], k_new/v_new [T, Nkv, d], tables int32[T, P] (each token's row's
    pages) -> f32[T, Nkv, G, d]: softmax over the keys below the token's position in those
    pages and its own new key."""
    t, p = tables.shape
    ps = k_pages.shape[1]
    kpos = jnp.arange(p * ps)
    k = k_pages[tables].reshape(t, p * ps, *k_pages.shape[2:]).astype(jnp.float32)
    v = v_pages[tables].reshape(t, p * ps, *v_pages.shape[2:]).astype(jnp.float32)
    ctx = kpos[None, :] < positions[:, None]                                  # [T, K]
    s = jnp.einsum("rjgd,rkjd->rjgk", q, k) * sm_scale
    s = jnp.where(ctx[:, None, None, :], s, NEG)
    s_new = jnp.einsum("rjgd,rjd->rjg", q, k_new.astype(jnp.float32))[..., None] * sm_scale
    m = jnp.maximum(jnp.max(s, axis=-1, keepdims=True), s_new)
    e = jnp.where(ctx[:, None, None, :], jnp.exp(s - m), 0.0)
    e_new = jnp.exp(s_new - m)
    v = jnp.where(ctx[:, :, None, None], v, 0.0)                              # NaN pages stay out
    acc = jnp.einsum("rjgk,rkjd->rjgd", e, v) + e_new * v_new.astype(jnp.float32)[:, :, None]
    return acc / (jnp.sum(e, axis=-1, keepdims=True) + e_new)


def decode_layer(x: jax.Array, ln_attn: jax.Array, wqkv: jax.Array, bqkv: jax.Array | None,
                 wo: jax.Array, ln_mlp: jax.Array, wgu: jax.Array, wd: jax.Array,
                 cos: jax.Array, sin: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                 page_table: jax.Array, query_start_loc: jax.Array, positions: jax.Array,
                 slot_mapping: jax.Array, num_rows: jax.Array, *, layer: int, eps: float,
                 sm_scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """See the module docstring."""
    ln_attn, wqkv, wo, ln_mlp, wgu, wd = (a[layer] for a in (ln_attn, wqkv, wo, ln_mlp, wgu, wd))
    bqkv = None if bqkv is None else bqkv[layer]
    t, r = x.shape[0], page_table.shape[0]
    g = wqkv.shape[2] - 2
    dt = x.dtype
    tok = jnp.arange(t)
    live = tok < query_start_loc[jnp.minimum(num_rows[0], r)]
    row_of = jnp.clip(jnp.searchsorted(query_start_loc, tok, side="right") - 1, 0, r - 1)
    h = rms(x, ln_attn, eps)
    qkv = jnp.einsum("rh,hjcd->rjcd", h, wqkv, preferred_element_type=jnp.float32).astype(dt)
    if bqkv is not None:
        qkv = qkv + bqkv[None]
    nkv, d = qkv.shape[1], qkv.shape[3]
    q = rope(qkv[:, :, :g].reshape(t, nkv * g, d), cos, sin).reshape(t, nkv, g, d)
    k = rope(qkv[:, :, g], cos, sin).astype(k_pages.dtype)
    v = qkv[:, :, g + 1].astype(v_pages.dtype)
    ps = k_pages.shape[1]
    slots = jnp.where(live, slot_mapping, k_pages.shape[0] * ps)             # idle: dropped
    k_pages = k_pages.at[slots // ps, slots % ps].set(k, mode="drop")
    v_pages = v_pages.at[slots // ps, slots % ps].set(v, mode="drop")
    o = _attend(q.astype(jnp.float32), k, v, k_pages, v_pages, page_table[row_of], positions,
                sm_scale)
    attn = jnp.dot(o.astype(dt).reshape(t, -1), wo, preferred_element_type=jnp.float32).astype(dt)
    x1 = x + attn
    h2 = rms(x1, ln_mlp, eps)
    gu = jnp.einsum("rh,hci->rci", h2, wgu, preferred_element_type=jnp.float32).astype(dt)
    act = jax.nn.silu(gu[:, 0]) * gu[:, 1]
    out = x1 + jnp.dot(act, wd, preferred_element_type=jnp.float32).astype(dt)
    return jnp.where(live[:, None], out, x), k_pages, v_pages
