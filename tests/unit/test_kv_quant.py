"""int8 / fp8 KV cache end to end on CPU: the pool with per-page, per-head scales, the model
writing and reading them, pages moving with their scales (copy-on-write, swap, host tier), the
bundled model's perplexity with quantized KV (the issue's tolerances), options and the plan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import quant_eval as qe
from engine_helpers import CompileCounter, run_engine
from fixture_paths import GOLDEN

from jserve.kv_cache import abstract_kv_cache, allocate_kv_cache
from jserve.options import EngineArgs
from jserve.plan import plan_capacity
from jserve.sampling_params import SamplingParams
from sharding import make_mesh

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
TOLERANCE = {"fp8": 0.01, "int8": 0.02}   # perplexity over the bf16 pool (the targets)


def test_pool_layout():
    cfg, _ = qe.load(None)
    kv = allocate_kv_cache(cfg, 5, 16, "fp8", make_mesh(1))
    k, v, ks, vs = kv[0]
    # fp8 is stored as its uint8 bits (pallas_kernels/kv_format.py: in-place scatters)
    assert k.dtype == jnp.uint8 and v.shape == (5, 16, cfg.num_kv_heads, cfg.head_dim)
    assert ks.shape == vs.shape == (5, cfg.num_kv_heads) and ks.dtype == jnp.float32
    assert allocate_kv_cache(cfg, 5, 16, "int8", make_mesh(1))[0][0].dtype == jnp.int8
    assert len(allocate_kv_cache(cfg, 5, 16, "bfloat16", make_mesh(1))[0]) == 2
    assert float(ks[1, 0]) == 1.0 and int(k.max()) == 0
    # The builder compiles over the abstract pool, then attaches the allocated one: same layout.
    for dtype in ("fp8", "bfloat16"):
        layout = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), tree)  # noqa: E731
        assert layout(abstract_kv_cache(cfg, 5, 16, dtype, make_mesh(1))) == layout(
            allocate_kv_cache(cfg, 5, 16, dtype, make_mesh(1)))
        # Start-up holds the step programs' room free while the pool is allocated, then frees it.
        held = allocate_kv_cache(cfg, 5, 16, dtype, make_mesh(2), keep_free_bytes=12345)
        assert layout(held) == layout(abstract_kv_cache(cfg, 5, 16, dtype, make_mesh(2)))
        assert not [x for x in jax.live_arrays() if x.shape == (12345,) and not x.is_deleted()]
    assert EngineArgs(kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8"
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        EngineArgs(kv_cache_dtype="int4")


@pytest.fixture(scope="module")
def heldout():
    ids = qe.heldout_ids(2 * qe.SEQ_LEN)
    cfg, params = qe.load(None)
    return cfg, params, ids, qe.evaluate(cfg, params, ids, batch=2, kv_dtype="bfloat16")


@pytest.mark.parametrize("kv_dtype", list(TOLERANCE))
def test_code_small_quantized_kv_accuracy(kv_dtype, heldout):
    """Attention reading the held-out windows back from an fp8 / int8 pool: perplexity within
    the issue's tolerance of the bf16 pool, next-token argmax the same at >= 95% of positions."""
    cfg, params, ids, (base_nll, base_top1) = heldout
    nll, top1 = qe.evaluate(cfg, params, ids, batch=2, kv_dtype=kv_dtype)
    assert qe.perplexity(nll) <= qe.perplexity(base_nll) * (1 + TOLERANCE[kv_dtype])
    assert np.mean(top1 == base_top1) >= 0.95


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_engine_with_quantized_kv_moves_scales_with_pages(make_engine, kv_dtype):
    """Swap, host tier and copy-on-write under pool pressure give the tokens of the same
    prompts run alone (scales depend on a page's tokens only: batch invariance holds), the
    engine's tokens are the model's own, and serving compiles nothing."""
    engine = make_engine("llama", num_pages=13, host_kv_cache_gb=0.001, kv_cache_dtype=kv_dtype)
    assert len(engine.runner.kv[0]) == 4
    rng = np.random.default_rng(7)
    prompts = [rng.integers(5, 500, n).tolist() for n in (9, 30, 17, 40, 5, 26)]
    with CompileCounter() as counter:
        alone = [run_engine(engine, [(p, GREEDY)])[0].outputs[0].token_ids for p in prompts]
        first = prompts[3]
        mixed = run_engine(engine, [(p, GREEDY) for p in prompts] +
                           [(first, SamplingParams(n=2, temperature=0.0, max_tokens=12, ignore_eos=True))])
    assert [o.outputs[0].token_ids for o in mixed[:-1]] == alone
    assert [c.token_ids for c in mixed[-1].outputs] == [alone[3]] * 2
    s = engine.kv_cache_stats()
    assert s["preemptions_swap"] > 0 and s["cow_copies"] > 0
    assert counter.count == 0
    cfg, params = qe.load(None, "float32", GOLDEN / "llama")
    assert alone[1] == qe.greedy(cfg, params, prompts[1], 12, kv_dtype=kv_dtype)


