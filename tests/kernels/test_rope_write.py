"""The QKV projection's epilogue fused with RoPE and the K/V write
(``pallas_kernels/kv_write/rope_write.py``), interpreted on CPU, against the reference: the
kernel alone over NaN-poisoned padding rows and pages, and the whole fused projection against
the composition the model runs without it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_calls import recorded

from pallas_kernels.kv_write import reference as kv_ref
from pallas_kernels.kv_write import rope_write
from pallas_kernels.quant_matmul import mgpu_decode

NKV, PAGES, PAGE = 2, 6, 16


def _tables(t: int, d: int = 128) -> tuple[jax.Array, jax.Array]:
    """HF's cos / sin [T, d] at positions 3 .. 3 + T (both halves equal)."""
    inv = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))
    freqs = (np.arange(t) + 3.0)[:, None] * inv[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return jnp.asarray(np.cos(emb), jnp.float32), jnp.asarray(np.sin(emb), jnp.float32)


def _pools(dtype, d: int = 128) -> tuple[jax.Array, jax.Array]:
    shape = (PAGES, PAGE, NKV, d)
    return jnp.full(shape, jnp.nan, dtype), jnp.full(shape, jnp.nan, dtype)


def _slots(t: int) -> jax.Array:
    """Live rows in pages 2-5 out of order; rows past 3 / 4 of T are padding (the null page 0,
    several rows on one slot, as the runner packs them)."""
    live = (t * 3) // 4
    slots = [int(s) for s in np.random.default_rng(t).permutation(np.arange(2 * PAGE, PAGES * PAGE))[:live]]
    return jnp.asarray(slots + [0] * (t - live), jnp.int32)


def _same(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("split,t,groups,d,dtype,bias,scaled", [
    (8, 16, 4, 128, jnp.bfloat16, False, True),   # the 8B's qkv at a 16-token decode bucket
    (3, 5, 2, 128, jnp.bfloat16, True, True),     # Qwen-style bias, T < Mp
    (2, 8, 6, 128, jnp.float32, False, True),
    (4, 8, 1, 128, jnp.bfloat16, False, True),    # G + 2 odd: padded SMEM rows
    (2, 16, 8, 64, jnp.bfloat16, True, True),     # head_dim 64: four heads per register tile
    (1, 8, 4, 64, jnp.bfloat16, False, False),    # a dense projection's own output (XLA's GEMM)
])
def test_kernel_matches_the_reference_and_touches_only_its_slots(split, t, groups, d, dtype, bias, scaled):
    mp, n = 16, NKV * (groups + 2) * d
    keys = jax.random.split(jax.random.key(split + t + d), 3)
    parts = jax.random.normal(keys[0], (split, mp, n), jnp.float32)
    parts = parts.at[:, t:].set(jnp.nan)                 # rows past T: the padding, never read
    w_scale = jax.random.uniform(keys[1], (n,), jnp.float32, 0.01, 0.1) if scaled else None
    if not scaled:
        parts = parts.astype(dtype)
    b = (0.1 * jax.random.normal(keys[2], (n,))).astype(dtype) if bias else None
    cos, sin = _tables(t, d)
    slots = _slots(t)
    k_pages, v_pages = _pools(dtype, d)
    q, k2, v2 = rope_write.rope_write(parts, w_scale, b, cos, sin, slots, k_pages, v_pages,
                                      groups=groups, interpret=True)
    clean = jnp.nan_to_num(parts, nan=0.0)
    y = (mgpu_decode.finish(clean, t, w_scale, None, dtype, store_mn=True) if scaled
         else clean[0, :t].astype(dtype))
    if bias:
        y = y + b
    want_q, want_k, want_v = kv_ref.rope_write(y, cos, sin, slots, *_pools(dtype, d), groups)
    tol = 1e-5 if dtype == jnp.float32 else 1.6e-2        # bf16: one rounding apart at most
    assert q.dtype == dtype and q.shape == (t, NKV * groups, d)
    _same(q, want_q, tol)
    live = slots[slots >= PAGE]                           # the null page's rows: any padding row's
    flat = lambda a: a.reshape(PAGES * PAGE, NKV, d)      # noqa: E731
    _same(flat(k2)[live], flat(want_k)[live], tol)
    _same(flat(v2)[live], flat(want_v)[live], tol)
    untouched = np.setdiff1d(np.arange(PAGE, PAGES * PAGE), np.asarray(live))
    assert np.isnan(np.asarray(flat(k2)[untouched], np.float32)).all()
    assert np.isnan(np.asarray(flat(v2)[untouched], np.float32)).all()


def test_shapes_the_kernel_does_not_take_are_refused():
    assert rope_write.supports(8, 4, 128) and rope_write.supports(8, 1, 64)
    assert not rope_write.supports(8, 4, 96)      # head_dim: halves of 32, 64 or 128 values
    assert not rope_write.supports(24, 4, 64)     # barriers: 24 partials + 8 half tables + ...
    parts = jnp.zeros((2, 8, NKV * 5 * 64), jnp.float32)
    with pytest.raises(ValueError, match="G=3"):
        rope_write.rope_write(parts, jnp.ones(NKV * 5 * 64), None, *_tables(8), jnp.zeros(8, jnp.int32),
                              *_pools(jnp.bfloat16), groups=3)
    with pytest.raises(ValueError, match="S=2"):   # a dense projection is one "partial"
        rope_write.rope_write(jnp.zeros((2, 8, NKV * 6 * 128), jnp.bfloat16), None, None, *_tables(8),
                              jnp.zeros(8, jnp.int32), *_pools(jnp.bfloat16), groups=4)


@pytest.mark.parametrize("fused", [False, True])
def test_the_quantized_entry_point_fused_or_composed(fused, monkeypatch):
    """``pallas_kernels.quant_matmul_rope_write``: composed on CPU (the XLA matmul, RoPE and
    scatter), fused when interpreted with the switch on: both equal the reference."""
    import pallas_kernels
    from pallas_kernels.kv_write import api
    from pallas_kernels.quant_matmul import reference as q_ref

    rng = np.random.default_rng(7)
    t, k, g = 5, 256, 4
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
    q8, s = q_ref.quantize_weight(jnp.asarray(rng.standard_normal((NKV * (g + 2) * 128, k)) * 0.05,
                                              jnp.float32), jnp.int8)
    b = jnp.asarray(0.1 * rng.standard_normal(NKV * (g + 2) * 128), jnp.bfloat16)
    cos, sin = _tables(t)
    slots = _slots(t)
    monkeypatch.setattr(api, "ROPE_WRITE_ON_HOPPER", fused)
    calls = recorded(monkeypatch, rope_write, "rope_write")
    kw = dict(interpret=True, backend="gpu") if fused else {}
    got = pallas_kernels.quant_matmul_rope_write(x, q8, s, b, cos, sin, slots, *_pools(jnp.bfloat16),
                                                 groups=g, **kw)
    assert len(calls) == fused
    want = kv_ref.rope_write(q_ref.w8a16_matmul(x, q8, s) + b, cos, sin, slots, *_pools(jnp.bfloat16), g)
    _same(got[0], want[0], 1.6e-2)
    live = slots[slots >= PAGE]
    for a, w in zip(got[1:], want[1:], strict=True):
        _same(a.reshape(PAGES * PAGE, NKV, 128)[live], w.reshape(PAGES * PAGE, NKV, 128)[live], 1.6e-2)
