"""The decode matmul's epilogue fused with the residual add and RMSNorm
(``pallas_kernels/quant_matmul/residual_norm.py``), interpreted on CPU, against the reference:
the kernel alone on NaN-poisoned padding rows, and the whole fused projection against the
composition the model runs without it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.quant_matmul import api, mgpu, residual_norm
from pallas_kernels.quant_matmul import reference as ref

EPS = 1e-5


def _close(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("split,t,dtype", [(1, 8, jnp.bfloat16), (4, 5, jnp.bfloat16), (3, 16, jnp.float32)])
def test_kernel_matches_the_reference_and_skips_padding_rows(split, t, dtype):
    n, mp = 512, 16
    k = jax.random.split(jax.random.key(split), 4)
    parts = jax.random.normal(k[0], (split, mp, n), jnp.float32)
    parts = parts.at[:, t:].set(jnp.nan)                 # rows past T: the padding, never read
    residual = (3 * jax.random.normal(k[1], (t, n))).astype(dtype)
    w_scale = jax.random.uniform(k[2], (n,), jnp.float32, 0.01, 0.1)
    gamma = (1 + 0.1 * jax.random.normal(k[3], (n,))).astype(dtype)
    h, normed = residual_norm.residual_rms_norm(parts, residual, w_scale, gamma, EPS, interpret=True)
    y = jnp.nan_to_num(parts, nan=0.0).sum(0)[:t] * w_scale
    want_h, want_n = ref.residual_rms_norm(y.astype(dtype), residual, gamma, EPS)
    assert h.dtype == normed.dtype == dtype and h.shape == normed.shape == (t, n)
    tol = 1e-5 if dtype == jnp.float32 else 1.6e-2        # bf16: one rounding apart at most
    _close(h, want_h, tol)
    _close(normed, want_n, tol)


def test_shapes_the_kernel_does_not_take_are_refused():
    assert residual_norm.supports(8, 4096, jnp.bfloat16, jnp.bfloat16)
    assert not residual_norm.supports(64, 4096, jnp.bfloat16, jnp.bfloat16)   # SMEM
    assert not residual_norm.supports(1, 4000, jnp.bfloat16, jnp.bfloat16)    # 256-column rows
    assert not residual_norm.supports(1, 4096, jnp.bfloat16, jnp.float32)    # gamma's dtype
    parts = jnp.zeros((64, 8, 4096), jnp.float32)
    with pytest.raises(ValueError, match="S=64"):
        residual_norm.residual_rms_norm(parts, jnp.zeros((8, 4096), jnp.bfloat16), jnp.ones(4096),
                                        jnp.ones(4096, jnp.bfloat16), EPS)


def _projection(seed, t, n, k, wdtype):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
    w = rng.standard_normal((n, k)) * np.exp(rng.uniform(-3, 0, (n, 1)))
    q, s = ref.quantize_weight(jnp.asarray(w, jnp.float32), wdtype)
    residual = jnp.asarray(4 * rng.standard_normal((t, n)), jnp.bfloat16)
    gamma = jnp.asarray(1 + 0.1 * rng.standard_normal(n), jnp.bfloat16)
    return x, q, s, residual, gamma


def _fused_and_composed(monkeypatch, x, q, s, residual, gamma) -> tuple[tuple, tuple, list[int]]:
    """``quant_matmul_residual_norm`` with the fused epilogue and with XLA's pair (the switch
    off): (h, normed) of each, and the partial counts the fused kernel was called with."""
    assert mgpu.residual_norm_supports(x, q, residual, gamma)
    fused = jax.jit(lambda *a: pallas_kernels.quant_matmul_residual_norm(*a, EPS, interpret=True))
    monkeypatch.setattr(api, "RESIDUAL_NORM_ON_HOPPER", False)
    want = fused(x, q, s, residual, gamma)
    monkeypatch.setattr(api, "RESIDUAL_NORM_ON_HOPPER", True)
    parts = []
    kernel = residual_norm.residual_rms_norm
    monkeypatch.setattr(residual_norm, "residual_rms_norm",
                        lambda p, *a, **kw: parts.append(p.shape[0]) or kernel(p, *a, **kw))
    jax.clear_caches()
    return fused(x, q, s, residual, gamma), want, parts


@pytest.mark.parametrize("wdtype", [jnp.int8, ref.FP8])
def test_fused_projection_equals_the_composition(monkeypatch, wdtype):
    """The decode kernel's partials through the fused epilogue == the same kernel's
    ``finish`` output added and normed by XLA (what runs with the switch off)."""
    x, q, s, residual, gamma = _projection(3, 2, 256, 512, wdtype)
    (got_h, got_n), (want_h, want_n), calls = _fused_and_composed(monkeypatch, x, q, s, residual, gamma)
    assert calls                                           # the fused kernel ran, not XLA's pair
    _close(got_h, want_h, 1.6e-2)
    _close(got_n, want_n, 1.6e-2)
    # Against float math on the dequantized weight: the kernels' error is the format's.
    y = np.asarray(x, np.float32) @ (np.asarray(q, np.float32) * np.asarray(s)[:, None]).T
    h64 = np.asarray(residual, np.float32) + y
    np.testing.assert_allclose(np.asarray(got_h, np.float32), h64, rtol=1.6e-2, atol=0.05)


def test_fused_projection_with_tile_runs(monkeypatch):
    """With ``tile_runs`` the decode kernel hands the fused epilogue fewer partials than K parts
    (on 3 SMs: K in 4 parts, 3 units per CTA, 2 partials per tile), and the epilogue sums those:
    the same h and norm as the composition."""
    from pallas_kernels.quant_matmul import mgpu_decode

    monkeypatch.setattr(mgpu_decode, "sm_count", lambda: 3)
    monkeypatch.setattr(mgpu, "DECODE_TILE_RUNS", True)
    x, q, s, residual, gamma = _projection(5, 2, 256, 2048, jnp.int8)
    cfg = mgpu.kernel_config(2, 256, 2048)
    assert (cfg.split_k, cfg.per_cta, cfg.slots(256)) == (4, 3, 2)
    (got_h, got_n), (want_h, want_n), parts = _fused_and_composed(monkeypatch, x, q, s, residual, gamma)
    assert parts == [2]                                    # the fused kernel ran, on 2 partials
    _close(got_h, want_h, 1.6e-2)
    _close(got_n, want_n, 1.6e-2)


def test_without_the_switch_or_the_shapes_it_is_the_composition(monkeypatch):
    x, q, s, residual, gamma = _projection(4, 3, 256, 512, jnp.int8)
    monkeypatch.setattr(api, "RESIDUAL_NORM_ON_HOPPER", True)
    want = ref.residual_rms_norm(ref.w8a16_matmul(x, q, s), residual, gamma, EPS)
    # On CPU (no interpretation) the reference runs, bit for bit.
    got = pallas_kernels.quant_matmul_residual_norm(x, q, s, residual, gamma, EPS)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # A residual of another width than the projection's output is not the kernel's to take.
    assert not mgpu.residual_norm_supports(x, q, residual[:, :128], gamma[:128])


def test_the_decode_kernels_pdl_switch_reaches_the_fused_epilogue(monkeypatch):
    """``mgpu.DECODE_PDL`` (the A/B quant-pdl) launches the fused epilogue with programmatic
    dependent launch too, like the decode matmul ahead of it."""
    x, q, s, residual, gamma = _projection(5, 2, 256, 512, jnp.int8)
    seen = []
    kernel = residual_norm.residual_rms_norm
    monkeypatch.setattr(residual_norm, "residual_rms_norm",
                        lambda *a, **kw: seen.append(kw["pdl"]) or kernel(*a, **kw))
    for flag in (False, True):
        monkeypatch.setattr(mgpu, "DECODE_PDL", flag)
        jax.clear_caches()
        mgpu.quant_matmul_residual_norm(x, q, s, residual, gamma, eps=EPS, interpret=True)
    assert seen == [False, True]
