"""The GPU Pallas kernels compiled for a real GPU, against the pure-jnp references.

Same cases as tests/kernels (interpret mode) plus Llama-3.1-8B-sized shapes; skipped without a GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import gpu as fa_gpu
from pallas_kernels.flash_attention import reference as fa_ref
from pallas_kernels.kv_write import gpu as kv_gpu
from pallas_kernels.kv_write import reference as kv_ref
from pallas_kernels.ragged_paged_attention import gpu as rpa_gpu
from pallas_kernels.ragged_paged_attention import gpu_config as rpa_config
from pallas_kernels.ragged_paged_attention import gpu_splits as rpa_splits
from pallas_kernels.ragged_paged_attention import reference as rpa_ref
from tests.kernels.ragged_batch import make_batch, rel_err
from tests.kernels.rpa_cases import CASES, Case

pytestmark = pytest.mark.gpu

BIG = {
    "llama_decode_32x1000": Case(
        (1,) * 32, tuple(1000 + 37 * i for i in range(32)), 16, 32, 8, 128, jnp.bfloat16
    ),
    "llama_mixed": Case((1, 300, 1, 77, 1), (2100, 300, 17, 900, 4000), 16, 32, 8, 128, jnp.bfloat16),
    "llama_prefill_1000": Case((1000,), (1000,), 16, 32, 8, 128, jnp.bfloat16),
}
CONFIGS = [
    None,
    rpa_gpu.GpuConfig(block_q=4, pages_per_block=2, num_splits=4, fused_combine=True),
    rpa_gpu.GpuPlan(rpa_gpu.GpuConfig(block_q=2, num_splits=3), rpa_gpu.GpuConfig(block_q=16)),
    rpa_gpu.GpuConfig(block_q=4, pages_per_block=2, num_splits=16),  # many splits unused at run time
]


def _check_rpa(c: Case, config, seed: int, tol: float) -> None:
    b = make_batch(
        np.random.default_rng(seed), list(c.q_lens), list(c.ctx_lens), page_size=c.page_size,
        num_q_heads=c.num_q_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=c.dtype,
        num_pages=c.num_pages,
    )  # fmt: skip
    kw = dict(
        sm_scale=c.head_dim**-0.5, sliding_window=c.sliding_window, soft_cap=c.soft_cap, **b.scale_kwargs()
    )
    want = jax.jit(functools.partial(rpa_ref.ragged_paged_attention, **kw))(*b.args())
    got = jax.jit(functools.partial(rpa_gpu.ragged_paged_attention, config=config, **kw))(*b.args())
    n = b.query_start_loc[len(c.q_lens)]
    got = np.asarray(got.astype(jnp.float32))
    assert np.all(np.isfinite(got))
    assert np.all(got[n:] == 0)
    assert rel_err(got[:n], np.asarray(want.astype(jnp.float32))[:n]) < tol


@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
@pytest.mark.parametrize("name", sorted(CASES) + sorted(BIG))
def test_rpa_gpu(name, cfg):
    c = {**CASES, **BIG}[name]
    _check_rpa(c, CONFIGS[cfg], cfg, c.tol)


@pytest.mark.parametrize("compute", ["float16", "float8"])
@pytest.mark.parametrize("name", ["int8_kv", "fp8_kv", "fp8_kv_qk8"])
def test_rpa_gpu_kv_compute(name, compute):
    """GpuConfig.kv_compute lowered by Triton: f16 dots, or the QK dot in e4m3 (fp8 pools; int8
    pools then take f16), within the quantized cases' tolerance (interpret mode: 0.06-0.12%
    relative error with the e4m3 QK dot, 0.01-0.03% with f16)."""
    c = CASES[name]
    _check_rpa(c, rpa_gpu.GpuConfig(kv_compute=compute), 0, c.tol)


@pytest.mark.parametrize("live", [40, 64])
@pytest.mark.parametrize("pool,bits", [(jnp.uint8, False), (jnp.int8, False), (jnp.int8, True)])
def test_rpa_gpu_quantized_decode_keys(monkeypatch, pool, bits, live):
    """The 8B layout's decode over an fp8 pool (a 64-key launch and its 128-key twin: 40
    sequences take the narrow one, 64 the wide one), an int8 pool (128 keys) and one converted
    by bit assembly (the default since session 49: fp8's pair), default config, against the
    reference."""
    monkeypatch.setattr(rpa_config, "INT8_KV_F16_BITS", bits)
    assert bool(rpa_splits.wide_keys_win(jnp.int32(live * 8))) == (live == 64)
    ctx = tuple(300 + 23 * i for i in range(live))
    _check_rpa(Case((1,) * live, ctx, 16, 32, 8, 128, pool), None, live, 1e-2)


@pytest.mark.parametrize("rows,kv_heads,live", [(128, 8, 3), (128, 8, 40), (16, 32, 1), (16, 32, 12)])
@pytest.mark.parametrize("pool", [jnp.bfloat16, jnp.uint8])
@pytest.mark.parametrize("max_q_len", [1, 2])
def test_rpa_gpu_split_twin(pool, rows, kv_heads, live, max_q_len):
    """Decode classes with a split twin (on since session 49): the 8B layout's in a 128-row bucket
    (3 sequences x 8 kv heads take the twin and its merge, 40 the unsplit launch or, fp8, its
    narrow / wide pair) and a 32-kv-head model's 16-row bucket (1 sequence takes the twin, 12
    the unsplit launch), called as the engine's decode-only call (one row per sequence) and as a
    mixed step's decode launch, against the reference."""
    ctx = [900 + 37 * i for i in range(live)]
    b = make_batch(np.random.default_rng(live), [1] * live, ctx, page_size=16, num_q_heads=32,
                   num_kv_heads=kv_heads, head_dim=128, dtype=pool, extra_seqs=rows - live,
                   extra_tokens=rows - live)  # fmt: skip
    kind = None if pool == jnp.bfloat16 else "fp8"
    cfg = rpa_gpu.default_config(rows, rows, 32, kv_heads, 16, b.page_table.shape[1], kv_pool=kind,
                                 head_dim=128)
    assert (cfg.decode if isinstance(cfg, rpa_gpu.GpuPlan) else cfg).split_twin is not None
    kw = dict(sm_scale=128**-0.5, **b.scale_kwargs())
    want = jax.jit(functools.partial(rpa_ref.ragged_paged_attention, **kw))(*b.args())
    got = jax.jit(functools.partial(rpa_gpu.ragged_paged_attention, max_q_len=max_q_len, **kw))(*b.args())
    got = np.asarray(got.astype(jnp.float32))
    assert np.all(np.isfinite(got)) and np.all(got[live:] == 0)
    assert rel_err(got[:live], np.asarray(want.astype(jnp.float32))[:live]) < 1e-2


