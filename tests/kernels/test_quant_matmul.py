"""Quantized matmul: the reference against float math, the Mosaic GPU and TPU kernels
(interpret mode) against the reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.quant_matmul import mgpu, mgpu_decode
from pallas_kernels.quant_matmul import reference as ref
from pallas_kernels.quant_matmul import tpu as qtpu
from pallas_kernels.quant_matmul.mgpu_decode import DecodeConfig, decode_config

FP8 = ref.FP8


def _operands(seed, m, n, k, wdtype, xdtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), xdtype)
    # Channels of very different magnitudes: per-channel scales must keep each one.
    w = rng.standard_normal((n, k)) * np.exp(rng.uniform(-4, 1, (n, 1)))
    q, s = ref.quantize_weight(jnp.asarray(w, jnp.float32), wdtype)
    return x, q, s, w


def _rel(got, want):
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


@pytest.mark.parametrize("wdtype,tol", [(jnp.int8, 0.012), (FP8, 0.06)])
def test_quantize_weight_per_channel(wdtype, tol):
    _, q, s, w = _operands(0, 1, 64, 256, wdtype)
    assert q.dtype == wdtype and s.shape == (64,) and s.dtype == jnp.float32
    back = np.asarray(q, np.float32) * np.asarray(s)[:, None]
    rows = np.linalg.norm(back - w, axis=1) / np.linalg.norm(w, axis=1)
    assert rows.max() < tol          # every channel, small or large, within the format's error
    assert np.abs(np.asarray(q, np.float32)).max() == ref.qmax(wdtype)


def test_zero_channels_get_a_finite_scale():
    w = jnp.zeros((4, 8), jnp.float32).at[1].set(1.0)
    q, s = ref.quantize_weight(w, jnp.int8)
    assert np.isfinite(np.asarray(s)).all()
    np.testing.assert_array_equal(np.asarray(q)[[0, 2, 3]], 0)


@pytest.mark.parametrize("wdtype", [jnp.int8, FP8])
def test_w8a16_reference_is_the_dequantized_matmul(wdtype):
    x, q, s, _ = _operands(1, 5, 64, 128, wdtype, jnp.float32)
    want = np.asarray(x, np.float64) @ (np.asarray(q, np.float64) * np.asarray(s, np.float64)[:, None]).T
    got = ref.w8a16_matmul(x, q, s)
    assert got.dtype == jnp.float32 and got.shape == (5, 64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_w8a8_reference_quantizes_each_token_alone():
    x, q, s, w = _operands(2, 6, 64, 128, FP8, jnp.float32)
    x = x.at[3].multiply(1000.0)         # one loud token must not coarsen the others' scales
    got = np.asarray(ref.w8a8_matmul(x, q, s))
    exact = np.asarray(x, np.float64) @ w.T
    for r in range(6):
        assert _rel(got[r], exact[r]) < 0.08
    xq, xs = ref.quantize_activations(x)
    assert xq.dtype == FP8 and xs.shape == (6,)
    np.testing.assert_allclose(np.asarray(xs), np.abs(np.asarray(x)).max(1) / 448.0, rtol=1e-6)
    # A static input scale applies to every token.
    xq, xs = ref.quantize_activations(x, jnp.float32(0.5))
    np.testing.assert_array_equal(np.asarray(xs), 0.5)
    # The native route hands the fp8 operands to XLA's dot: the same products and float32 sums.
    np.testing.assert_allclose(np.asarray(ref.w8a8_matmul(x, q, s, native=True)), got, rtol=1e-5, atol=1e-5)
    # A bf16 result: the native dot's sums come out in bf16, within about one bf16 ulp more.
    xb = x.astype(jnp.bfloat16)
    exact = np.asarray(ref.w8a8_matmul(xb, q, s, out_dtype=jnp.float32))
    native = np.asarray(ref.w8a8_matmul(xb, q, s, native=True), np.float32)
    assert ref.w8a8_matmul(xb, q, s, native=True).dtype == jnp.bfloat16
    np.testing.assert_allclose(native, exact, rtol=2 * 2.0**-8, atol=1e-6 * np.abs(exact).max())


def test_group_dequant_and_block_scales():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((5, 7)), FP8)
    block = jnp.asarray(rng.uniform(0.1, 2, (3, 2)), jnp.float32)   # [ceil(5/2), ceil(7/4)]
    per_row = ref.expand_block_scales(block, 5, 2)
    assert per_row.shape == (5, 2)
    got = np.asarray(ref.group_dequant(w, per_row, 4))
    want = np.asarray(w, np.float32) * np.repeat(np.repeat(np.asarray(block), 2, 0), 4, 1)[:5, :7]
    np.testing.assert_allclose(got, want)
    x = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)
    np.testing.assert_allclose(np.asarray(ref.group_matmul(x, w, per_row, 4)),
                               np.asarray(x) @ want.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="group scales must be"):
        ref.group_dequant(w, per_row[:, :1], 4)


def test_validation_names_the_operand():
    x = jnp.zeros((2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="w must be \\[N, K=16\\]"):
        ref.w8a16_matmul(x, jnp.zeros((16, 8), jnp.int8), jnp.ones((16,)))
    with pytest.raises(ValueError, match="w_scale must be"):
        ref.w8a16_matmul(x, jnp.zeros((8, 16), jnp.int8), jnp.ones((4,)))
    with pytest.raises(ValueError, match="int8 or float8_e4m3fn"):
        ref.w8a16_matmul(x, jnp.zeros((8, 16), jnp.bfloat16), jnp.ones((8,)))
    with pytest.raises(ValueError, match="w8a8 needs float8_e4m3fn"):
        ref.w8a8_matmul(x, jnp.zeros((8, 16), jnp.int8), jnp.ones((8,)))


# m, n, k, weight dtype, act_quant, config (None = default_config)
MGPU_CASES = {
    "decode_int8_m1": (1, 128, 256, jnp.int8, False, None),
    "decode_fp8_m13": (13, 64, 256, FP8, False, None),
    "w8a8_m5": (5, 128, 256, FP8, True, None),
    "prefill_int8_m70": (70, 256, 128, jnp.int8, False, None),
    "w8a8_m130": (130, 128, 128, FP8, True, None),
    "int8_bn128_k64": (9, 256, 192, jnp.int8, False, mgpu.MgpuConfig(128, 16, 64, 2)),
    # split-K: each K part a CTA, the float32 partials summed after the kernel
    "split_default_int8_m1": (1, 64, 1024, jnp.int8, False, None),
    "split4_w8a8_m5": (5, 64, 512, FP8, True, mgpu.MgpuConfig(64, 8, 64, 2, split_k=4)),
    # one wgmma in flight: double-buffered A tile, slots released a step late
    "overlap_int8_m1": (1, 128, 512, jnp.int8, False, mgpu.MgpuConfig(64, 8, 64, 3, overlap=True)),
    "overlap_fp8_split2_m13": (13, 64, 512, FP8, False,
                               mgpu.MgpuConfig(64, 16, 64, 2, split_k=2, overlap=True)),
    "overlap_w8a8_m5": (5, 64, 256, FP8, True, mgpu.MgpuConfig(64, 8, 64, 2, overlap=True)),
    # the persistent decode kernel: several units per CTA in one pipeline, carries flushed per unit
    "persistent_int8_m1": (1, 128, 512, jnp.int8, False, DecodeConfig(64, 128, 3, split_k=2, per_cta=2)),
    "persistent_fp8_m13": (13, 128, 512, FP8, False, DecodeConfig(64, 64, 2, split_k=2, per_cta=1)),
    "persistent_w8a8_m5_one_cta": (5, 192, 256, FP8, True, DecodeConfig(64, 64, 2, per_cta=3)),
    "persistent_int8_m64_bn128": (64, 256, 256, jnp.int8, False,
                                  DecodeConfig(128, 64, 4, split_k=4, per_cta=4)),
    # long tiles: wgmma over 128-column chunks of each
    "persistent_int8_bk512_m3": (3, 128, 1024, jnp.int8, False, DecodeConfig(64, 512, 2, per_cta=1)),
    "persistent_w8a8_bk256_m9": (9, 64, 512, FP8, True, DecodeConfig(64, 256, 2, split_k=2, per_cta=2)),
    # 7 units on 3 CTAs: the last one owns one (a shorter, dynamic pipeline)
    "persistent_ragged_int8_m8": (8, 448, 256, jnp.int8, False, DecodeConfig(64, 128, 2, per_cta=3)),
    # tiles stored as [Mp, block_n]: partials [split_k, Mp, N], no transpose after the kernel
    "store_mn_int8_m5_split": (5, 448, 512, jnp.int8, False,
                               DecodeConfig(64, 128, 2, split_k=2, per_cta=3, store_mn=True)),
    "store_mn_w8a8_m16_bn128": (16, 256, 256, FP8, True, DecodeConfig(128, 128, 2, store_mn=True)),
    # async_acc: one accumulator across the pipeline, each unit's sum the running total less its
    # value at the unit's start (ragged last CTA, several units per CTA, w8a8, both output layouts)
    "async_int8_m5_ragged": (5, 448, 512, jnp.int8, False,
                             DecodeConfig(64, 128, 3, split_k=2, per_cta=3, store_mn=True, async_acc=True)),
    "async_w8a8_m16_bk256": (16, 128, 1024, FP8, True, DecodeConfig(64, 256, 4, split_k=2, per_cta=2,
                                                                    async_acc=True)),
    "async_fp8_m1_out_t": (1, 192, 256, FP8, False, DecodeConfig(64, 128, 2, per_cta=2, async_acc=True)),
    # tile_runs: a CTA's units of one tile in one carry, stored once into the tile's slot for
    # that CTA; tiles 0, 2, 4 and 6 lie inside one CTA and their first run zeroes slot 1 (the
    # interpreter's output starts as NaN); the ragged last CTA owns 2 units
    "runs_int8_m5_zeroed": (5, 448, 512, jnp.int8, False,
                            DecodeConfig(64, 128, 2, split_k=2, per_cta=3, store_mn=True, tile_runs=True)),
    # K in 8 parts on CTAs of 3 units: a tile spans 3-4 CTAs (4 slots), with async_acc
    "runs_async_int8_m1_4_slots": (1, 128, 1024, jnp.int8, False,
                                   DecodeConfig(64, 128, 3, split_k=8, per_cta=3, store_mn=True,
                                                async_acc=True, tile_runs=True)),
    "runs_async_w8a8_m16_out_t": (16, 256, 1024, FP8, True,
                                  DecodeConfig(64, 128, 3, split_k=4, per_cta=3, async_acc=True,
                                               tile_runs=True)),
}


@pytest.mark.parametrize("case", MGPU_CASES, ids=list(MGPU_CASES))
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_mgpu_kernel_interpret(case, out_dtype):
    m, n, k, wdtype, act_quant, cfg = MGPU_CASES[case]
    x, q, s, _ = _operands(4, m, n, k, wdtype)
    assert mgpu.supports(x, q, act_quant, cfg)
    got = mgpu.quant_matmul(x, q, s, act_quant=act_quant, out_dtype=out_dtype, config=cfg,
                            interpret=True)
    f = ref.w8a8_matmul if act_quant else ref.w8a16_matmul
    want = f(x, q, s, out_dtype=jnp.float32)
    assert got.shape == (m, n) and got.dtype == out_dtype
    assert _rel(got, want) < (1e-5 if out_dtype == jnp.float32 else 4e-3)


def test_decode_configs_split_k_to_fill_the_sms():
    """The tiled grid: decode matmuls with few output tiles cut K until the grid has ~2 CTAs
    per SM, each part keeping >= 4 pipeline steps; wide ones and prefill tiles do not split."""
    assert mgpu.default_config(1, 64, 1024).split_k == 2
    for n, k in ((4096, 4096), (4096, 14336), (6144, 4096)):   # Llama-3.1-8B o, down, qkv
        cfg = mgpu.default_config(1, n, k)
        assert cfg.split_k == 4 and n // cfg.block_n * cfg.split_k >= mgpu.TARGET_CTAS
        assert k // cfg.block_k // cfg.split_k >= 4
    assert mgpu.default_config(1, 28672, 4096).split_k == 1   # gate/up: 448 tiles already
    assert mgpu.default_config(256, 4096, 4096).split_k == 1


def test_persistent_decode_configs_balance_the_sms():
    """Decode sizes take the persistent kernel: at most 2 CTAs per SM, the longest CTA as short
    as any split of K allows, on the fewest CTAs that keep it; prefill sizes keep the tiled
    grid."""
    for n, k in ((28672, 4096), (6144, 4096), (4096, 4096), (4096, 14336)):   # the 8B's four
        for m in (1, 16, 64):
            cfg = mgpu.kernel_config(m, n, k)
            assert isinstance(cfg, DecodeConfig) and cfg.ctas(n) == 256   # balanced, 97% of 264
            assert (n // cfg.block_n * cfg.split_k) % cfg.per_cta == 0
    cfg = decode_config(28672, 4096, sms=132)
    assert (cfg.split_k, cfg.per_cta) == (4, 7)             # 1792 units of 8 steps, 7 per CTA
    cfg = decode_config(896 * 2, 4864, sms=132)             # 28 tiles x 38 K blocks: 1064 steps
    steps = cfg.per_cta * 38 // cfg.split_k
    assert cfg.ctas(1792) <= 264 and steps <= 1.03 * 1064 / 264 + 38 / cfg.split_k
    cfg = decode_config(151936, 896, sms=132)               # 2374 tiles (2 x a prime)
    assert cfg.ctas(151936) <= 264 and cfg.per_cta * 7 // cfg.split_k <= 1.1 * 2374 * 7 / 264
    assert isinstance(mgpu.kernel_config(65, 4096, 4096), mgpu.MgpuConfig)
    assert isinstance(mgpu.kernel_config(1, 4096, 4000), mgpu.MgpuConfig)   # K not in 128s


def test_mgpu_rows_are_independent():
    """A NaN token row (e.g. garbage in a padding row) must not leak into the other rows."""
    x, q, s, _ = _operands(5, 9, 64, 128, FP8)
    x = x.at[4].set(jnp.nan)
    for act_quant in (False, True):
        got = np.asarray(mgpu.quant_matmul(x, q, s, act_quant=act_quant, interpret=True), np.float32)
        assert np.isfinite(np.delete(got, 4, axis=0)).all()


def test_mgpu_static_input_scale_and_dispatch():
    x, q, s, _ = _operands(6, 3, 64, 128, FP8)
    scale = jnp.float32(0.01)
    got = pallas_kernels.quant_matmul(x, q, s, scale, act_quant=True, interpret=True)
    want = ref.w8a8_matmul(x, q, s, scale)
    assert _rel(got, want) < 4e-3
    # On CPU the entry point is the reference.
    np.testing.assert_array_equal(np.asarray(pallas_kernels.quant_matmul(x, q, s)),
                                  np.asarray(ref.w8a16_matmul(x, q, s)))
    assert not mgpu.supports(x[:, :100], q[:, :100], False)  # K not a multiple of a block: XLA


@pytest.mark.parametrize("m,n,k,wdtype,act_quant", [
    (1, 256, 512, jnp.int8, False), (20, 128, 384, FP8, False), (33, 256, 256, FP8, True)])
def test_tpu_kernel_interpret(m, n, k, wdtype, act_quant):
    x, q, s, _ = _operands(7, m, n, k, wdtype)
    got = pallas_kernels.quant_matmul(x, q, s, act_quant=act_quant, out_dtype=jnp.float32,
                                      interpret=True, backend="tpu")
    f = ref.w8a8_matmul if act_quant else ref.w8a16_matmul
    assert _rel(got, f(x, q, s, out_dtype=jnp.float32)) < 1e-5
    assert qtpu.supports(x, q)


def test_kernels_under_jit_with_traced_scale():
    x, q, s, _ = _operands(8, 2, 64, 128, jnp.int8)
    got = jax.jit(lambda x, q, s: mgpu.quant_matmul(x, q, s, interpret=True))(x, q, s)
    assert _rel(got, ref.w8a16_matmul(x, q, s)) < 4e-3


@pytest.mark.parametrize("overlap", [False, True])
def test_mgpu_overlap_kernel_lowers_for_cuda(overlap):
    """The overlapped pipeline (delayed slot release, two A tiles) lowers for CUDA at the
    Llama-3.1-8B MLP shape."""
    cfg = dataclasses.replace(mgpu.default_config(1, 14336, 4096), overlap=overlap)
    x = jax.ShapeDtypeStruct((1, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((14336, 4096), jnp.int8)
    s = jax.ShapeDtypeStruct((14336,), jnp.float32)
    fn = jax.jit(lambda x, w, s: mgpu.quant_matmul(x, w, s, config=cfg))
    assert "mosaic_gpu" in fn.trace(x, w, s).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("m", [1, 16, 256, 4096])
@pytest.mark.parametrize("mode", ["int8", "fp8", "w8a8"])
def test_mgpu_kernel_lowers_for_cuda(m, mode):
    """The Mosaic GPU lowering accepts the kernel at the Llama-3.1-8B MLP shape (cross-lowered
    for CUDA on CPU: catches unsupported layouts and conversions, e.g. Hopper's missing
    e4m3 -> bf16 convert, without a GPU)."""
    x = jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((14336, 4096), jnp.int8 if mode == "int8" else FP8)
    s = jax.ShapeDtypeStruct((14336,), jnp.float32)
    fn = jax.jit(lambda x, w, s: mgpu.quant_matmul(x, w, s, act_quant=mode == "w8a8"))
    text = fn.trace(x, w, s).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


@pytest.mark.parametrize("cfg", [DecodeConfig(64, 128, 2, per_cta=3),
                                 DecodeConfig(64, 128, 4, per_cta=3, a_in_registers=False),
                                 DecodeConfig(64, 512, 2, split_k=4, per_cta=3, tile_runs=True)])
def test_persistent_kernel_with_a_ragged_grid_lowers_for_cuda(cfg):
    """7 units on 3 CTAs (a dynamic pipeline length in the last), with the dequantized tile
    from registers (the GPU's form, which the interpreter cannot run) and through SMEM, and
    with tile runs (28 units, the 8B gate/up's K parts: tiles span two CTAs)."""
    x = jax.ShapeDtypeStruct((1, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((448, 4096), jnp.int8)
    s = jax.ShapeDtypeStruct((448,), jnp.float32)
    fn = jax.jit(lambda x, w, s: mgpu.quant_matmul(x, w, s, config=cfg))
    assert "mosaic_gpu" in fn.trace(x, w, s).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("m,mode", [(1, "int8"), (16, "fp8"), (300, "w8a8")])
def test_tpu_kernel_lowers_for_tpu(m, mode):
    """The Mosaic TPU lowering accepts the kernel at the Llama-3.1-8B MLP shape (cross-lowered)."""
    x = jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((14336, 4096), jnp.int8 if mode == "int8" else FP8)
    s = jax.ShapeDtypeStruct((14336,), jnp.float32)
    fn = jax.jit(lambda x, w, s: qtpu.quant_matmul(x, w, s, act_quant=mode == "w8a8"))
    assert "tpu_custom_call" in fn.trace(x, w, s).lower(lowering_platforms=("tpu",)).as_text()


def test_w8a8_route_to_xla_fp8_dot_from_min_m(monkeypatch):
    # The dispatcher hands GPU w8a8 matmuls of W8A8_XLA_MIN_M tokens and more to XLA's fp8 dot
    # (native=True); fewer tokens keep the kernel's route (here, off Hopper, the reference).
    from pallas_kernels.quant_matmul import api as qapi

    seen = []
    real = ref.w8a8_matmul

    def spy(*a, native=False, **kw):
        seen.append(native)
        return real(*a, native=native, **kw)

    monkeypatch.setattr(ref, "w8a8_matmul", spy)
    monkeypatch.setattr(qapi, "W8A8_XLA_MIN_M", 16)
    for m in (8, 16):
        x, q, s, _ = _operands(5, m, 64, 128, FP8, jnp.bfloat16)
        got = qapi.quant_matmul(x, q, s, act_quant=True, backend="gpu")
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(real(x, q, s), np.float32),
                                   rtol=2e-2, atol=2e-2)
    assert seen == [False, True]
    monkeypatch.setattr(qapi, "W8A8_XLA_MIN_M", None)
    qapi.quant_matmul(x, q, s, act_quant=True, backend="gpu")
    assert seen[-1] is False


def test_persistent_kernel_with_pdl(monkeypatch):
    """``pdl`` (programmatic dependent launch): the kernel lowers for CUDA with its grid
    dependency wait and trigger, and (the interpreter skips both) still matches the reference;
    ``DECODE_PDL`` puts it into the default decode configs."""
    cfg = DecodeConfig(64, 128, 2, split_k=2, per_cta=3, store_mn=True, pdl=True)
    x, q, s, _ = _operands(11, 5, 192, 512, jnp.int8)
    got = mgpu.quant_matmul(x, q, s, config=cfg, interpret=True)
    assert _rel(got, ref.w8a16_matmul(x, q, s, out_dtype=jnp.float32)) < 4e-3
    xs = jax.ShapeDtypeStruct((16, 4096), jnp.bfloat16)
    ws = jax.ShapeDtypeStruct((6144, 4096), jnp.int8)
    ss = jax.ShapeDtypeStruct((6144,), jnp.float32)

    def lowered(cfg):
        fn = jax.jit(lambda x, w, s: mgpu.quant_matmul(x, w, s, config=cfg))
        return fn.trace(xs, ws, ss).lower(lowering_platforms=("cuda",)).as_text()

    plain = lowered(mgpu.kernel_config(16, 6144, 4096))
    assert "mosaic_gpu" in plain and "griddepcontrol" not in plain and "uses_pdl" not in plain
    monkeypatch.setattr(mgpu, "DECODE_PDL", True)
    cfg = mgpu.kernel_config(16, 6144, 4096)
    assert isinstance(cfg, DecodeConfig) and cfg.pdl
    text = lowered(cfg)   # the wait and trigger in the kernel, the launch attribute on the module
    assert "griddepcontrol.wait" in text and "griddepcontrol.launch_dependents" in text
    assert "uses_pdl" in text


def test_persistent_kernel_exiting_after_the_stores_read(monkeypatch):
    """``exit_read_only``: the CTAs' last wait covers only their stores' SMEM reads (the
    interpreter runs it like the full wait: the result matches the reference);
    ``DECODE_EXIT_READ_ONLY`` puts it into the default decode configs."""
    cfg = DecodeConfig(64, 128, 2, split_k=2, per_cta=3, store_mn=True, exit_read_only=True)
    x, q, s, _ = _operands(12, 5, 192, 512, jnp.int8)
    got = mgpu.quant_matmul(x, q, s, config=cfg, interpret=True)
    assert _rel(got, ref.w8a16_matmul(x, q, s, out_dtype=jnp.float32)) < 4e-3
    assert not mgpu.kernel_config(16, 6144, 4096).exit_read_only
    monkeypatch.setattr(mgpu, "DECODE_EXIT_READ_ONLY", True)
    assert mgpu.kernel_config(16, 6144, 4096).exit_read_only


def test_persistent_kernel_async_accumulator(monkeypatch):
    """``DECODE_ASYNC`` (the default since session 43; off: step_floor's quant-async-off) puts
    ``async_acc`` into the decode configs with a ring at least 3 steps deep (slots free a step
    late: 256-column tiles at 16 tokens, 4 stages), which the GPU lowering accepts at the 8B's
    shapes; it needs 2+ stages and x streamed. Off, the ring is two steps ahead again."""
    assert mgpu.DECODE_ASYNC
    monkeypatch.setattr(mgpu, "DECODE_ASYNC", False)
    assert not mgpu.kernel_config(16, 6144, 4096).async_acc
    monkeypatch.setattr(mgpu, "DECODE_ASYNC", True)
    for n, k in ((6144, 4096), (4096, 14336)):
        cfg = mgpu.kernel_config(16, n, k)
        assert cfg.async_acc and (cfg.block_k, cfg.stages) == (256, 4)
        assert 3 * (64 + 2 * 16) * cfg.block_k <= mgpu.DECODE_SMEM_PER_CTA
        x = jax.ShapeDtypeStruct((16, k), jnp.bfloat16)
        w = jax.ShapeDtypeStruct((n, k), jnp.int8)
        fn = jax.jit(lambda x, w, s: mgpu.quant_matmul(x, w, s))
        text = fn.trace(x, w, jax.ShapeDtypeStruct((n,), jnp.float32)).lower(lowering_platforms=("cuda",))
        assert "mosaic_gpu" in text.as_text()
    assert not mgpu_decode.supports(16, 128, 512, DecodeConfig(64, 128, 1, async_acc=True))


def test_units_go_to_ctas_in_order():
    """Every unit has one owner, in order: 1792 units of [14336, 4096] (K in 8 parts), 7 per CTA
    on 256 CTAs."""
    plain = DecodeConfig(64, 256, 4, split_k=8, per_cta=7)
    assert [plain.owner(g) for g in range(0, 1792, 7)] == list(range(256)) and plain.ctas(14336) == 256
    assert [plain.first_unit(c) for c in (0, 1, 255)] == [0, 7, 1785]


def test_tile_runs_partials(monkeypatch):
    """``tile_runs`` stores one partial per CTA that shares a tile (``slots``), not one per K
    part: the 8B's [14336, 4096] at 16 tokens (8 parts, 7 units per CTA) 2 instead of 8, its
    qkv projection 4 instead of 8 (o: one unit per CTA, 4 either way); ``DECODE_TILE_RUNS``
    (on by default; the A/B quant-tile-runs-off) sets the field, which the fused epilogues'
    checks count by."""
    cfg = mgpu_decode.decode_config(14336, 4096, block_k=256, sms=132)
    assert (cfg.split_k, cfg.per_cta, cfg.slots(14336)) == (8, 7, 8)
    assert dataclasses.replace(cfg, tile_runs=True).slots(14336) == 2
    for n, split, runs in ((6144, 8, 4), (4096, 4, 4)):   # qkv: 3 units per CTA; o: one
        cfg = mgpu_decode.decode_config(n, 4096, block_k=256, sms=132)
        assert (cfg.split_k, dataclasses.replace(cfg, tile_runs=True).slots(n)) == (split, runs)
    assert DecodeConfig(64, 128, 2, split_k=2, per_cta=3, tile_runs=True).slots(448) == 2
    assert mgpu.kernel_config(16, 6144, 4096).tile_runs
    monkeypatch.setattr(mgpu, "DECODE_TILE_RUNS", False)
    assert not mgpu.kernel_config(16, 6144, 4096).tile_runs


def test_decode_units_of_128_rows(monkeypatch):
    """``DECODE_BLOCK_N`` = 128 (the A/B quant-bn128): 128-row units whose K tile shrinks until two
    ring steps fit ``DECODE_SMEM_PER_CTA`` (512 -> 256 columns at 16 tokens; 64-row units keep
    512), and the kernel still matches the reference. The rule without ``async_acc`` (two ring
    steps ahead); with it, three (``test_persistent_kernel_async_accumulator``)."""
    monkeypatch.setattr(mgpu, "DECODE_ASYNC", False)
    assert mgpu.kernel_config(16, 4096, 4096).block_k == 512
    monkeypatch.setattr(mgpu, "DECODE_BLOCK_N", 128)
    cfg = mgpu.kernel_config(16, 4096, 4096)
    assert (cfg.block_n, cfg.block_k) == (128, 256)
    assert 2 * (128 + 2 * 16) * cfg.block_k <= mgpu.DECODE_SMEM_PER_CTA
    x, q, s, _ = _operands(13, 3, 512, 1024, jnp.int8)
    cfg = mgpu.kernel_config(3, 512, 1024)
    assert cfg.block_n == 128
    got = mgpu.quant_matmul(x, q, s, config=cfg, interpret=True)
    assert _rel(got, ref.w8a16_matmul(x, q, s, out_dtype=jnp.float32)) < 4e-3


@pytest.mark.parametrize("m,name", [(16, "quant_decode_6144x4096"), (300, "quant_tiled_6144x4096")])
def test_kernels_are_named_by_shape(m, name):
    """A profile tells the projections apart: each kernel is named after its weight's shape."""
    xs = jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16)
    ws = jax.ShapeDtypeStruct((6144, 4096), jnp.int8)
    ss = jax.ShapeDtypeStruct((6144,), jnp.float32)
    fn = jax.jit(lambda x, w, s: mgpu.quant_matmul(x, w, s))
    assert name in fn.trace(xs, ws, ss).lower(lowering_platforms=("cuda",)).as_text()


def test_int8_weights_with_an_f16_x_by_bit_assembly(monkeypatch):
    """``int8_f16_bits`` (``DECODE_INT8_F16_BITS``: on; off, the A/B quant-int8-f16-bits-off):
    every int8 value assembled into the f16 it is, exactly; the persistent kernel with it
    (per-step waits and ``async_acc``) gives the same sums as the plain convert, interpreted;
    the switch sets the default configs' field; and the GPU lowering (the A tile from
    registers) accepts it at the 8B's o shape."""
    every = jnp.arange(-128, 128, dtype=jnp.int32).astype(jnp.int8).reshape(16, 16)
    got = mgpu_decode.dequant_tile(every, jnp.float16, fp8=FP8, int8_bits=True)
    assert got.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(every, np.float32))
    x, q, s, _ = _operands(14, 5, 448, 512, jnp.int8, jnp.float16)
    for cfg in (DecodeConfig(64, 128, 2, split_k=2, per_cta=3, store_mn=True),
                DecodeConfig(64, 128, 3, split_k=2, per_cta=3, store_mn=True, async_acc=True)):
        plain = mgpu.quant_matmul(x, q, s, out_dtype=jnp.float32, config=cfg, interpret=True)
        bits = mgpu.quant_matmul(x, q, s, out_dtype=jnp.float32, interpret=True,
                                 config=dataclasses.replace(cfg, int8_f16_bits=True))
        np.testing.assert_array_equal(np.asarray(bits), np.asarray(plain))
        assert _rel(bits, ref.w8a16_matmul(x, q, s, out_dtype=jnp.float32)) < 1e-5
    monkeypatch.setattr(mgpu, "DECODE_INT8_F16_BITS", False)
    assert not mgpu.kernel_config(16, 4096, 4096).int8_f16_bits
    monkeypatch.setattr(mgpu, "DECODE_INT8_F16_BITS", True)
    cfg = mgpu.kernel_config(16, 4096, 4096)
    assert cfg.int8_f16_bits
    xs = jax.ShapeDtypeStruct((16, 4096), jnp.float16)
    ws = jax.ShapeDtypeStruct((4096, 4096), jnp.int8)
    fn = jax.jit(lambda x, w, s: mgpu.quant_matmul(x, w, s, config=cfg))
    text = fn.trace(xs, ws, jax.ShapeDtypeStruct((4096,), jnp.float32)).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in text.as_text()
