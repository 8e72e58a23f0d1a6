"""Fused decode layer: the GPU kernel (interpret mode) against the pure-jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.decode_layer import gpu, reference


def _case(dtype, *, hs=64, nkv=2, group=2, d=32, inter=96, ps=4, pages=6, bias=False, seed=0):
    rng = np.random.default_rng(seed)
    r, n = 4, 2 * pages + 8
    f = lambda *s, scale=1.0: jnp.asarray(rng.standard_normal(s) * scale, dtype)  # noqa: E731
    w = dict(ln_attn=f(hs, scale=0.2) + 1, wqkv=f(hs, nkv, group + 2, d, scale=hs ** -0.5),
             bqkv=f(nkv, group + 2, d, scale=0.1) if bias else None,
             wo=f(nkv * group * d, hs, scale=(nkv * group * d) ** -0.5), ln_mlp=f(hs, scale=0.2) + 1,
             wgu=f(hs, 2, inter, scale=hs ** -0.5), wd=f(inter, hs, scale=inter ** -0.5))
    # Two stacked layers; the call runs layer 1, and layer 0 is NaN (a wrong index shows).
    w = {k: None if a is None else jnp.stack([jnp.full_like(a, jnp.nan), a]) for k, a in w.items()}
    # Rows: one token at position 0 (a first token); three tokens after a context of 2 pages + 1
    # (a verify row: each attends the ones before it, written by this layer); one token at the
    # row's last slot but two (every page of the row); an idle row; two padding tokens. Every
    # page slot no token may read is NaN.
    counts, starts = [1, 3, 1], [0, 2 * ps + 1, pages * ps - 3]
    qsl = np.array([0, 1, 4, 5, 5], np.int32)
    table = np.zeros((r, pages), np.int32)
    owned = rng.permutation(np.arange(1, n))[:pages + 4]
    table[1, :3], table[2, :] = owned[:3], owned[3:3 + pages]
    table[0, 0] = owned[3 + pages]
    kp = np.full((n, ps, nkv, d), np.nan, np.float32)
    vp = np.full((n, ps, nkv, d), np.nan, np.float32)
    positions, slots = [], []
    for row in range(3):
        p0 = starts[row]
        for i in range(p0 // ps + 1):
            page = table[row, i]
            kp[page] = rng.standard_normal((ps, nkv, d))
            vp[page] = rng.standard_normal((ps, nkv, d))
            if i == p0 // ps:   # keys at and past the row's first new token: not context yet
                kp[page, p0 % ps:] = np.nan
                vp[page, p0 % ps:] = np.nan
        for pos in range(p0, p0 + counts[row]):
            positions.append(pos)
            slots.append(table[row, pos // ps] * ps + pos % ps)
    positions = np.array(positions + [0, 0], np.int32)
    slots = np.array(slots + [0, 0], np.int32)
    inv = 1.0 / 10000 ** (np.arange(0, d, 2) / d)
    ang = positions[:, None] * np.concatenate([inv, inv])[None]
    x = f(len(positions), hs)
    rows = (x, w["ln_attn"], w["wqkv"], w["bqkv"], w["wo"], w["ln_mlp"], w["wgu"], w["wd"],
            jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32),
            jnp.asarray(kp, dtype), jnp.asarray(vp, dtype), jnp.asarray(table), jnp.asarray(qsl),
            jnp.asarray(positions), jnp.asarray(slots), jnp.asarray([3], jnp.int32))
    return rows, dict(layer=1, eps=1e-5, sm_scale=d ** -0.5)


@pytest.mark.parametrize("dtype,bias", [(jnp.float32, False), (jnp.bfloat16, True)])
def test_kernel_matches_reference(dtype, bias):
    args, kw = _case(dtype, bias=bias)
    want = reference.decode_layer(*args, **kw)
    got = jax.jit(lambda *a: gpu.decode_layer(*a, interpret=True, **kw))(*args)
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    x = np.asarray(args[0], np.float32)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
    out = np.asarray(got[0], np.float32)
    np.testing.assert_allclose(out, np.asarray(want[0], np.float32), atol=tol, rtol=tol)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[5:], x[5:])                # padding tokens pass through
    assert np.abs(out[:5] - x[:5]).min(axis=1).max() > 0         # the live tokens moved
    for g, w, before in ((got[1], want[1], args[10]), (got[2], want[2], args[11])):
        g, w, before = (np.asarray(a, np.float32) for a in (g, w, before))
        np.testing.assert_allclose(g, w, atol=tol, rtol=tol)     # NaN where NaN was (equal_nan)
        changed = ~np.isclose(g, before, equal_nan=True)
        assert changed.any(axis=(2, 3)).sum() == 5               # five slots written, no more


def test_verify_row_tokens_see_each_other():
    """The verify row's last token attends the two before it: changing the first one's input
    changes the last one's output (and nothing of the other rows)."""
    args, kw = _case(jnp.float32, seed=5)
    x2 = args[0].at[1].multiply(-3.0)
    run = jax.jit(lambda *a: gpu.decode_layer(*a, interpret=True, **kw)[0])
    a, b = run(*args), run(x2, *args[1:])
    diff = np.abs(np.asarray(a) - np.asarray(b)).max(axis=1)
    assert diff[3] > 1e-3 and diff[0] == 0 and diff[4] == 0


def test_reference_attends_the_new_key_only_at_position_zero():
    """Token 0 has no context: its attention output is exactly its own v, whatever q is."""
    args, kw = _case(jnp.float32, seed=3)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((7, 2, 2, 32)), jnp.float32)
    k_new = jnp.asarray(rng.standard_normal((7, 2, 32)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((7, 2, 32)), jnp.float32)
    tables = args[12][jnp.asarray([0, 1, 1, 1, 2, 3, 3])]
    o = reference._attend(q, k_new, v_new, args[10], args[11], tables, args[14], 0.2)
    np.testing.assert_allclose(np.asarray(o[0]), np.broadcast_to(np.asarray(v_new[0])[:, None], (2, 2, 32)),
                               rtol=1e-6)
    assert np.isfinite(np.asarray(o[np.array([0, 1, 4])])).all()   # (the others read unwritten K/V)


def test_unsupported_shapes_take_the_reference():
    args, kw = _case(jnp.float32, hs=48, inter=40)
    assert gpu.unsupported(48, 32, 2, 40, 4, jnp.float32) is not None
    with pytest.raises(ValueError, match="multiples of 32"):
        gpu.decode_layer(*args, **kw)
    got = pallas_kernels.decode_layer(*args, interpret=True, **kw)   # falls back, no error
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(reference.decode_layer(*args, **kw)[0]))
