"""Pure-jnp KV write: scatter the step's new K/V rows into their slots of the page pool.

Where it sits: inside the jitted step, each attention layer writes its new ``k, v`` for the
step's tokens into the layer's (donated) pool before attending. Under donation XLA performs
the ``.at[].set`` scatter in place: the pool is never copied.

Slots are flat: ``slot = page * page_size + offset``. Padding tokens carry a slot inside
page 0 (the null page) so their writes land where nothing reads.

Quantized pools (int8 / fp8, the latter stored as uint8 bits: ``pallas_kernels/kv_format.py``)
take per-page-per-head scales ``float32[num_pages, num_kv_heads]`` fixed before the write
(``scales.py`` chooses them); values are divided by the scale of their page, rounded (int8) and
clipped to the value dtype's range.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels import kv_format
from pallas_kernels.kv_format import is_quantized
from pallas_kernels.kv_write import scales


def validate_inputs(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
    k_scales: jax.Array | None,
    v_scales: jax.Array | None,
) -> None:
    """Static shape/dtype checks shared by the reference and the kernels; raises ValueError."""
    if k_pages.ndim != 4:
        raise ValueError(
            f"k_pages must be [num_pages, page_size, num_kv_heads, head_dim], got shape {k_pages.shape}"
        )
    if v_pages.shape != k_pages.shape or v_pages.dtype != k_pages.dtype:
        raise ValueError(
            f"v_pages {v_pages.shape}/{v_pages.dtype} != k_pages {k_pages.shape}/{k_pages.dtype}"
        )
    _, _, kvh, d = k_pages.shape
    if k_new.ndim != 3 or k_new.shape[1:] != (kvh, d):
        raise ValueError(f"k_new must be [num_tokens, {kvh}, {d}], got shape {k_new.shape}")
    if v_new.shape != k_new.shape:
        raise ValueError(f"v_new shape {v_new.shape} != k_new shape {k_new.shape}")
    if slot_mapping.shape != (k_new.shape[0],) or slot_mapping.dtype != jnp.int32:
        raise ValueError(
            f"slot_mapping must be int32[{k_new.shape[0]}], "
            f"got {slot_mapping.dtype}{list(slot_mapping.shape)}"
        )
    if (k_scales is None) != (v_scales is None):
        raise ValueError("k_scales and v_scales must be given together")
    if is_quantized(k_pages.dtype) and k_scales is None:
        raise ValueError(f"k_pages dtype {k_pages.dtype} is quantized: k_scales/v_scales are required")
    if k_scales is not None:
        want = (k_pages.shape[0], kvh)
        for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
            if s.shape != want:
                raise ValueError(f"{name} must be float32[num_pages, num_kv_heads]={want}, got {s.shape}")


def quantize_rows(x: jax.Array, scales: jax.Array, page_ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``x: [num_tokens, kvh, d]`` -> ``dtype`` using the scale of each row's page and head."""
    s = scales[page_ids].astype(jnp.float32)[:, :, None]  # [num_tokens, kvh, 1]
    y = x.astype(jnp.float32) / s
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        y = jnp.clip(jnp.round(y), info.min, info.max)
    else:
        info = jnp.finfo(dtype)
        y = jnp.clip(y, float(info.min), float(info.max))
    return y.astype(dtype)


