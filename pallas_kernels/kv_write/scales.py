"""Per-page, per-head scales of a quantized (int8 / fp8) KV pool: chosen when a page is started.

Where it sits: inside the jitted step, each attention layer calls ``page_scales`` just before
``write_kv`` on a quantized pool; the write and the attention kernels then read the scales
(``float32[num_pages, num_kv_heads]``, real value = stored value x scale).

How a scale is chosen, and why::

    a page's scale is set by the row written at its first slot (offset 0), per kv head:
        scale = max_d |row| x headroom / qmax      (qmax 127 int8, 448 fp8 e4m3)
        headroom = FP8_HEADROOM (4) or INT8_HEADROOM (2)
    rows at later offsets are quantized with that scale (clipped if larger)

- Why per page and per head: K/V magnitudes differ a lot between heads (a few heads carry
  large outlier channels), and a page is the unit the pool already tracks: scales move with
  pages through copy-on-write, swap and the host tier, and a prefix-cache hit reuses a page
  together with its scale. Nothing a page holds is ever re-quantized.
- Why from the first row only, not from all the rows a step writes into the page: then a
  page's scale depends on its tokens alone, never on how the scheduler chunked the prompt or
  batched the request, so greedy decoding stays batch invariant (DESIGN invariant 5: alone,
  batched, chunked, after preemption or from a prefix-cache hit, the same tokens). The first
  row is written in the step that starts the page whether that is a prefill chunk or a decode.
- Why a headroom: the page's other rows come from neighbouring tokens, whose K/V magnitudes
  per head vary by small factors. Room is nearly free for fp8 (a float format keeps its
  relative precision at any scale; only values below 2^-6 of the scale lose bits) and costs
  int8 one bit of resolution, hence 4 vs 2.
- Why not one static scale (vLLM's default k_scale = v_scale = 1.0): int8 needs a scale, and
  fp8 at scale 1 flushes small values (< 2^-6) to subnormals and clips |x| > 448.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import kv_format

FP8_HEADROOM = 4.0
INT8_HEADROOM = 2.0
TINY = 1e-8


def qmax(dtype: jnp.dtype) -> float:
    dtype = jnp.dtype(dtype)
    return float(jnp.iinfo(dtype).max) if jnp.issubdtype(dtype, jnp.integer) else float(jnp.finfo(dtype).max)


def headroom(dtype: jnp.dtype) -> float:
    """The headroom of a pool whose values are ``dtype`` (module docstring)."""
    return FP8_HEADROOM if jnp.issubdtype(dtype, jnp.floating) else INT8_HEADROOM


def page_scales(scales: jax.Array, x: jax.Array, slot_mapping: jax.Array, page_size: int,
                dtype: jnp.dtype) -> jax.Array:
    """scales: float32[num_pages, kvh], x: [T, kvh, d] (this step's K or V rows), slot_mapping
    int32[T] -> scales with every page whose first slot this step writes set from that row
    (module docstring); other pages keep theirs. Padding rows (page 0) may set page 0's scale,
    which nothing reads. ``dtype``: the pool's (an fp8 pool's uint8 means e4m3 values)."""
    dtype = kv_format.value_dtype(dtype)
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)                 # [T, kvh]
    new = jnp.maximum(amax * headroom(dtype), TINY) / qmax(dtype)
    first = slot_mapping % page_size == 0
    target = jnp.where(first, slot_mapping // page_size, scales.shape[0])  # others: dropped
    return scales.at[target].set(new.astype(scales.dtype), mode="drop")