@pytest.mark.parametrize(
    "dtype,tokens,cu,window,cap",
    [
        (jnp.float32, 300, [0, 100, 250], None, None),
        (jnp.bfloat16, 2048, None, None, None),
        (jnp.bfloat16, 1000, [0, 1, 500, 999], 128, 30.0),
    ],
)
def test_flash_gpu(dtype, tokens, cu, window, cap):
    rng = np.random.default_rng(tokens)
    q = jnp.asarray(rng.standard_normal((tokens, 8, 128)), dtype)
    k = jnp.asarray(rng.standard_normal((tokens, 2, 128)), dtype)
    v = jnp.asarray(rng.standard_normal((tokens, 2, 128)), dtype)
    cu = None if cu is None else jnp.asarray(cu, jnp.int32)
    kw = dict(sm_scale=128**-0.5, sliding_window=window, soft_cap=cap)
    want = jax.jit(functools.partial(fa_ref.flash_attention, **kw))(q, k, v, cu)
    for cfg in (None, fa_gpu.FlashGpuConfig(64, 64, 4, 2)):
        got = jax.jit(functools.partial(fa_gpu.flash_attention, config=cfg, **kw))(q, k, v, cu)
        assert np.all(np.isfinite(np.asarray(got.astype(jnp.float32))))
        assert rel_err(got, want) < (1e-5 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.int8])
def test_write_kv_gpu(dtype):
    rng = np.random.default_rng(0)
    shape = (70_001, 16, 8, 128) if dtype == jnp.bfloat16 else (300, 16, 2, 64)
    k = (jax.random.normal(jax.random.key(0), shape) * 50).astype(dtype)
    v = (jax.random.normal(jax.random.key(1), shape) * 50).astype(dtype)
    sc = {}
    if dtype == jnp.int8:
        sc = dict(
            k_scales=jnp.full(shape[:1] + shape[2:3], 0.05), v_scales=jnp.full(shape[:1] + shape[2:3], 0.07)
        )
    t = 300
    kn = jnp.asarray(rng.standard_normal((t, *shape[2:])), jnp.float32)
    vn = jnp.asarray(rng.standard_normal((t, *shape[2:])), jnp.float32)
    slots = rng.permutation(np.arange(shape[1], shape[0] * shape[1]))[:t]
    slots[-5:] = [0, 1, 2, 0, 1]  # padding tokens into the null page
    slots = jnp.asarray(slots, jnp.int32)
    want = kv_ref.write_kv(k, v, kn, vn, slots, **sc)
    got = jax.jit(functools.partial(kv_gpu.write_kv, **sc), donate_argnums=(0, 1))(k, v, kn, vn, slots)
    for g, w in zip(got, want, strict=True):
        assert bool(jnp.array_equal(g[1:], w[1:]))