def rows_in_pool_dtype(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
    k_scales: jax.Array | None,
    v_scales: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """-> ``k_new/v_new: [num_tokens, kvh, d]`` in the pool's storage dtype (quantized with their
    page's scales for int8/fp8 pools; fp8 as its uint8 bits). Shared by the reference and every
    kernel; inputs already validated with ``validate_inputs``."""
    if is_quantized(k_pages.dtype):
        page_ids = slot_mapping // k_pages.shape[1]
        vd = kv_format.value_dtype(k_pages.dtype)
        k_new = quantize_rows(k_new, k_scales, page_ids, vd)
        v_new = quantize_rows(v_new, v_scales, page_ids, vd)
    return kv_format.bits(k_new, k_pages.dtype), kv_format.bits(v_new, v_pages.dtype)


def write_kv(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
    *,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Write ``k_new/v_new: [num_tokens, num_kv_heads, head_dim]`` into ``int32[num_tokens]`` slots.

    ``k_pages/v_pages: [num_pages, page_size, num_kv_heads, head_dim]``; returns the updated pair
    (same shapes and dtypes). Duplicate slots are only allowed inside page 0 (padding).
    """
    validate_inputs(k_pages, v_pages, k_new, v_new, slot_mapping, k_scales, v_scales)
    k_new, v_new = rows_in_pool_dtype(k_pages, v_pages, k_new, v_new, slot_mapping, k_scales, v_scales)
    num_pages, page_size, kvh, d = k_pages.shape
    flat_k = k_pages.reshape(num_pages * page_size, kvh, d)
    flat_v = v_pages.reshape(num_pages * page_size, kvh, d)
    flat_k = scatter_rows(flat_k, slot_mapping, k_new)
    flat_v = scatter_rows(flat_v, slot_mapping, v_new)
    return flat_k.reshape(k_pages.shape), flat_v.reshape(v_pages.shape)


def split_rope(qkv: jax.Array, cos: jax.Array, sin: jax.Array, nkv: int, groups: int
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A fused QKV projection's output [T, Nkv * (G + 2) * d] (per kv head: G query heads, K, V)
    -> (q [T, Nkv * G, d], k [T, Nkv, d], v [T, Nkv, d]), q and K rotated by cos / sin float32
    [T, d] (HF's rotate-half RoPE, computed in float32, rounded to qkv's dtype)."""
    t = qkv.shape[0]
    y = qkv.reshape(t, nkv, groups + 2, -1)
    d = y.shape[-1]

    def rotated(x: jax.Array) -> jax.Array:   # x [T, heads, d]
        xf, half = x.astype(jnp.float32), d // 2
        c, s = cos[:, None, :half], sin[:, None, :half]
        x1, x2 = xf[..., :half], xf[..., half:]
        return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)

    q = rotated(y[:, :, :groups].reshape(t, nkv * groups, d))
    return q, rotated(y[:, :, groups]), y[:, :, groups + 1]


def rope_write(qkv: jax.Array, cos: jax.Array, sin: jax.Array, slot_mapping: jax.Array,
               k_pages: jax.Array, v_pages: jax.Array, groups: int,
               write: Callable[..., tuple[jax.Array, jax.Array]] | None = None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``split_rope`` of the projection [T, Nkv * (G + 2) * d] in the pools' dtype, its K / V
    written at ``slot_mapping`` by ``write`` (None: ``write_kv``; the dispatcher passes its own)
    -> (q [T, Nkv * G, d], k_pages, v_pages). The reference of ``rope_write.rope_write``."""
    q, k, v = split_rope(qkv, cos, sin, k_pages.shape[2], groups)
    k_pages, v_pages = (write or write_kv)(k_pages, v_pages, k, v, slot_mapping)
    return q, k_pages, v_pages


def write_kv_quantized(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_scales: jax.Array,
    v_scales: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
    *,
    write: Callable[..., tuple[jax.Array, jax.Array]] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """A quantized pool's whole write: set the scales of the pages this step starts
    (``scales.page_scales``: from the row at each page's first slot), then write the rows with
    them. Pools ``[num_pages, page_size, kvh, d]`` (int8, or uint8 e4m3 bits), scales
    ``float32[num_pages, kvh]``, ``k_new/v_new: [T, kvh, d]``, ``slot_mapping: int32[T]`` ->
    ``(k_pages, v_pages, k_scales, v_scales)`` updated. ``write``: the row write (default this
    module's ``write_kv``; the dispatcher passes the backend's)."""
    ps, dtype = k_pages.shape[1], k_pages.dtype
    k_scales = scales.page_scales(k_scales, k_new, slot_mapping, ps, dtype)
    v_scales = scales.page_scales(v_scales, v_new, slot_mapping, ps, dtype)
    k_pages, v_pages = (write or write_kv)(k_pages, v_pages, k_new, v_new, slot_mapping,
                                k_scales=k_scales, v_scales=v_scales)
    return k_pages, v_pages, k_scales, v_scales


def scatter_rows(pool: jax.Array, index: jax.Array, rows: jax.Array) -> jax.Array:
    """``pool.at[index].set(rows, mode="drop")``: the row scatter of every pool write and page
    move, in place under donation for every pool the engine allocates (fp8 ones are uint8
    arrays: an fp8-typed array would be converted to f16 around the scatter,
    ``pallas_kernels/kv_format.py``)."""
    return pool.at[index].set(rows, mode="drop")
