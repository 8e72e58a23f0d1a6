"""Pure-jnp reference of the fused decode layer: one Llama-family decoder layer over decode rows.

Where it sits: ``pallas_kernels.decode_layer`` runs it on CPU (and anywhere the GPU kernel,
``gpu.py``, does not apply); the kernel's tests compare against it. The engine calls the entry
point for the draft model's decodes (``jserve/model/fused_decode.py``), where a whole layer in
one launch replaces ~13 small kernels.

One row = one sequence's next token at ``positions[r]``; its context (positions < pos) is in
the row's pages of the pool; the new token's K/V are written at ``slot_mapping[r]`` and
attended from registers (so a write to the null page still attends the token's own K/V).
Rows at or past ``num_rows[0]`` are idle: x passes through, nothing is written. Shapes::

    x              [R, H]                  the residual stream (bf16 / f32)
    weights: every layer's, stacked ([L, ...]); ``layer`` (static) picks one (a slice of a
    stacked array passed to a custom call would be a copy kernel per weight)
    ln_attn, ln_mlp [L, H]                 RMSNorm weights
    wqkv           [L, H, Nkv, G + 2, d]   per kv head: G query heads, k, v (G a power of two)
    bqkv           [L, Nkv, G + 2, d] | None  the qkv bias (Qwen2)
    wo             [L, Nkv * G * d, H]
    wgu            [L, H, 2, I]            gate, up
    wd             [L, I, H]
    cos, sin       f32[R, d]               RoPE at each row's position ("rotate half" layout)
    k/v_pages      [N, ps, Nkv, d]         the layer's pool (16-bit; page 0 is the null page)
    page_table     int32[R, P]
    positions, slot_mapping  int32[R]; num_rows int32[1]
    -> (x [R, H], k_pages, v_pages)

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
            v_pages: jax.Array, page_table: jax.Array, positions: jax.Array,
            sm_scale: float) -> jax.Array:
    """q f32[R, Nkv, G, d], k_new/v_new [R, Nkv, d] -> f32[R, Nkv, G, d]: softmax over the
    row's context keys (positions < pos, from its pages) and its own new key."""
    r, p = page_table.shape
    ps = k_pages.shape[1]
    kpos = jnp.arange(p * ps)
    k = k_pages[page_table].reshape(r, p * ps, *k_pages.shape[2:]).astype(jnp.float32)
    v = v_pages[page_table].reshape(r, p * ps, *v_pages.shape[2:]).astype(jnp.float32)
    ctx = kpos[None, :] < positions[:, None]                                  # [R, K]
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
                 page_table: jax.Array, positions: jax.Array, slot_mapping: jax.Array,
                 num_rows: jax.Array, *, layer: int, eps: float, sm_scale: float
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """See the module docstring."""
    ln_attn, wqkv, wo, ln_mlp, wgu, wd = (a[layer] for a in (ln_attn, wqkv, wo, ln_mlp, wgu, wd))
    bqkv = None if bqkv is None else bqkv[layer]
    r, _ = x.shape
    g = wqkv.shape[2] - 2
    dt = x.dtype
    live = jnp.arange(r) < num_rows[0]
    h = rms(x, ln_attn, eps)
    qkv = jnp.einsum("rh,hjcd->rjcd", h, wqkv, preferred_element_type=jnp.float32).astype(dt)
    if bqkv is not None:
        qkv = qkv + bqkv[None]
    nkv, d = qkv.shape[1], qkv.shape[3]
    q = rope(qkv[:, :, :g].reshape(r, nkv * g, d), cos, sin).reshape(r, nkv, g, d)
    k = rope(qkv[:, :, g], cos, sin).astype(k_pages.dtype)
    v = qkv[:, :, g + 1].astype(v_pages.dtype)
    o = _attend(q.astype(jnp.float32), k, v, k_pages, v_pages, page_table, positions, sm_scale)
    attn = jnp.dot(o.astype(dt).reshape(r, -1), wo, preferred_element_type=jnp.float32).astype(dt)
    x1 = x + attn
    h2 = rms(x1, ln_mlp, eps)
    gu = jnp.einsum("rh,hci->rci", h2, wgu, preferred_element_type=jnp.float32).astype(dt)
    act = jax.nn.silu(gu[:, 0]) * gu[:, 1]
    out = x1 + jnp.dot(act, wd, preferred_element_type=jnp.float32).astype(dt)
    slots = jnp.where(live, slot_mapping, k_pages.shape[0] * k_pages.shape[1])  # idle: dropped
    ps = k_pages.shape[1]
    k_pages = k_pages.at[slots // ps, slots % ps].set(k, mode="drop")
    v_pages = v_pages.at[slots // ps, slots % ps].set(v, mode="drop")
    return jnp.where(live[:, None], out, x), k_pages, v_pages
