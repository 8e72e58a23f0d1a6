"""The small-M dense matmul: the Mosaic GPU kernel (interpret mode) against the reference, its
layer read from the whole stack (the other layers NaN-poisoned), and its dispatch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from jserve.model.linear import QuantizedWeight, linear
from pallas_kernels.quant_matmul import reference as qref
from pallas_kernels.small_m_matmul import api, mgpu
from pallas_kernels.small_m_matmul import reference as ref


def _operands(seed: int, m: int, k: int, n: int, layers: int, poison: int | None = None):
    """x [m, k], a stack [layers, k, n] whose layers other than ``poison`` are NaN when given."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = rng.standard_normal((layers, k, n)).astype(np.float32) * 0.1
    if poison is not None:
        w[np.arange(layers) != poison] = np.nan
    return x, jnp.asarray(w, jnp.bfloat16)


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# m, k, n, layers, config (None = default_config)
CASES = {
    "m1_split": (1, 256, 128, 3, None),
    "m13": (13, 192, 64, 2, None),
    "m16_split4": (16, 512, 128, 2, None),
    "m64_full_rows": (64, 128, 192, 1, None),
    "bn128_stages2": (9, 256, 256, 2, mgpu.SmallMConfig(block_n=128, block_k=64, stages=2, split_k=2)),
    "bk32": (5, 96, 64, 2, mgpu.SmallMConfig(block_n=64, block_k=32, stages=3, split_k=3)),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_kernel_interpret_reads_only_its_layer(case):
    m, k, n, layers, cfg = CASES[case]
    lay = layers - 1
    x, w = _operands(1, m, k, n, layers, poison=lay)
    assert mgpu.supports(x, w, cfg)
    got = mgpu.small_m_matmul(x, w, jnp.array([lay], jnp.int32), config=cfg, interpret=True)
    clean = jnp.asarray(np.nan_to_num(np.asarray(w, np.float32)), jnp.bfloat16)
    want = ref.small_m_matmul(x, clean, jnp.array([lay], jnp.int32))
    assert got.shape == (m, n) and got.dtype == x.dtype
    assert np.isfinite(np.asarray(got, np.float32)).all()
    assert _rel(got, want) < 4e-3


def test_each_layer_of_the_stack():
    x, w = _operands(2, 4, 128, 64, 3)
    for lay in range(3):
        got = mgpu.small_m_matmul(x, w, jnp.array([lay], jnp.int32), interpret=True)
        want = np.asarray(x, np.float32) @ np.asarray(w[lay], np.float32)
        assert _rel(got, want) < 4e-3, lay


def test_rows_are_independent():
    """A NaN token row must not leak into the other rows (its pad rows are zeros)."""
    x, w = _operands(3, 9, 128, 64, 1)
    x = x.at[4].set(jnp.nan)
    got = np.asarray(mgpu.small_m_matmul(x, w, jnp.zeros((1,), jnp.int32), interpret=True), np.float32)
    assert np.isfinite(np.delete(got, 4, axis=0)).all() and not np.isfinite(got[4]).any()


def test_default_configs_fill_the_sms():
    """Decode projections split K until ~2 CTAs per SM, each part keeping >= 2 steps."""
    for k, n in ((896, 1280), (1024, 896), (896, 9728), (4864, 896), (14336, 4096)):
        cfg = mgpu.default_config(16, n, k)
        steps = k // cfg.block_k
        assert steps % cfg.split_k == 0 and steps // cfg.split_k >= 2
        assert n // cfg.block_n * cfg.split_k >= min(mgpu.TARGET_CTAS, n // cfg.block_n * (steps // 2))
    assert mgpu.default_config(1, 28672, 4096).split_k == 1   # 448 tiles already


def test_validation_names_the_operand():
    x, w = _operands(4, 2, 64, 64, 2)
    with pytest.raises(ValueError, match="w must be"):
        ref.small_m_matmul(x, w[0], jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="one dtype"):
        ref.small_m_matmul(x.astype(jnp.float32), w, jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="layer must be"):
        ref.small_m_matmul(x, w, jnp.zeros((2,), jnp.int32))
    assert not mgpu.supports(jnp.zeros((65, 64), jnp.bfloat16), w)     # more rows than wgmma's M
    assert not mgpu.supports(jnp.zeros((2, 64), jnp.float32), w.astype(jnp.float32))


def test_dispatch_on_cpu_is_the_reference_and_off_by_default():
    x, w = _operands(5, 3, 64, 64, 2)
    lay = jnp.ones((1,), jnp.int32)
    np.testing.assert_array_equal(np.asarray(pallas_kernels.small_m_matmul(x, w, lay)),
                                  np.asarray(ref.small_m_matmul(x, w, lay)))
    assert not api.use_kernel(x, w)


def test_linear_reads_the_layer_it_is_given():
    """``linear`` with a layer operand equals the matmul with that layer, dense and quantized."""
    x, w = _operands(6, 5, 64, 32, 3)
    w4 = w.reshape(3, 64, 2, 16)                     # a fused [L, K, 2, N/2] stack
    got = jax.jit(lambda x, w, i: linear(x, w, i))(x, w4, jnp.array([2], jnp.int32))
    assert got.shape == (5, 2, 16)
    np.testing.assert_allclose(np.asarray(got, np.float32).reshape(5, 32),
                               np.asarray(jnp.tensordot(x, w[2], axes=1), np.float32), rtol=1e-2, atol=1e-2)
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.integers(-127, 128, (3, 32, 64)), jnp.int8)     # [L, N, K] output-major
    scale = jnp.asarray(rng.uniform(0.5, 2.0, (3, 32)), jnp.float32)
    got = jax.jit(lambda x, w, i: linear(x, w, i))(x, QuantizedWeight(q, scale), jnp.array([1], jnp.int32))
    want = qref.w8a16_matmul(x, q[1], scale[1])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("m", [1, 16])
def test_kernel_lowers_for_cuda(m):
    """The Mosaic GPU lowering accepts the kernel at Qwen2.5-0.5B's down projection and the
    Llama-3.1-8B MLP shape (cross-lowered for CUDA on CPU)."""
    for k, n in ((4864, 896), (4096, 28672)):
        x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
        w = jax.ShapeDtypeStruct((4, k, n), jnp.bfloat16)
        lay = jax.ShapeDtypeStruct((1,), jnp.int32)
        text = jax.jit(lambda x, w, i: mgpu.small_m_matmul(x, w, i)).trace(x, w, lay).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text
