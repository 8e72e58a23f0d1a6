"""The MLP's gate/up decode matmul with the SiLU gate in its epilogue (``quant_matmul/gated.py``):
the Mosaic GPU kernel interpreted on CPU against the reference composition, its config rule,
the dispatcher's switch, and the kernel cross-lowered for CUDA at Llama-3.1-8B's shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_calls import recorded

from pallas_kernels.quant_matmul import api, gated, mgpu, mgpu_decode
from pallas_kernels.quant_matmul import reference as ref
from pallas_kernels.quant_matmul.mgpu_decode import DecodeConfig

FP8 = ref.FP8


def _operands(seed, m, i, k, wdtype, xdtype=jnp.bfloat16):
    """x [m, K] and a gate/up weight [2I, K] whose channels differ by orders of magnitude (each
    keeps its own scale), quantized per channel."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), xdtype)
    w = rng.standard_normal((2 * i, k)) * np.exp(rng.uniform(-4, 1, (2 * i, 1)))
    q, s = ref.quantize_weight(jnp.asarray(w, jnp.float32), wdtype)
    return x, q, s


def _want(x, q, s):
    return ref.silu_gate(ref.w8a16_matmul(x, q, s))


def _close(got, want):
    """Within one rounding of x's dtype of the reference (the kernel gates the rounded projection
    in float32 and rounds once; XLA may round between SiLU and the product)."""
    g, w = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert g.shape == w.shape and np.isfinite(g).all()
    np.testing.assert_allclose(g, w, rtol=2 ** -7, atol=1e-3 * np.abs(w).max())