def test_mover_moves_scales():
    from jserve.kv_transfer import KVPageMover
    from jserve.scheduler_output import KVTransfers

    cfg, _ = qe.load(None)
    kv = allocate_kv_cache(cfg, 12, 4, "int8", make_mesh(1))
    rng = np.random.default_rng(0)
    kv = [tuple(jax.device_put(rng.integers(-100, 100, a.shape).astype(np.int8) if a.dtype == jnp.int8
                               else rng.uniform(0.1, 2, a.shape).astype(np.float32), a.sharding)
                for a in layer) for layer in kv]
    expect = [tuple(np.asarray(a) for a in layer) for layer in kv]
    mover = KVPageMover(kv, 4, {"swap": 3})
    kv = mover.move(kv, KVTransfers(copies=[(1, 2)], to_host=[(3, "swap", 0), (4, "swap", 2)]))
    kv = mover.move(kv, KVTransfers(from_host=[("swap", 0, 9), ("swap", 2, 10)]))
    for layer, want in zip(kv, expect, strict=True):
        for got, w in zip(layer, want, strict=True):
            got = np.asarray(got)
            np.testing.assert_array_equal(got[[2, 9, 10]], w[[1, 3, 4]])
            np.testing.assert_array_equal(got[[0, 1, 3, 4, 5]], w[[0, 1, 3, 4, 5]])


def test_plan_counts_one_byte_per_value_and_the_scales():
    bf16 = plan_capacity("llama3.1-8b", max_model_len=8192)
    fp8 = plan_capacity("llama3.1-8b", max_model_len=8192, kv_cache_dtype="fp8")
    assert fp8.kv_bytes_per_token * 2 == bf16.kv_bytes_per_token
    # about 2x: scales cost a little, the smaller pages moved to host memory free a little
    assert 1.99 < fp8.pool.num_pages / bf16.pool.num_pages <= 2.02
    assert "1 B (fp8; --kv-cache-dtype)" in fp8.render()
    jax.clear_caches()


def test_addressable_pages_leave_out_the_band_of_32_bit_offsets():
    from pallas_kernels import kv_format
    per_page = 16 * 8 * 128   # the 8B's page: 2**14 values
    limit = 2**31 // per_page
    for dtype in (jnp.uint8, jnp.int8):   # 1-byte arrays of 2-4 GiB: capped at 2 GiB
        assert kv_format.addressable_pages(limit, per_page, dtype) == limit
        assert kv_format.addressable_pages(limit + 1, per_page, dtype) == limit
        assert kv_format.addressable_pages(2 * limit, per_page, dtype) == limit
        assert kv_format.addressable_pages(2 * limit + 1, per_page, dtype) == 2 * limit + 1
    for n in (limit + 1, 2 * limit):   # wider dtypes pass 2**32 bytes first: never capped
        assert kv_format.addressable_pages(n, per_page, jnp.bfloat16) == n


