"""The Mosaic GPU (Hopper) flash attention kernel against the pure-jnp reference.

Causal, GQA, token counts that are not a multiple of the 128-row q block, packed segments with
NaN in the padding rows, head_dim 64 and 128, bf16 and fp16, several configs. Skipped without a
GPU (CPU CI); skipped on a GPU that is not Hopper.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import api as fa_api
from pallas_kernels.flash_attention import mgpu
from pallas_kernels.flash_attention import reference as fa_ref

pytestmark = pytest.mark.gpu

# tokens, q heads, kv heads, head_dim, cu_seqlens, dtype
CASES = {
    "llama_2048": (2048, 32, 8, 128, None, jnp.bfloat16),
    "gqa_1000": (1000, 8, 2, 128, None, jnp.bfloat16),
    "d64_fp16_777": (777, 4, 4, 64, None, jnp.float16),
    "packed_3000": (3000, 8, 2, 128, [0, 5, 700, 701, 2100, 2900], jnp.bfloat16),
    "packed_small": (300, 4, 1, 128, [0, 1, 2, 130, 250], jnp.bfloat16),
}
CONFIGS = [
    None,  # default_config: persistent for one sequence, not for packed segments
    mgpu.FlashMgpuConfig(block_kv=64, num_stages=3, pingpong=False, overlap=False),
    mgpu.FlashMgpuConfig(pingpong=True, num_stages=3, heavy_first=False),
    mgpu.FlashMgpuConfig(pingpong=True, num_stages=2),
    mgpu.FlashMgpuConfig(persistent=False, pingpong=False),
    mgpu.FlashMgpuConfig(persistent=True, pingpong=True, num_ctas=7),
]


def _frob_rel(got, want) -> float:
    got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
    want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _inputs(seed, tokens, hq, hkv, d, cu, dtype):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((tokens, hq, d)).astype(np.float32)
    k = rng.standard_normal((tokens, hkv, d)).astype(np.float32)
    v = rng.standard_normal((tokens, hkv, d)).astype(np.float32)
    end = tokens if cu is None else cu[-1]
    for x in (q, k, v):
        x[end:] = np.nan  # padding rows hold garbage
    cu = None if cu is None else jnp.asarray(cu, jnp.int32)
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), cu, end


@pytest.fixture(scope="module", autouse=True)
def _hopper_only():
    if not mgpu.on_hopper():
        pytest.skip("Mosaic GPU kernel needs a Hopper (sm_90) GPU")


@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
@pytest.mark.parametrize("name", sorted(CASES))
def test_flash_mgpu_matches_reference(name, cfg):
    tokens, hq, hkv, d, cu, dtype = CASES[name]
    q, k, v, cu_a, end = _inputs(10 * sorted(CASES).index(name) + cfg, tokens, hq, hkv, d, cu, dtype)
    assert mgpu.supports(q, k, cu_a, None, None)
    kw = dict(sm_scale=d**-0.5)
    want = jax.jit(functools.partial(fa_ref.flash_attention, **kw))(q, k, v, cu_a)
    got = jax.jit(functools.partial(mgpu.flash_attention, config=CONFIGS[cfg], **kw))(q, k, v, cu_a)
    assert got.shape == q.shape and got.dtype == q.dtype
    got = np.asarray(got.astype(jnp.float32))
    assert np.all(np.isfinite(got)), "NaN/inf leaked (padding K/V rows hold NaN)"
    assert np.all(got[end:] == 0)
    assert _frob_rel(got[:end], want[:end]) < 1e-2


def test_flash_mgpu_fresh_inputs_repeatable():
    """Two draws, each run twice: identical results (no race), both within tolerance."""
    f = jax.jit(functools.partial(mgpu.flash_attention, sm_scale=128**-0.5))
    for seed in (11, 12):
        q, k, v, cu_a, end = _inputs(seed, 4096, 32, 8, 128, [0, 1000, 4000], jnp.bfloat16)
        a = np.asarray(f(q, k, v, cu_a).astype(jnp.float32))
        b = np.asarray(f(q, k, v, cu_a).astype(jnp.float32))
        assert np.array_equal(a, b)
        want = fa_ref.flash_attention(q, k, v, cu_a, sm_scale=128**-0.5)
        assert _frob_rel(a[:end], want[:end]) < 1e-2


def test_supports_and_config_validation():
    q = jnp.zeros((256, 8, 128), jnp.bfloat16)
    k = jnp.zeros((256, 2, 128), jnp.bfloat16)
    assert mgpu.supports(q, k, None, None, None)
    assert not mgpu.supports(q, k, None, 128, None)
    assert not mgpu.supports(q, k, None, None, 30.0)
    assert not mgpu.supports(q.astype(jnp.float32), k.astype(jnp.float32), None, None, None)
    assert not mgpu.supports(q[..., :96], k[..., :96], None, None, None)
    with pytest.raises(ValueError, match="mgpu.flash_attention supports"):
        mgpu.flash_attention(q, k, k, sm_scale=0.1, sliding_window=4)
    bad_cfgs = (dict(block_kv=96), dict(num_stages=1), dict(consumer_regs=250), dict(consumer_regs=256),
                dict(num_ctas=0))  # fmt: skip
    for bad in bad_cfgs:
        with pytest.raises(ValueError):
            mgpu.FlashMgpuConfig(**bad)


def test_api_dispatches_here_on_hopper():
    """pallas_kernels.flash_attention takes this kernel on Hopper for supported calls (same bits)."""
    q, k, v, cu_a, end = _inputs(5, 1500, 8, 2, 128, [0, 600, 1400], jnp.bfloat16)
    via_api = jax.jit(functools.partial(fa_api.flash_attention, sm_scale=0.1))(q, k, v, cu_a)
    direct = jax.jit(functools.partial(mgpu.flash_attention, sm_scale=0.1))(q, k, v, cu_a)
    assert np.array_equal(np.asarray(via_api.astype(jnp.float32)), np.asarray(direct.astype(jnp.float32)))
    want = fa_ref.flash_attention(q, k, v, cu_a, sm_scale=0.1)
    assert _frob_rel(via_api[:end], want[:end]) < 1e-2
