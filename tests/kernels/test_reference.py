"""The pure-jnp references against the per-token numpy oracle (and write_kv against numpy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ragged_batch import make_batch, numpy_attention, rel_err

from pallas_kernels.kv_write import reference as kv_ref
from pallas_kernels.ragged_paged_attention import reference as rpa_ref

CASES = {
    "decode": ([1, 1, 1, 1], [5, 17, 1, 32]),
    "prefill": ([9, 4], [9, 4]),
    "mixed": ([1, 6, 1, 3], [20, 6, 9, 11]),
    "chunked_prefill": ([5, 7], [21, 30]),
}


def _run(b, **kw):
    f = jax.jit(lambda *a: rpa_ref.ragged_paged_attention(*a, **b.scale_kwargs(), **kw))
    return np.asarray(f(*b.args()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_numpy(case):
    q_lens, ctx_lens = CASES[case]
    page_size = {"decode": 8, "prefill": 16, "mixed": 8, "chunked_prefill": 16}[case]
    b = make_batch(
        np.random.default_rng(page_size), q_lens, ctx_lens,
        page_size=page_size, num_q_heads=4, num_kv_heads=2, head_dim=16,
    )  # fmt: skip
    out = _run(b, sm_scale=0.25)
    n = b.query_start_loc[len(q_lens)]
    assert np.all(np.isfinite(out)), "padding rows or NaN pages leaked"
    assert np.all(out[n:] == 0)
    assert rel_err(out[:n], numpy_attention(b, sm_scale=0.25)[:n]) < 1e-5


@pytest.mark.parametrize("window,cap", [(3, None), (None, 5.0), (4, 2.0)])
def test_reference_window_and_soft_cap(window, cap):
    b = make_batch(
        np.random.default_rng(1), [1, 6, 2], [13, 6, 9],
        page_size=8, num_q_heads=6, num_kv_heads=2, head_dim=8,
    )  # fmt: skip
    out = _run(b, sm_scale=0.4, sliding_window=window, soft_cap=cap)
    n = b.query_start_loc[3]
    want = numpy_attention(b, sm_scale=0.4, sliding_window=window, soft_cap=cap)
    assert rel_err(out[:n], want[:n]) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_reference_quantized_kv(dtype):
    b = make_batch(
        np.random.default_rng(2), [1, 4, 1], [19, 7, 3],
        page_size=8, num_q_heads=4, num_kv_heads=2, head_dim=16, dtype=dtype,
    )  # fmt: skip
    out = _run(b, sm_scale=0.25)
    n = b.query_start_loc[3]
    assert np.all(np.isfinite(out))
    assert rel_err(out[:n], numpy_attention(b, sm_scale=0.25)[:n]) < 1e-5


def test_reference_bf16_and_chunked_lax_map(monkeypatch):
    # A tiny chunk budget forces the lax.map path (several token chunks).
    monkeypatch.setattr(rpa_ref, "_CHUNK_BYTES", 4 * 4 * 8 * 2 * 16 * 3)
    b = make_batch(
        np.random.default_rng(3), [1, 7, 1, 2], [30, 7, 12, 2],
        page_size=8, num_q_heads=4, num_kv_heads=2, head_dim=16, dtype=jnp.bfloat16,
    )  # fmt: skip
    out = _run(b, sm_scale=0.25)
    assert out.dtype == jnp.bfloat16
    n = b.query_start_loc[4]
    assert rel_err(out[:n], numpy_attention(b, sm_scale=0.25)[:n]) < 1e-2


def test_reference_num_seqs_zero_and_validation():
    b = make_batch(np.random.default_rng(4), [2], [5], page_size=8, num_q_heads=2, num_kv_heads=1, head_dim=8)
    b.num_seqs[:] = 0
    out = _run(b, sm_scale=1.0)
    assert np.all(out == 0)
    with pytest.raises(ValueError, match="head_dim mismatch"):
        rpa_ref.ragged_paged_attention(jnp.zeros((4, 2, 4)), *b.args()[1:], sm_scale=1.0)
    with pytest.raises(ValueError, match="query_start_loc"):
        args = list(b.args())
        args[5] = args[5][:-1]
        rpa_ref.ragged_paged_attention(*args, sm_scale=1.0)
    with pytest.raises(ValueError, match="k_scales"):
        args = list(b.args())
        args[1] = args[1].astype(jnp.int8)
        args[2] = args[2].astype(jnp.int8)
        rpa_ref.ragged_paged_attention(*args, sm_scale=1.0)


def test_write_kv_reference():
    rng = np.random.default_rng(5)
    k = rng.standard_normal((6, 4, 2, 8)).astype(np.float32)
    v = rng.standard_normal((6, 4, 2, 8)).astype(np.float32)
    kn = rng.standard_normal((5, 2, 8)).astype(np.float32)
    vn = rng.standard_normal((5, 2, 8)).astype(np.float32)
    slots = np.array([13, 14, 22, 0, 1], np.int32)  # last two: padding into the null page
    f = jax.jit(kv_ref.write_kv, donate_argnums=(0, 1))
    k2, v2 = f(jnp.asarray(k), jnp.asarray(v), jnp.asarray(kn), jnp.asarray(vn), jnp.asarray(slots))
    ke, ve = k.reshape(24, 2, 8).copy(), v.reshape(24, 2, 8).copy()
    ke[slots], ve[slots] = kn, vn
    np.testing.assert_array_equal(np.asarray(k2), ke.reshape(k.shape))
    np.testing.assert_array_equal(np.asarray(v2), ve.reshape(v.shape))


def test_write_kv_reference_int8_roundtrip():
    rng = np.random.default_rng(6)
    k = np.zeros((3, 4, 2, 8), np.int8)
    scales = np.full((3, 2), 0.05, np.float32)
    kn = rng.uniform(-3, 3, size=(2, 2, 8)).astype(np.float32)
    slots = np.array([5, 10], np.int32)
    k2, _ = kv_ref.write_kv(
        jnp.asarray(k), jnp.asarray(k), jnp.asarray(kn), jnp.asarray(kn), jnp.asarray(slots),
        k_scales=jnp.asarray(scales), v_scales=jnp.asarray(scales),
    )  # fmt: skip
    got = np.asarray(k2).reshape(12, 2, 8)[slots].astype(np.float32) * 0.05
    np.testing.assert_allclose(got, kn, atol=0.025 + 1e-6)
