"""The Mosaic GPU quantized matmul compiled for a real Hopper GPU, against the reference.

Same semantics as tests/kernels/test_quant_matmul.py (interpret mode) plus Llama-3.1-8B-sized
shapes. Skipped without a GPU (CPU CI) and on a GPU that is not Hopper.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.quant_matmul import api as qapi
from pallas_kernels.quant_matmul import mgpu
from pallas_kernels.quant_matmul import reference as ref
from pallas_kernels.quant_matmul.mgpu_decode import DecodeConfig

pytestmark = pytest.mark.gpu
FP8 = ref.FP8
# Hopper's fp8 x fp8 wgmma accumulates with fewer than float32's mantissa bits (the reason for
# CUTLASS's "fast accumulation" FP8 kernels, which vLLM uses): against the exact float32 sum of
# the same fp8 products the relative error grows like sqrt(K). H200, 2026-11-30: 4.9e-4 at
# K=896, 1.3e-3 at K=4096, 2.9e-3 at K=14336 (1.6-2.4e-5 * sqrt(K)), for M = 1, 16 and 256.
W8A8_REL_PER_SQRT_K = 4e-5


def _rel(got, want):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.fixture(autouse=True)
def _hopper():
    if not mgpu.on_hopper():
        pytest.skip("needs a Hopper GPU")


@pytest.mark.parametrize("m", [1, 7, 16, 64, 100, 256, 4096])
@pytest.mark.parametrize("mode", ["int8", "fp8", "w8a8"])
@pytest.mark.parametrize("n,k", [(14336, 4096), (6144, 4096), (4096, 14336), (1280, 896)])
def test_mgpu_quant_matmul(m, mode, n, k):
    rng = np.random.default_rng(m + n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.02, jnp.float32)
    q, s = ref.quantize_weight(w, jnp.int8 if mode == "int8" else FP8)
    aq = mode == "w8a8"
    if not mgpu.supports(x, q, aq):
        pytest.skip("shape not tiled by the default config")
    got = jax.jit(lambda x, q, s: mgpu.quant_matmul(x, q, s, act_quant=aq, out_dtype=jnp.float32))(x, q, s)
    want = (ref.w8a8_matmul if aq else ref.w8a16_matmul)(x, q, s, out_dtype=jnp.float32)
    assert _rel(got, want) < (W8A8_REL_PER_SQRT_K * k**0.5 if aq else 1e-4)
    # The dispatcher picks the kernel on Hopper and agrees with it; w8a8 from W8A8_XLA_MIN_M
    # tokens up goes to XLA's fp8 dot instead (the same products summed in another order).
    via_api = pallas_kernels.quant_matmul(x, q, s, act_quant=aq, out_dtype=jnp.float32)
    if aq and qapi.W8A8_XLA_MIN_M is not None and m >= qapi.W8A8_XLA_MIN_M:
        assert _rel(via_api, want) < W8A8_REL_PER_SQRT_K * k**0.5
    else:
        assert _rel(via_api, got) < 1e-6


@pytest.mark.parametrize("cfg", [mgpu.MgpuConfig(128, 16, 64, 2), mgpu.MgpuConfig(64, 8, 256, 3),
                                 mgpu.MgpuConfig(128, 128, 128, 2),
                                 # the overlapped pipeline (a race shows only on hardware)
                                 mgpu.MgpuConfig(64, 8, 128, 3, overlap=True),
                                 mgpu.MgpuConfig(128, 16, 256, 4, split_k=2, overlap=True)])
def test_mgpu_configs(cfg):
    rng = np.random.default_rng(1)
    m = min(cfg.block_m, 16)
    x = jnp.asarray(rng.standard_normal((m, 1024)), jnp.bfloat16)
    q, s = ref.quantize_weight(jnp.asarray(rng.standard_normal((512, 1024)), jnp.float32), jnp.int8)
    got = mgpu.quant_matmul(x, q, s, config=cfg, out_dtype=jnp.float32)
    assert _rel(got, ref.w8a16_matmul(x, q, s, out_dtype=jnp.float32)) < 1e-4


@pytest.mark.parametrize("cfg", [DecodeConfig(64, 128, 4, split_k=2, per_cta=3),       # ragged grid
                                 DecodeConfig(64, 128, 4, per_cta=2, a_in_registers=False),
                                 DecodeConfig(128, 256, 6, split_k=2, per_cta=2),
                                 DecodeConfig(64, 256, 3, split_k=4, per_cta=7, tile_runs=True),
                                 DecodeConfig(64, 128, 4, split_k=2, per_cta=3, store_mn=True),
                                 DecodeConfig(128, 512, 2, per_cta=2, store_mn=True),
                                 DecodeConfig(64, 256, 4, split_k=4, per_cta=7, store_mn=True,
                                              async_acc=True, tile_runs=True),
                                 DecodeConfig(64, 512, 2, split_k=2, per_cta=3, store_mn=True,
                                              exit_read_only=True),
                                 DecodeConfig(64, 256, 4, split_k=2, per_cta=3, store_mn=True,
                                              async_acc=True),
                                 DecodeConfig(64, 128, 3, per_cta=2, async_acc=True)])
@pytest.mark.parametrize("mode", ["int8", "fp8", "w8a8"])
def test_persistent_decode_configs(cfg, mode):
    """The persistent decode kernel (the default at M <= 64, the register-A form checked here
    and by test_mgpu_quant_matmul) at explicit configs, one of them with a shorter last CTA, one
    with tile runs (80 units on 12 CTAs: a CTA's units of one tile in one partial), three with
    the accumulator across the steps (``async_acc``)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((5, 2048)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((1280, 2048)) * 0.02, jnp.float32)
    q, s = ref.quantize_weight(w, jnp.int8 if mode == "int8" else FP8)
    aq = mode == "w8a8"
    got = mgpu.quant_matmul(x, q, s, act_quant=aq, config=cfg, out_dtype=jnp.float32)
    want = (ref.w8a8_matmul if aq else ref.w8a16_matmul)(x, q, s, out_dtype=jnp.float32)
    assert _rel(got, want) < (W8A8_REL_PER_SQRT_K * 2048**0.5 if aq else 1e-4)


@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("wdtype", [jnp.int8, FP8])
@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 14336)])
def test_fused_residual_norm(m, wdtype, n, k, monkeypatch):
    """The o / down shapes of Llama-3.1-8B: the decode kernel's partials through the fused
    residual add and RMSNorm (residual_norm.py) == XLA's sum, add and norm of the same kernel."""
    from pallas_kernels.quant_matmul import api

    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    q, s = ref.quantize_weight(jnp.asarray(rng.standard_normal((n, k)) * 0.02, jnp.float32), wdtype)
    residual = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    gamma = jnp.asarray(1 + 0.1 * rng.standard_normal(n), jnp.bfloat16)
    assert mgpu.residual_norm_supports(x, q, residual, gamma)
    f = jax.jit(lambda *a: pallas_kernels.quant_matmul_residual_norm(*a, 1e-5))
    monkeypatch.setattr(api, "RESIDUAL_NORM_ON_HOPPER", False)   # (on by default)
    want = f(x, q, s, residual, gamma)
    monkeypatch.setattr(api, "RESIDUAL_NORM_ON_HOPPER", True)
    jax.clear_caches()
    got = f(x, q, s, residual, gamma)
    for a, b in zip(got, want, strict=True):
        assert np.isfinite(np.asarray(a, np.float32)).all()
        assert _rel(a, b) < 4e-3


