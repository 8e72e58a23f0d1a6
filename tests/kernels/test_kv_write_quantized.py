"""The fused quantizing KV write (pallas_kernels/kv_write/gpu_quant.py, interpret mode) against
the reference (page scales, then the row write), on step-shaped slot layouts with NaN-poisoned
pages and scales the step does not touch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.kv_write import gpu_quant
from pallas_kernels.kv_write import reference as kv_ref

PS = 4


def _step_slots(rng: np.random.Generator, num_pages: int) -> tuple[np.ndarray, set[int]]:
    """A step's slots: a prompt chunk starting at offset 0 over three fresh pages (one partly), a
    chunk continuing a page at offset 2 into a fresh page, two decode rows (offset 0: a page
    started; offset 3: an old page), then padding in page 0. -> slots, the pages it touches."""
    pages = rng.permutation(np.arange(1, num_pages))
    a, b, c, d, e, f = (int(p) for p in pages[:6])
    g = int(pages[6])
    rows = [a * PS + i for i in range(PS)] + [b * PS + i for i in range(PS)] + [c * PS, c * PS + 1]
    rows += [d * PS + 2, d * PS + 3, e * PS, e * PS + 1, e * PS + 2]
    rows += [f * PS, g * PS + 3]
    return np.array(rows + [0, 0, 1], np.int32), {a, b, c, d, e, f, g}


@pytest.mark.parametrize("pool_dtype", [jnp.int8, jnp.uint8], ids=["int8", "fp8"])
@pytest.mark.parametrize("new_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("block_t", [4, 8])
def test_fused_quantized_write_matches_the_reference(pool_dtype, new_dtype, block_t):
    rng = np.random.default_rng(3)
    num_pages, kvh, d = 23, 2, 16
    slots, touched = _step_slots(rng, num_pages)
    shape = (num_pages, PS, kvh, d)
    poison = 0x7F if pool_dtype == jnp.uint8 else -128       # e4m3 NaN bits / int8's minimum
    k = jnp.full(shape, poison, pool_dtype)
    v = jnp.full(shape, poison, pool_dtype)
    ks = np.full((num_pages, kvh), np.nan, np.float32)
    old = sorted(touched)
    ks[old] = rng.uniform(0.01, 0.05, (len(old), kvh))         # pages continued keep their scale
    vs = ks * 1.5
    t = len(slots)
    # per-head magnitudes far apart, so a wrong head's scale shows
    kn = jnp.asarray(rng.standard_normal((t, kvh, d)) * np.array([0.5, 20.0])[None, :, None], new_dtype)
    vn = jnp.asarray(rng.standard_normal((t, kvh, d)) * np.array([3.0, 0.2])[None, :, None], new_dtype)
    args = (k, v, jnp.asarray(ks), jnp.asarray(vs), kn, vn, jnp.asarray(slots))
    want = kv_ref.write_kv_quantized(*args)
    got = jax.jit(lambda *a: gpu_quant.write_kv_quantized(*a, interpret=True, block_t=block_t),
                  donate_argnums=(0, 1, 2, 3))(*args)
    for g, w, name in zip(got, want, ("k", "v", "k_scales", "v_scales"), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        g, w = np.asarray(g)[1:], np.asarray(w)[1:]     # page 0 takes padding writes in any order
        if name.endswith("scales"):
            np.testing.assert_array_equal(g, w, err_msg=name)   # NaN == NaN here: untouched stay NaN
        else:
            np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8), err_msg=name)
    # the step really started pages and left the others' scales alone
    got_ks = np.asarray(got[2])
    assert np.isnan(got_ks[[p for p in range(1, num_pages) if p not in touched]]).all()
    assert not np.isnan(got_ks[old]).any()


def test_entry_point_on_cpu_is_the_reference_and_odd_widths_fall_back():
    rng = np.random.default_rng(4)
    shape = (6, PS, 1, 12)                                     # d = 12: not a power of two
    k = jnp.zeros(shape, jnp.int8)
    sc = jnp.ones((6, 1), jnp.float32)
    kn = jnp.asarray(rng.standard_normal((3, 1, 12)), jnp.float32)
    slots = jnp.asarray([8, 9, 10], jnp.int32)
    want = kv_ref.write_kv_quantized(k, k, sc, sc, kn, kn, slots)
    for got in (pallas_kernels.write_kv_quantized(k, k, sc, sc, kn, kn, slots),
                gpu_quant.write_kv_quantized(k, k, sc, sc, kn, kn, slots, interpret=True)):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_round_half_even_matches_jnp_round():
    y = jnp.asarray([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, 0.51, -126.5, 126.5, 3.0, -0.0], jnp.float32)
    np.testing.assert_array_equal(np.asarray(gpu_quant._round_half_even(y)), np.asarray(jnp.round(y)))
