"""Flash attention: reference vs a numpy loop, GPU kernel (interpret mode) vs the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ragged_batch import rel_err, run_fast

from pallas_kernels.flash_attention import gpu as fa_gpu
from pallas_kernels.flash_attention import reference as fa_ref
from pallas_kernels.flash_attention import tpu as fa_tpu


def _inputs(seed, tokens, hq, hkv, d, cu, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((tokens, hq, d)).astype(np.float32)
    k = rng.standard_normal((tokens, hkv, d)).astype(np.float32)
    v = rng.standard_normal((tokens, hkv, d)).astype(np.float32)
    end = tokens if cu is None else cu[-1]
    for x in (q, k, v):
        x[end:] = np.nan  # padding rows hold garbage
    cu = None if cu is None else jnp.asarray(cu, jnp.int32)
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), cu


def _numpy(q, k, v, cu, sm_scale, window=None, cap=None):
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    t, hq, _ = q.shape
    g = hq // k.shape[1]
    bounds = [0, t] if cu is None else list(np.asarray(cu))
    out = np.zeros_like(q)
    for s0, s1 in zip(bounds[:-1], bounds[1:], strict=True):
        for i in range(s0, s1):
            lo = s0 if window is None else max(s0, i - window + 1)
            for h in range(hq):
                s = k[lo : i + 1, h // g] @ q[i, h] * sm_scale
                if cap is not None:
                    s = cap * np.tanh(s / cap)
                w = np.exp(s - s.max())
                out[i, h] = (w / w.sum()) @ v[lo : i + 1, h // g]
    return out


@pytest.mark.parametrize(
    "cu,window,cap", [(None, None, None), ([0, 7, 30, 41], None, None), ([0, 20, 45], 6, 3.0)]
)
def test_reference_matches_numpy(cu, window, cap):
    q, k, v, cu_a = _inputs(0, 48, 4, 2, 16, cu)
    got = np.asarray(fa_ref.flash_attention(q, k, v, cu_a, sm_scale=0.3, sliding_window=window, soft_cap=cap))
    end = 48 if cu is None else cu[-1]
    assert np.all(got[end:] == 0)
    assert rel_err(got[:end], _numpy(q, k, v, cu_a, 0.3, window, cap)[:end]) < 1e-5


KERNEL_CASES = [
    (50, 4, 2, 64, [0, 7, 30, 41], None, None, jnp.float32),
    (70, 2, 1, 128, None, 9, 5.0, jnp.float32),
    (64, 4, 4, 256, [0, 1, 33, 60], None, None, jnp.bfloat16),
]
GPU_CFGS = [fa_gpu.FlashGpuConfig(16, 16, 4, 1), fa_gpu.FlashGpuConfig(32, 16, 4, 1, heavy_first=False), None]
TPU_CFGS = [fa_tpu.FlashTpuConfig(16, 16), fa_tpu.FlashTpuConfig(16, 32), None]


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
@pytest.mark.parametrize("case", range(len(KERNEL_CASES)))
def test_kernel_interpret(kernel, case):
    tokens, hq, hkv, d, cu, window, cap, dtype = KERNEL_CASES[case]
    q, k, v, cu_a = _inputs(1, tokens, hq, hkv, d, cu, dtype)
    kw = dict(sm_scale=d**-0.5, sliding_window=window, soft_cap=cap)
    want = fa_ref.flash_attention(q, k, v, cu_a, **kw)
    mod, cfg = (fa_gpu, GPU_CFGS[case]) if kernel == "gpu" else (fa_tpu, TPU_CFGS[case])
    got = run_fast(lambda *a: mod.flash_attention(*a, interpret=True, config=cfg, **kw), q, k, v, cu_a)
    got = np.asarray(got.astype(jnp.float32))
    assert np.all(np.isfinite(got))
    end = tokens if cu is None else cu[-1]
    assert np.all(got[end:] == 0)
    assert rel_err(got, np.asarray(want.astype(jnp.float32))) < (1e-5 if dtype == jnp.float32 else 1e-2)


def test_mosaic_kernel_lowered_once_for_many_call_sites():
    """The dispatcher's jit wrapper makes a model's per-layer calls share one Mosaic GPU lowering.

    Lowered for CUDA on the CPU host: 6 chained calls of one shape give one kernel custom call
    (bare calls would embed the kernel 6 times and cost ~1.2 s of lowering each).
    """
    from pallas_kernels.flash_attention import api as fa_api

    q = jax.ShapeDtypeStruct((256, 8, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((256, 2, 128), jnp.bfloat16)

    def layers(q, k, v):
        for _ in range(6):
            q = fa_api._mgpu_jit(q, k, v, None, sm_scale=0.1)
        return q

    text = jax.jit(layers).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.custom_call") == 1
    assert text.count("call @_mgpu_jit(") == 6


def test_dispatch_off_hopper_keeps_reference_or_triton():
    """On a CPU host the entry point never takes the Mosaic kernel."""
    from pallas_kernels.flash_attention import api as fa_api

    q, k, v, _ = _inputs(2, 40, 4, 2, 64, None, jnp.bfloat16)
    assert not fa_api.use_mosaic(q, k, v, None, None, None)
    got = fa_api.flash_attention(q, k, v, sm_scale=0.125)
    want = fa_ref.flash_attention(q, k, v, sm_scale=0.125)
    assert np.array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
