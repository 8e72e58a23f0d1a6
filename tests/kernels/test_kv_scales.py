"""Per-page KV scales (pallas_kernels/kv_write/scales.py): set from the row at a page's first
slot with headroom, independent of what else the step writes, untouched otherwise; and a
quantized write + read back within the format's error."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.kv_write import reference as kv_ref
from pallas_kernels.kv_write import scales as sc


@pytest.mark.parametrize("dtype,room", [(jnp.int8, sc.INT8_HEADROOM), (jnp.float8_e4m3fn, sc.FP8_HEADROOM)])
def test_page_scales(dtype, room):
    ps, kvh = 4, 2
    rng = np.random.default_rng(0)
    # step: request A fills page 3 (4 rows) and starts page 5 (1 row); request B writes one
    # decode row into page 7 at offset 2 (started earlier); 2 padding rows in page 0.
    slots = np.array([12, 13, 14, 15, 20, 30, 0, 1], np.int32)
    x = rng.standard_normal((8, kvh, 16)).astype(np.float32)
    old = np.full((9, kvh), 0.5, np.float32)
    got = np.asarray(sc.page_scales(jnp.asarray(old), jnp.asarray(x), jnp.asarray(slots), ps, dtype))
    amax = np.abs(x).max(-1)
    q = sc.qmax(dtype)
    np.testing.assert_allclose(got[3], amax[0] * room / q, rtol=1e-6)   # the first row decides
    np.testing.assert_allclose(got[5], amax[4] * room / q, rtol=1e-6)
    # Chunking does not matter: page 3 started by a step holding only its first row.
    alone = sc.page_scales(jnp.asarray(old), jnp.asarray(x[:1]), jnp.asarray(slots[:1]), ps, dtype)
    alone = np.asarray(alone)
    np.testing.assert_array_equal(alone[3], got[3])
    np.testing.assert_array_equal(got[[1, 2, 4, 6, 7, 8]], old[[1, 2, 4, 6, 7, 8]])  # untouched


@pytest.mark.parametrize("dtype,tol", [(jnp.int8, 0.03), (jnp.float8_e4m3fn, 0.07)])
def test_quantized_write_round_trip(dtype, tol):
    ps, kvh, d = 4, 2, 16
    rng = np.random.default_rng(1)
    slots = jnp.asarray(np.arange(4, 12), jnp.int32)    # pages 1 and 2, whole
    k = jnp.asarray(rng.standard_normal((8, kvh, d)) * np.array([1.0, 30.0])[None, :, None], jnp.float32)
    scales = sc.page_scales(jnp.ones((4, kvh)), k, slots, ps, dtype)
    pages = jnp.zeros((4, ps, kvh, d), dtype)
    kp, _ = kv_ref.write_kv(pages, pages, k, k, slots, k_scales=scales, v_scales=scales)
    per_row = np.asarray(scales)[1:3].repeat(ps, 0)[:, :, None]
    back = np.asarray(kp, np.float32)[1:3].reshape(8, kvh, d) * per_row
    for h in range(kvh):   # each head within the format's error of its own magnitude
        err = np.linalg.norm(back[:, h] - np.asarray(k)[:, h]) / np.linalg.norm(np.asarray(k)[:, h])
        assert err < tol