@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("wdtype", [jnp.int8, FP8])
def test_fused_rope_write(m, wdtype, monkeypatch):
    """Llama-3.1-8B's fused QKV projection (8 kv heads x (4 + 2) x 128): the decode kernel's
    partials through the fused epilogue, RoPE and K/V write (kv_write/rope_write.py) == XLA's
    sum, RoPE and scatters after the same kernel, and no other pool row written."""
    from pallas_kernels.kv_write import api

    nkv, g, d, k, pages, page = 8, 4, 128, 4096, 64, 16
    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = rng.standard_normal((nkv * (g + 2) * d, k)) * 0.02
    q8, s = ref.quantize_weight(jnp.asarray(w, jnp.float32), wdtype)
    pos = np.arange(m) + 40.0
    emb = pos[:, None] * (1.0 / 500000.0 ** (np.arange(0, d, 2) / d))[None]
    cos, sin = (jnp.asarray(f(np.concatenate([emb, emb], -1)), jnp.float32) for f in (np.cos, np.sin))
    slots = jnp.asarray(rng.permutation(np.arange(page, pages * page))[:m], jnp.int32)
    pool = tuple(jnp.full((pages, page, nkv, d), 7.0, jnp.bfloat16) for _ in range(2))
    assert mgpu.rope_write_supports(x, q8, g, d, False)
    f = jax.jit(lambda *a: pallas_kernels.quant_matmul_rope_write(*a, groups=g))
    monkeypatch.setattr(api, "ROPE_WRITE_ON_HOPPER", False)   # (on by default)
    want = f(x, q8, s, None, cos, sin, slots, *pool)
    monkeypatch.setattr(api, "ROPE_WRITE_ON_HOPPER", True)
    jax.clear_caches()
    got = f(x, q8, s, None, cos, sin, slots, *pool)
    assert _rel(got[0], want[0]) < 4e-3
    for a, b in zip(got[1:], want[1:], strict=True):
        flat_a, flat_b = (np.asarray(v, np.float32).reshape(pages * page, -1) for v in (a, b))
        assert _rel(flat_a[np.asarray(slots)], flat_b[np.asarray(slots)]) < 4e-3
        assert (np.delete(flat_a, np.asarray(slots), axis=0) == 7.0).all()


