"""The Triton-lowered w8a16 decode matmul (``triton_decode``) against the reference, in
interpret mode; its default configs; the dispatcher's route to it."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quant_matmul import api as qapi
from pallas_kernels.quant_matmul import reference as ref
from pallas_kernels.quant_matmul import triton_decode as td

FP8 = ref.FP8


def _operands(seed, m, n, k, wdtype, xdtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), xdtype)
    # channels of very different magnitudes: the per-channel scale must keep each one
    w = rng.standard_normal((n, k)) * np.exp(rng.uniform(-4, 1, (n, 1)))
    return (x, *ref.quantize_weight(jnp.asarray(w, jnp.float32), wdtype))


def _rel(got, want):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# m, n, k, weight dtype, x dtype, config (None: default_config)
CASES = {
    "int8_m1_default": (1, 128, 1024, jnp.int8, jnp.bfloat16, None),
    "fp8_m13_split2": (13, 256, 512, FP8, jnp.bfloat16, td.TritonDecodeConfig(64, 128, 2)),
    "int8_m16_bn32": (16, 96, 256, jnp.int8, jnp.bfloat16, td.TritonDecodeConfig(32, 128, 1)),
    "int8_m33_f16_split4": (33, 64, 1024, jnp.int8, jnp.float16, td.TritonDecodeConfig(64, 64, 4)),
    "fp8_m64_bn128": (64, 256, 512, FP8, jnp.bfloat16, td.TritonDecodeConfig(128, 256, 1)),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("out_dtype", [None, jnp.float32])
def test_triton_decode_interpret(case, out_dtype):
    m, n, k, wdtype, xdtype, cfg = CASES[case]
    x, q, s = _operands(3, m, n, k, wdtype, xdtype)
    assert td.supports(m, n, k, cfg)
    got = td.quant_matmul(x, q, s, out_dtype=out_dtype, config=cfg, interpret=True)
    want = ref.w8a16_matmul(x, q, s, out_dtype=jnp.float32)
    assert got.shape == (m, n) and got.dtype == (out_dtype or xdtype)
    assert _rel(got, want) < (1e-5 if out_dtype == jnp.float32 else 4e-3)


def test_triton_decode_rows_are_independent():
    """A NaN token row (garbage in a padding row of the step) stays in its own row."""
    x, q, s = _operands(5, 9, 128, 512, jnp.int8)
    x = x.at[4].set(jnp.nan)
    for cfg in (td.TritonDecodeConfig(64, 128, 1), td.TritonDecodeConfig(64, 128, 2)):
        got = np.asarray(td.quant_matmul(x, q, s, config=cfg, interpret=True), np.float32)
        assert np.isnan(got[4]).all() and np.isfinite(np.delete(got, 4, axis=0)).all()


def test_triton_decode_default_configs():
    """Tokens pad to a power of two from 16; K splits until ~4 programs per SM with >= 4 loop
    steps per part; more than MAX_TOKENS tokens, or shapes that do not tile, are not taken."""
    assert [td.padded_tokens(m) for m in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    for n, k in ((28672, 4096), (6144, 4096), (4096, 4096), (4096, 14336), (128256, 4096)):
        cfg = td.default_config(16, n, k)
        assert td.supports(16, n, k, cfg) and cfg.block_k == 512
        steps = k // cfg.block_k // cfg.split_k
        assert steps >= 4 or cfg.split_k == 1
        assert n // cfg.block_n * cfg.split_k >= td.TARGET_PROGRAMS or steps < 8
    assert td.default_config(16, 4096, 4096).split_k == 2     # 64 tiles x 8 K blocks
    assert td.default_config(16, 28672, 4096).split_k == 2    # 448 tiles x 8 K blocks
    assert td.default_config(16, 128256, 4096).split_k == 1   # 2004 tiles already
    assert td.default_config(64, 4096, 4096).block_k == 256
    assert not td.supports(65, 4096, 4096)
    assert not td.supports(1, 4096, 4000)
    assert not td.supports(1, 100, 4096)


def test_dispatch_routes_w8a16_decode_to_triton(monkeypatch):
    """DECODE_KERNEL "triton" sends GPU w8a16 matmuls that tile to triton_decode; w8a8 and
    shapes it does not take keep their routes."""
    seen = []
    real = td.quant_matmul

    def spy(*a, **kw):
        seen.append(a[0].shape)
        return real(*a, **kw, interpret=True)

    monkeypatch.setattr(td, "quant_matmul", spy)
    monkeypatch.setattr(qapi, "DECODE_KERNEL", "triton")
    x, q, s = _operands(7, 3, 128, 512, jnp.int8)
    got = qapi.quant_matmul(x, q, s, backend="gpu")
    assert _rel(got, ref.w8a16_matmul(x, q, s, out_dtype=jnp.float32)) < 4e-3
    xf, qf, sf = _operands(8, 3, 128, 512, FP8)
    qapi.quant_matmul(xf, qf, sf, act_quant=True, backend="gpu")   # w8a8: not this kernel
    qapi.quant_matmul(*_operands(9, 80, 128, 512, jnp.int8), backend="gpu")   # 80 tokens: not it
    assert seen == [(3, 512)]
    monkeypatch.setattr(qapi, "DECODE_KERNEL", "mosaic")
    qapi.quant_matmul(x, q, s, backend="gpu")
    assert seen == [(3, 512)]