# m, I, K, weight dtype, x dtype, config
CASES = {
    "int8_m1_one_unit_each": (1, 128, 256, jnp.int8, jnp.bfloat16, DecodeConfig(64, 128, 2)),
    # 3 units on 2 CTAs: the last owns one (a dynamic pipeline length, its scale row clamped)
    "int8_m8_ragged": (8, 192, 256, jnp.int8, jnp.bfloat16, DecodeConfig(64, 128, 3, per_cta=2)),
    "fp8_m13_bk256": (13, 128, 512, FP8, jnp.bfloat16, DecodeConfig(64, 256, 2)),
    "int8_m16_bk512_f16": (16, 64, 1024, jnp.int8, jnp.float16, DecodeConfig(64, 512, 2)),
    "fp8_m64_four_units": (64, 256, 128, FP8, jnp.float16, DecodeConfig(64, 128, 2, per_cta=4)),
    # paired_wait: both tiles' wgmmas in flight before one wait (through the shared A tile when
    # interpreted: the up tile's conversion waits for the gate tile's wgmma)
    "int8_m16_paired_ragged": (16, 192, 512, jnp.int8, jnp.bfloat16,
                               DecodeConfig(64, 256, 2, per_cta=2, paired_wait=True)),
    "fp8_m8_paired": (8, 128, 256, FP8, jnp.bfloat16, DecodeConfig(64, 128, 3, paired_wait=True)),
    # int8 with an f16 x by bit assembly (mgpu_decode.dequant_tile), both step bodies
    "int8_m5_f16_bits_paired": (5, 192, 256, jnp.int8, jnp.float16,
                                DecodeConfig(64, 128, 2, per_cta=2, paired_wait=True, int8_f16_bits=True)),
    "int8_m1_f16_bits": (1, 128, 256, jnp.int8, jnp.float16, DecodeConfig(64, 128, 2, int8_f16_bits=True)),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_kernel_interpret_matches_the_reference(case):
    m, i, k, wdtype, xdtype, cfg = CASES[case]
    x, q, s = _operands(3, m, i, k, wdtype, xdtype)
    got = mgpu.quant_matmul_silu_gate(x, q, s, config=cfg, interpret=True)
    assert got.dtype == xdtype
    _close(got, _want(x, q, s))


def test_gate_and_up_rows_stay_paired():
    """Each output channel j gates with gate row j and up row I + j only: zeroing one up row
    zeroes exactly its channel, and swapping two gate rows swaps two channels."""
    x, q, s = _operands(5, 4, 128, 256, jnp.int8)
    cfg = DecodeConfig(64, 128, 2)
    base = np.asarray(mgpu.quant_matmul_silu_gate(x, q, s, config=cfg, interpret=True), np.float32)
    got = np.asarray(mgpu.quant_matmul_silu_gate(x, q.at[128 + 70].set(0), s, config=cfg,
                                                 interpret=True), np.float32)
    assert (got[:, 70] == 0).all() and (np.delete(got, 70, 1) == np.delete(base, 70, 1)).all()
    perm = np.arange(256)
    perm[[3, 100]] = [100, 3]
    got = np.asarray(mgpu.quant_matmul_silu_gate(x, q[perm], s[perm], config=cfg, interpret=True),
                     np.float32)
    swapped = np.asarray(_want(x, q[perm], s[perm]), np.float32)
    _close(got, swapped)
    assert not np.allclose(got, base)


def test_config_rule(monkeypatch):
    # Llama-3.1-8B's gate/up on an H200 (132 SMs): 224 units, one per CTA, 128 weight rows a step.
    cfg = mgpu.silu_gate_config(16, 28672, 4096, sms=132)
    assert cfg is not None and cfg.split_k == 1 and cfg.per_cta == 1 and cfg.block_n == 64
    assert gated.supports(16, 28672, 4096, cfg)
    # More units than two per SM: a balanced share each.
    assert mgpu.silu_gate_config(16, 28672, 4096, sms=64).per_cta == 2
    # Fewer units than SMs (Qwen2.5-0.5B: I = 4864, 76 units), past 64 tokens, or K off 128: none.
    assert mgpu.silu_gate_config(16, 9728, 896, sms=132) is None
    assert mgpu.silu_gate_config(65, 28672, 4096, sms=132) is None
    assert mgpu.silu_gate_config(16, 28672, 4000, sms=132) is None
    assert not gated.supports(16, 28672, 4096, DecodeConfig(64, 128, 2, split_k=2))
    assert not gated.supports(16, 28672, 4096, DecodeConfig(64, 128, 2, per_cta=9))
    # async_acc (the persistent decode kernel's) is not this kernel's: wrong on the GPU (session 42).
    assert not gated.supports(16, 28672, 4096, DecodeConfig(64, 128, 4, async_acc=True))
    monkeypatch.setattr(mgpu, "DECODE_ASYNC", True)
    assert not mgpu.silu_gate_config(16, 28672, 4096, sms=132).async_acc
    with pytest.raises(ValueError, match="do not tile"):
        gated.silu_gate_matmul(jnp.zeros((8, 256), jnp.bfloat16), jnp.zeros((192, 256), jnp.int8),
                               jnp.ones((192,)), config=DecodeConfig(64, 128, 2), fp8=FP8)


def test_dispatch_follows_the_switch(monkeypatch):
    """The entry point runs the kernel under ``SILU_GATE_ON_HOPPER`` where the config rule allows
    it (here: 2 units, 2 SMs), else the composition; both give the reference."""
    x, q, s = _operands(7, 5, 128, 256, jnp.int8)
    calls = recorded(monkeypatch, gated, "silu_gate_matmul")
    monkeypatch.setattr(mgpu_decode, "sm_count", lambda: 2)
    monkeypatch.setattr(api, "SILU_GATE_ON_HOPPER", False)
    off = api.quant_matmul_silu_gate(x, q, s, interpret=True)
    assert calls == []
    monkeypatch.setattr(api, "SILU_GATE_ON_HOPPER", True)
    on = api.quant_matmul_silu_gate(x, q, s, interpret=True)
    assert calls == [(8, 256)]   # the padded tokens
    _close(on, _want(x, q, s))
    _close(off, _want(x, q, s))
    monkeypatch.setattr(mgpu_decode, "sm_count", lambda: 132)   # 2 units < 132 SMs: composition
    api.quant_matmul_silu_gate(x, q, s, interpret=True)
    api.quant_matmul_silu_gate(x.astype(jnp.float32), q, s, interpret=True)   # x not bf16 / f16
    assert len(calls) == 1


@pytest.mark.parametrize("m,wdtype,variant,xdtype", [
    (1, jnp.int8, "", jnp.bfloat16), (16, jnp.int8, "", jnp.bfloat16), (16, FP8, "", jnp.bfloat16),
    (64, jnp.int8, "", jnp.bfloat16), (16, jnp.int8, "GATED_PAIRED_WAIT", jnp.bfloat16),
    (16, FP8, "GATED_PAIRED_WAIT", jnp.bfloat16), (16, jnp.int8, "", jnp.float16)])
def test_kernel_lowers_for_cuda(m, wdtype, variant, xdtype, monkeypatch):
    """Llama-3.1-8B's gate/up (2I = 28,672, K = 4,096) with the A tile from registers, as a GPU
    runs it (cross-lowered for CUDA on CPU), also under each A/B switch of its config, and with
    an f16 x (int8 -> f16 by bit assembly, ``DECODE_INT8_F16_BITS``, the default)."""
    if variant:
        monkeypatch.setattr(mgpu, variant, True)
    cfg = mgpu.silu_gate_config(m, 28672, 4096, sms=132)
    assert cfg.paired_wait == (variant == "GATED_PAIRED_WAIT") and not cfg.async_acc
    assert cfg.int8_f16_bits
    x = jax.ShapeDtypeStruct((m, 4096), xdtype)
    w = jax.ShapeDtypeStruct((28672, 4096), wdtype)
    s = jax.ShapeDtypeStruct((28672,), jnp.float32)
    fn = jax.jit(lambda x, w, s: mgpu.quant_matmul_silu_gate(x, w, s, config=cfg))
    text = fn.trace(x, w, s).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "quant_silu_gate_28672x4096" in text