@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("wdtype", [jnp.int8, FP8])
@pytest.mark.parametrize("cfg", [None, DecodeConfig(64, 128, 4), DecodeConfig(64, 256, 2, per_cta=2),
                                 DecodeConfig(64, 256, 2, paired_wait=True)])
def test_fused_silu_gate(m, wdtype, cfg, monkeypatch):
    """Llama-3.1-8B's gate/up (2I = 28,672): the gated kernel (quant_matmul/gated.py, the A tile
    from registers; also its paired_wait body) == the decode kernel, then XLA's
    sum, scale and SiLU gate."""
    from pallas_kernels.quant_matmul import api

    rng = np.random.default_rng(m)
    x = jnp.asarray(rng.standard_normal((m, 4096)), jnp.bfloat16)
    q, s = ref.quantize_weight(jnp.asarray(rng.standard_normal((28672, 4096)) * 0.02, jnp.float32), wdtype)
    assert mgpu.silu_gate_supports(x, q)
    monkeypatch.setattr(api, "SILU_GATE_ON_HOPPER", False)
    want = jax.jit(pallas_kernels.quant_matmul_silu_gate)(x, q, s)
    got = jax.jit(lambda *a: mgpu.quant_matmul_silu_gate(*a, config=cfg))(x, q, s)
    assert np.isfinite(np.asarray(got, np.float32)).all()
    assert _rel(got, want) < 4e-3


@pytest.mark.parametrize("cfg", [
    DecodeConfig(64, 256, 4, split_k=2, per_cta=3, store_mn=True, async_acc=True),
    DecodeConfig(64, 512, 2, split_k=2, per_cta=3, store_mn=True)])
def test_persistent_int8_f16_bits(cfg):
    """int8 weights with an f16 x by bit assembly (``int8_f16_bits``), the A tile from
    registers: the same sums as the plain convert (the assembled f16 is exact), in the decode
    kernel and in the gate kernel, at the 8B's gate/up shape for the latter."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((5, 2048)), jnp.float16)
    q, s = ref.quantize_weight(jnp.asarray(rng.standard_normal((1280, 2048)) * 0.02, jnp.float32), jnp.int8)
    bits = dataclasses.replace(cfg, int8_f16_bits=True)
    got = mgpu.quant_matmul(x, q, s, config=bits, out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(mgpu.quant_matmul(x, q, s, config=cfg,
                                                                                out_dtype=jnp.float32)))
    assert _rel(got, ref.w8a16_matmul(x, q, s, out_dtype=jnp.float32)) < 1e-4
    x = jnp.asarray(rng.standard_normal((16, 4096)), jnp.float16)
    q, s = ref.quantize_weight(jnp.asarray(rng.standard_normal((28672, 4096)) * 0.02, jnp.float32), jnp.int8)
    gate = mgpu.silu_gate_config(16, 28672, 4096)
    assert gate.int8_f16_bits   # (the default since session 46)
    want = mgpu.quant_matmul_silu_gate(x, q, s, config=dataclasses.replace(gate, int8_f16_bits=False))
    got = mgpu.quant_matmul_silu_gate(x, q, s, config=gate)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_traced_decode_kernel_writes_a_timeline_per_cta(tmp_path):
    """``decode_matmul_t(trace_dir=...)`` (benchmarks/cta_timeline.py's source): the same
    partials as the untraced kernel, and one trace per call holding every CTA's start, steps
    (one per pipeline step: 2 units of 2 K blocks each) and exit."""
    from benchmarks.cta_timeline import cta_events, summary
    from pallas_kernels.quant_matmul import mgpu_decode

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((16, 1024)), jnp.bfloat16)
    q, _ = ref.quantize_weight(jnp.asarray(rng.standard_normal((512, 1024)), jnp.float32), jnp.int8)
    cfg = DecodeConfig(64, 256, 4, split_k=2, per_cta=2, store_mn=True, async_acc=True, tile_runs=True)
    plain = mgpu_decode.decode_matmul_t(x, q, config=cfg, fp8=FP8)
    traced = mgpu_decode.decode_matmul_t(x, q, config=cfg, fp8=FP8, trace_dir=str(tmp_path))
    jax.effects_barrier()
    assert np.array_equal(np.asarray(plain), np.asarray(traced))
    (path,) = tmp_path.glob("*trace.json")
    ctas = cta_events(json.loads(path.read_text()))
    assert len(ctas) == cfg.ctas(512) == 8
    for _, events, _ in ctas.values():   # (the profiler's own "Init" scope leads each trace)
        names = [(name, ph) for name, ph, _ in events if name in mgpu_decode.TRACE_SCOPES]
        assert names[0] == ("start", "B") and names[-1] == ("exit", "E")
        assert names.count(("step", "B")) == names.count(("step", "E")) == 4
    got = summary(ctas, mhz=1980.0, step_bytes=64 * 256)
    assert 0 < got["step interval us (median)"] < got["kernel us (first start to last end)"] < 1000