def test_plan_caps_a_one_byte_pool_in_the_band_and_says_why():
    import dataclasses

    from jserve.builder import pool_plan_for_budget

    # Qwen2.5-0.5B's fp8 pool on an H200 at 0.9: 1.35M pages would make 2.8 GB layer arrays.
    fp8 = plan_capacity("qwen2.5-0.5b", gpu="H200", max_model_len=8192, kv_cache_dtype="fp8")
    per_page = 16 * 2 * 64
    limit = 2**31 // per_page
    assert fp8.pool.num_pages == limit < fp8.pool.budget_pages
    assert "32-bit offsets" in fp8.render() and "capped from" in fp8.pool.describe()

    def pages(config, num_pages):
        return pool_plan_for_budget(dataclasses.replace(config, cache=dataclasses.replace(
            config.cache, num_pages=num_pages)), None)

    with pytest.raises(ValueError, match=f"num_pages={limit + 1} .* num_pages <= {limit}"):
        pages(fp8.config, limit + 1)
    assert pages(fp8.config, 2 * limit + 1).num_pages == 2 * limit + 1   # past 4 GiB: 64-bit offsets
    bf16 = plan_capacity("qwen2.5-0.5b", gpu="H200", max_model_len=8192)
    assert bf16.pool.budget_pages == 0
    assert pages(bf16.config, limit + 1).num_pages == limit + 1         # 4 GiB of bf16: 64-bit offsets
    jax.clear_caches()


def test_the_draft_models_twin_pool_bounds_the_pages_too():
    """``builder.addressable_pages`` (also applied when start-up shrinks a pool that did not
    fit): the twin pool of a draft with wider pages caps first."""
    from jserve.builder import addressable_pages
    from jserve.model.shapes import named_shape

    plan = plan_capacity("qwen2.5-0.5b", gpu="H200", max_model_len=8192, kv_cache_dtype="fp8")
    draft = named_shape("llama3.1-8b")   # 8 kv heads x 128: 2**14 values a page
    assert addressable_pages(plan.config, None, 200_000) == 200_000
    assert addressable_pages(plan.config, draft, 200_000) == 2**31 // 2**14
    assert addressable_pages(plan.config, draft, 2**18 + 1) == 2**18 + 1   # past 4 GiB: 64-bit
    jax.clear_caches()


def test_the_triton_kernels_refuse_a_pool_in_the_band_by_name():
    """The kernels' own guard (``kv_format.check_addressable``), for callers that size pools
    themselves: traced on abstract arrays, nothing is allocated."""
    from pallas_kernels.kv_write import gpu_quant
    from pallas_kernels.ragged_paged_attention import gpu as rpa_gpu

    n = 2**31 // (16 * 8 * 128)
    f32, i32 = jnp.float32, jnp.int32

    def shapes(pages: int) -> tuple:
        pool = jax.ShapeDtypeStruct((pages, 16, 8, 128), jnp.uint8)
        return pool, jax.ShapeDtypeStruct((pages, 8), f32)

    pool, sc = shapes(n + 1)
    new = jax.ShapeDtypeStruct((4, 8, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match=f"write_kv_quantized: a uint8 pool of {n + 1} pages .* at most {n}"):
        jax.eval_shape(gpu_quant.write_kv_quantized, pool, pool, sc, sc, new, new,
                       jax.ShapeDtypeStruct((4,), i32))
    q = jax.ShapeDtypeStruct((4, 32, 128), jnp.bfloat16)
    meta = (jax.ShapeDtypeStruct((2, 8), i32), jax.ShapeDtypeStruct((2,), i32),
            jax.ShapeDtypeStruct((3,), i32), jax.ShapeDtypeStruct((1,), i32))
    with pytest.raises(ValueError, match="ragged_paged_attention: a uint8 pool"):
        jax.eval_shape(lambda q, k, v, ks, vs, *m: rpa_gpu.ragged_paged_attention(
            q, k, v, *m, sm_scale=0.1, k_scales=ks, v_scales=vs), q, pool, pool, sc, sc, *meta)
    pool, sc = shapes(n)   # at the limit: traced (its GPU test runs it)
    slots = jax.ShapeDtypeStruct((4,), i32)
    jax.eval_shape(gpu_quant.write_kv_quantized, pool, pool, sc, sc, new, new, slots)
