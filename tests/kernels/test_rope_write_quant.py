"""RoPE and the quantizing K/V write in one Triton kernel (pallas_kernels/kv_write/gpu_rope_quant.py,
interpret mode) against the reference (``split_rope`` of the projection + bias, then the page
scales and the row write), on step-shaped slot layouts with NaN-poisoned pages and scales the
step does not touch; the dispatcher's switch; the kernel cross-lowered for CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kv_write_quantized import PS, _step_slots

from pallas_kernels.kv_write import api, gpu_rope_quant
from pallas_kernels.kv_write import reference as kv_ref

NKV, G = 2, 3


def _operands(rng, t, d, bias, dtype=jnp.bfloat16):
    """The projection [T, Nkv * (G + 2) * d] with per-kv-head magnitudes far apart (a wrong
    head's scale shows), its bias or None, and cos / sin of positions 0..T-1."""
    mag = np.array([0.5, 20.0])[None, :, None, None]
    qkv = jnp.asarray((rng.standard_normal((t, NKV, G + 2, d)) * mag).reshape(t, -1), dtype)
    b = jnp.asarray(rng.standard_normal(NKV * (G + 2) * d), dtype) if bias else None
    emb = np.arange(t)[:, None] * (1.0 / 10000.0 ** (np.arange(0, d, 2) / d))[None]
    cos, sin = (jnp.asarray(f(np.concatenate([emb, emb], -1)), jnp.float32) for f in (np.cos, np.sin))
    return qkv, b, cos, sin


def _pools(rng, num_pages, d, pool_dtype, touched):
    poison = 0x7F if pool_dtype == jnp.uint8 else -128       # e4m3 NaN bits / int8's minimum
    k, v = (jnp.full((num_pages, PS, NKV, d), poison, pool_dtype) for _ in range(2))
    ks = np.full((num_pages, NKV), np.nan, np.float32)
    old = sorted(touched)
    ks[old] = rng.uniform(0.05, 0.2, (len(old), NKV))          # pages continued keep their scale
    return k, v, jnp.asarray(ks), jnp.asarray(ks * 1.5)


def _reference(qkv, b, cos, sin, slots, *pools):
    q, k, v = kv_ref.split_rope(qkv if b is None else qkv + b, cos, sin, NKV, G)
    return (q, *kv_ref.write_kv_quantized(*pools, k, v, slots))


@pytest.mark.parametrize("pool_dtype", [jnp.int8, jnp.uint8], ids=["int8", "fp8"])
@pytest.mark.parametrize("d,bias,block_t", [(64, True, 8), (32, False, 4), (128, False, 8)])
def test_kernel_matches_the_reference(pool_dtype, d, bias, block_t):
    rng = np.random.default_rng(d)
    num_pages = 23
    slots, touched = _step_slots(rng, num_pages)
    qkv, b, cos, sin = _operands(rng, len(slots), d, bias)
    pools = _pools(rng, num_pages, d, pool_dtype, touched)
    args = (qkv, b, cos, sin, jnp.asarray(slots), *pools)
    want = _reference(*args)
    def kernel(qkv, b, *rest):   # (callers add the bias: XLA fuses it into the projection)
        return gpu_rope_quant.rope_write_quantized(qkv if b is None else qkv + b, *rest, groups=G,
                                                   interpret=True, block_t=block_t)

    got = jax.jit(kernel, donate_argnums=(5, 6, 7, 8))(*args)
    names = ("q", "k", "v", "k_scales", "v_scales")
    for g, w, name in zip(got, want, names, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        g, w = np.asarray(g), np.asarray(w)
        if name != "q":   # page 0 takes the padding rows' writes in any order
            g, w = g[1:], w[1:]
        if name.endswith("scales"):
            np.testing.assert_array_equal(g, w, err_msg=name)   # NaN == NaN here: untouched stay NaN
        else:
            np.testing.assert_array_equal(g.view(np.uint8) if name != "q" else g,
                                          w.view(np.uint8) if name != "q" else w, err_msg=name)
    got_ks = np.asarray(got[3])
    assert np.isnan(got_ks[[p for p in range(1, num_pages) if p not in touched]]).all()
    assert not np.isnan(got_ks[sorted(touched)]).any()


def test_dispatch_follows_the_switch(monkeypatch):
    rng = np.random.default_rng(9)
    slots, touched = _step_slots(rng, 23)
    qkv, b, cos, sin = _operands(rng, len(slots), 64, True)
    args = (qkv, b, cos, sin, jnp.asarray(slots), *_pools(rng, 23, 64, jnp.int8, touched))
    calls = []
    real = gpu_rope_quant.rope_write_quantized
    monkeypatch.setattr(gpu_rope_quant, "rope_write_quantized",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(api, "ROPE_WRITE_QUANT_ON_GPU", False)
    off = api.write_rope_quantized(*args, groups=G, interpret=True)
    assert calls == [] and not api.rope_write_quant_fuses(len(slots), 64, interpret=True)
    monkeypatch.setattr(api, "ROPE_WRITE_QUANT_ON_GPU", True)
    on = api.write_rope_quantized(*args, groups=G, interpret=True)
    assert calls == [qkv.shape]
    for a, w in zip(on, off, strict=True):
        np.testing.assert_array_equal(np.asarray(a)[1:], np.asarray(w)[1:])
    # CPU without interpret, past 64 tokens, a head width Triton cannot take: the composition
    assert not api.rope_write_quant_fuses(len(slots), 64)
    assert not api.rope_write_quant_fuses(65, 64, interpret=True)
    assert not api.rope_write_quant_fuses(8, 96, interpret=True)
    with pytest.raises(ValueError, match="do not fit"):
        gpu_rope_quant.rope_write_quantized(qkv[:, :-64], cos, sin, *args[4:], groups=G)


@pytest.mark.parametrize("pool_dtype", [jnp.int8, jnp.uint8], ids=["int8", "fp8"])
def test_kernel_lowers_for_cuda(pool_dtype, monkeypatch):
    """Llama-3.1-8B's heads (8 kv heads x (4 + 2) x 128) at a 16-token decode step, cross-lowered
    for CUDA on CPU (Triton, told it targets an H200)."""
    from jax._src.pallas.triton import gpu_info, pallas_call_registration

    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info",
                        lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200))
    t, nkv, g, d = 16, 8, 4, 128
    sd = jax.ShapeDtypeStruct
    args = (sd((t, nkv * (g + 2) * d), jnp.bfloat16), sd((t, d), jnp.float32), sd((t, d), jnp.float32),
            sd((t,), jnp.int32), sd((64, 16, nkv, d), pool_dtype), sd((64, 16, nkv, d), pool_dtype),
            sd((64, nkv), jnp.float32), sd((64, nkv), jnp.float32))
    fn = jax.jit(lambda *a: gpu_rope_quant.rope_write_quantized(*a, groups=g))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "rope_write_quantized" in text
