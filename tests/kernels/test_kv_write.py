"""KV write kernels (GPU Triton and TPU Mosaic, interpret mode) against the reference scatter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.kv_write import gpu as kv_gpu
from pallas_kernels.kv_write import reference as kv_ref
from pallas_kernels.kv_write import tpu as kv_tpu


@pytest.mark.parametrize("kernel", [kv_gpu, kv_tpu], ids=["gpu", "tpu"])
@pytest.mark.parametrize("dtype,num_pages", [(jnp.float32, 70_001), (jnp.bfloat16, 9), (jnp.int8, 9),
                                             (jnp.float8_e4m3fn, 9), (jnp.uint8, 9)])
def test_write_kv_kernels(kernel, dtype, num_pages):
    rng = np.random.default_rng(0)
    shape = (num_pages, 4, 2, 8)
    if jnp.dtype(dtype).itemsize == 1:   # a quantized pool: its per-page scales
        k = jnp.asarray(rng.integers(-100, 100, shape), dtype)
        v = jnp.asarray(rng.integers(-100, 100, shape), dtype)
        sc = dict(k_scales=jnp.full((num_pages, 2), 0.05), v_scales=jnp.full((num_pages, 2), 0.07))
    else:
        k = jnp.asarray(rng.standard_normal(shape), dtype)
        v = jnp.asarray(rng.standard_normal(shape), dtype)
        sc = {}
    kn = jnp.asarray(rng.standard_normal((11, 2, 8)), jnp.float32)
    vn = jnp.asarray(rng.standard_normal((11, 2, 8)), jnp.float32)
    # 8 real tokens in shuffled slots past page 0 (one in the last page), 3 padding tokens in page 0.
    real = np.concatenate([rng.permutation(np.arange(4, num_pages * 4 - 4))[:7], [num_pages * 4 - 1]])
    slots = jnp.asarray(np.concatenate([real, [0, 1, 0]]), jnp.int32)
    want = kv_ref.write_kv(k, v, kn, vn, slots, **sc)
    got = jax.jit(lambda *a: kernel.write_kv(*a, interpret=True, **sc), donate_argnums=(0, 1))(
        k, v, kn, vn, slots
    )
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        # Page 0 takes padding writes in any order; every other page must match exactly.
        # (1-byte pools as bytes: numpy compares fp8 through float conversions)
        raw = lambda a: np.asarray(a[1:]).view(np.uint8) if a.dtype.itemsize == 1 else np.asarray(a[1:])
        np.testing.assert_array_equal(raw(g), raw(w))


def test_entry_points_dispatch_to_reference_on_cpu():
    rng = np.random.default_rng(1)
    k = jnp.asarray(rng.standard_normal((3, 4, 1, 8)), jnp.float32)
    kn = jnp.asarray(rng.standard_normal((2, 1, 8)), jnp.float32)
    slots = jnp.asarray([5, 9], jnp.int32)
    got = pallas_kernels.write_kv(k, k, kn, kn, slots)
    want = kv_ref.write_kv(k, k, kn, kn, slots)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    q = jnp.asarray(rng.standard_normal((6, 2, 8)), jnp.float32)
    a = pallas_kernels.flash_attention(q, q[:, :1], q[:, :1], sm_scale=0.3)
    from pallas_kernels.flash_attention import reference as fa_ref

    np.testing.assert_array_equal(
        np.asarray(a), np.asarray(fa_ref.flash_attention(q, q[:, :1], q[:, :1], sm_scale=0.3))
    )


def test_ragged_entry_point_is_the_reference_on_cpu():
    from ragged_batch import make_batch

    from pallas_kernels.ragged_paged_attention import reference as rpa_ref

    b = make_batch(
        np.random.default_rng(2), [1, 3], [9, 3], page_size=8, num_q_heads=2, num_kv_heads=1, head_dim=8
    )
    got = pallas_kernels.ragged_paged_attention(*b.args(), sm_scale=0.5)
    want = rpa_ref.ragged_paged_attention(*b.args(), sm_scale=0.5)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_fp8_pool_stored_as_uint8_is_written_exactly_and_in_place():
    # An fp8 pool is a uint8 array of e4m3 bits (pallas_kernels/kv_format.py): its writes equal
    # those into an fp8-typed array bit for bit, and run in place, where XLA converts an
    # fp8-typed array's scatter operand to f16 and back (scratch of twice the array).
    from pallas_kernels import kv_format

    rng = np.random.default_rng(0)
    shape = (512, 16, 2, 64)
    fp8_pool = jnp.asarray(rng.standard_normal(shape), kv_format.FP8)
    bits_pool = jax.lax.bitcast_convert_type(fp8_pool, jnp.uint8)
    kn = jnp.asarray(rng.standard_normal((6, 2, 64)), jnp.float32)
    slots = jnp.asarray([3, 17, 511 * 16 + 15, 70, 0, 1], jnp.int32)
    sc = dict(k_scales=jnp.full((512, 2), 0.05), v_scales=jnp.full((512, 2), 0.07))
    want = kv_ref.write_kv(fp8_pool, fp8_pool, kn, kn, slots, **sc)
    got = kv_ref.write_kv(bits_pool, bits_pool, kn, kn, slots, **sc)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.uint8
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w.view(jnp.uint8)))

    def scratch(pool):
        f = jax.jit(lambda k, v, kn, s, ks, vs: kv_ref.write_kv(k, v, kn, kn, s, k_scales=ks, v_scales=vs),
                    donate_argnums=(0, 1))
        a = f.lower(pool, pool, kn, slots, sc["k_scales"], sc["v_scales"]).compile().memory_analysis()
        return a.temp_size_in_bytes

    assert scratch(bits_pool) < bits_pool.size // 8 < bits_pool.size <= scratch(fp8_pool)
