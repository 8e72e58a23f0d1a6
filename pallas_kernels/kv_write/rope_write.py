"""The QKV projection's epilogue fused with RoPE and the K/V write (Mosaic GPU).

Where it sits: ``quant_matmul.api.quant_matmul_rope_write`` calls it after the persistent
decode kernel (``mgpu_decode``, ``store_mn`` partials) for a decode step's fused QKV
projection, in place of XLA's sum + RoPE fusion and its two K/V scatters. Semantics are
``reference.rope_write`` of the finished projection (``mgpu_decode.finish``, then the bias).

Why: per layer of the 8B's int8 batch-1 step the projection's partials go through three XLA
kernels before attention: the sum with RoPE (1.7 us), the K scatter (2.6 us) and the V scatter
(3.0 us) (H200, session 37's trace, benchmarks/RESULTS_v2_sessions_36-38.md). Here one kernel does all three::

    grid (T, Nkv): CTA (m, h) owns token row m's kv head group h: its G query heads, K and V
      bulk copies: parts[:, m, h] [S, G + 2, 2, d/2] f32, w_scale[h] (and bias[h]),
        cos[m, :d/2] and sin[m, :d/2] (c times each: a [c, d/2] tile) -> SMEM; slot_mapping[m]
      y = sum_s parts[s] * w_scale  -> the pool's dtype (+ bias, rounded again)
      for each c heads (the halves x1 = y[..., :d/2], x2 = y[..., d/2:]):
        x1 * cos - x2 * sin, x2 * cos + x1 * sin          (HF's rotate-half RoPE; its cos and
                                                           sin repeat over the two halves)
      q heads -> q[m, h]; K (roped) and V (not) -> k_pages / v_pages at slot_mapping[m]

The pools are updated in place (the caller passes them as refs; under the step's donation no
page but the written rows moves). Padding rows carry slots in the null page, as for
``write_kv``. Mosaic's layout inference takes register tiles of whole 128-value fragments only:
heads are rotated c at a time ([c, d/2] tiles, c = 128 / (d/2): 2 at head_dim 128, 4 at 64),
and the group's SMEM rows are padded to a multiple of c (the copies fill the first G + 2).
``w_scale`` None: ``parts`` is a dense projection's own output (S = 1, the model's dtype), so the
same kernel follows XLA's GEMM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

MAX_BARRIERS = 32   # Mosaic GPU: barriers per group
FRAGMENT = 128      # values per register fragment of a warpgroup (Mosaic's layout inference)


def _chunk(head_dim: int) -> int:
    """Heads per [heads, d/2] register tile: a whole 128-value fragment."""
    return max(1, FRAGMENT // (head_dim // 2))


def supports(split_k: int, groups: int, head_dim: int, bias: bool = False, scaled: bool = True) -> bool:
    """Whether S partials (``scaled``: float32 with per-channel scales) of a kv head group (G
    query heads, K, V) of ``head_dim`` fit the kernel (module docstring)."""
    return (head_dim in (64, 128, 256) and groups >= 1
            and split_k + scaled + 2 * _chunk(head_dim) + bias <= MAX_BARRIERS)


def rope_write(parts: jax.Array, w_scale: jax.Array | None, bias: jax.Array | None, cos: jax.Array,
               sin: jax.Array, slot_mapping: jax.Array, k_pages: jax.Array, v_pages: jax.Array, *,
               groups: int, interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """parts: [S, Mp, Nkv * (G + 2) * d]: float32 ``store_mn`` partials scaled by ``w_scale``
    float32 [N], or (``w_scale`` None) the projection itself, S = 1, in any float dtype; bias [N]
    or None, cos / sin float32 [T, d], slot_mapping int32 [T] (T <= Mp), k_pages / v_pages [P,
    page_size, Nkv, d] -> (q [T, Nkv * G, d], k_pages, v_pages) in the pools' dtype
    (``reference.rope_write`` of the finished projection)."""
    s_count, mp, n = parts.shape
    t = slot_mapping.shape[0]
    num_pages, page_size, nkv, d = k_pages.shape
    g, half, dtype = groups, d // 2, k_pages.dtype
    has_bias, scaled = bias is not None, w_scale is not None
    if (t > mp or n != nkv * (g + 2) * d or not supports(s_count, g, d, has_bias, scaled)
            or (not scaled and s_count != 1)):
        raise ValueError(f"rope_write: S={s_count}, Mp={mp}, T={t}, N={n}, Nkv={nkv}, G={g}, d={d} "
                         "do not fit the kernel")
    c = _chunk(d)
    rows_in = (g + 2, 2, half)             # a head group in memory
    rows = (-(-(g + 2) // c) * c, 2, half)   # in SMEM: whole chunks (rows past G + 2 unused)
    waits = s_count + scaled + 2 * c + has_bias

    def kernel(p_gmem, *rest):
        rest = list(rest)
        sc_gmem = rest.pop(0) if scaled else None
        b_gmem = rest.pop(0) if has_bias else None
        cos_gmem, sin_gmem, sl_gmem, k_gmem, v_gmem, q_gmem = rest
        m, h = lax.axis_index("m"), lax.axis_index("h")

        def scoped(p_smem, sc_smem, b_smem, c_smem, s_smem, y_smem, r_smem, v_smem, bar):
            live = pl.ds(0, g + 2)
            bars = iter(range(waits))
            for s in range(s_count):
                plgpu.copy_gmem_to_smem(p_gmem.at[s, m, h], p_smem.at[s, live], bar.at[next(bars)])
            if scaled:
                plgpu.copy_gmem_to_smem(sc_gmem.at[h], sc_smem.at[live], bar.at[next(bars)])
            if has_bias:
                plgpu.copy_gmem_to_smem(b_gmem.at[h], b_smem.at[live], bar.at[next(bars)])
            for j in range(c):   # the half tables, c times: [c, d/2] tiles for c heads at once
                plgpu.copy_gmem_to_smem(cos_gmem.at[m, pl.ds(0, half)], c_smem.at[j], bar.at[next(bars)])
                plgpu.copy_gmem_to_smem(sin_gmem.at[m, pl.ds(0, half)], s_smem.at[j], bar.at[next(bars)])
            for j in range(waits):
                plgpu.barrier_wait(bar.at[j])
            total = p_smem.at[0][...].astype(jnp.float32)
            for s in range(1, s_count):
                total = total + p_smem.at[s][...]
            y = (total * sc_smem[...]).astype(dtype) if scaled else total.astype(dtype)
            if has_bias:   # ``finish``'s cast, then the bias (rounded again)
                y = (y.astype(jnp.float32) + b_smem[...].astype(jnp.float32)).astype(dtype)
            y_smem[...] = y.astype(jnp.float32)
            v_smem[...] = y   # (V leaves from here: a lone row is less than a fragment)
            cs, sn = c_smem[...], s_smem[...]
            for j in range(0, rows[0], c):   # c heads at a time (V's rotation, and padding, unused)
                x1, x2 = y_smem.at[pl.ds(j, c), 0][...], y_smem.at[pl.ds(j, c), 1][...]
                r_smem.at[pl.ds(j, c), 0][...] = (x1 * cs - x2 * sn).astype(dtype)
                r_smem.at[pl.ds(j, c), 1][...] = (x2 * cs + x1 * sn).astype(dtype)
            slot = sl_gmem[m]   # (one scalar load: a TMA box needs 16 bytes, T may be 1)
            page, off = slot // page_size, lax.rem(slot, page_size)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(r_smem.at[pl.ds(0, g)], q_gmem.at[m, h])
            plgpu.copy_smem_to_gmem(r_smem.at[g], k_gmem.at[page, off, h])
            plgpu.copy_smem_to_gmem(v_smem.at[g + 1], v_gmem.at[page, off, h])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(scoped, plgpu.SMEM((s_count, *rows), parts.dtype), plgpu.SMEM(rows, jnp.float32),
                      plgpu.SMEM(rows, bias.dtype if has_bias else jnp.float32),
                      plgpu.SMEM((c, half), jnp.float32), plgpu.SMEM((c, half), jnp.float32),
                      plgpu.SMEM(rows, jnp.float32), plgpu.SMEM(rows, dtype),
                      plgpu.SMEM(rows, dtype), plgpu.Barrier(num_barriers=waits))

    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((t, nkv, g, 2, half), dtype),
        grid=(t, nkv),
        grid_names=("m", "h"),
        kernel_name=f"rope_write_{nkv}x{g}x{d}",
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    pool_rows = (num_pages, page_size, nkv, 2, half)
    k_ref, v_ref = jax.new_ref(k_pages.reshape(pool_rows)), jax.new_ref(v_pages.reshape(pool_rows))
    operands = [parts.reshape(s_count, mp, nkv, *rows_in)]
    operands += [w_scale.reshape(nkv, *rows_in)] if scaled else []
    operands += [bias.reshape(nkv, *rows_in)] if has_bias else []
    q = f(*operands, cos, sin, slot_mapping, k_ref, v_ref)
    return (q.reshape(t, nkv * g, d), k_ref[...].reshape(k_pages.shape),
            v_ref[...].reshape(v_pages.shape))
