"""The decode matmul's L2 prefetch of the next matmul's weight (pallas_kernels/quant_matmul/
l2_prefetch.py): the plan covers the next kernel's first steps and nothing out of bounds, the
kernel's result does not change (interpret mode, where a prefetch is a no-op), the CUDA lowering
issues the prefetches, and the model chains each projection to the next one's weight."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import quant_eval as qe

from jserve.model.decoder import forward
from jserve.model.quant_params import PROJECTIONS
from jserve.step_input import StepInput
from pallas_kernels.quant_matmul import l2_prefetch, mgpu, mgpu_decode
from pallas_kernels.quant_matmul import reference as ref
from pallas_kernels.quant_matmul.mgpu_decode import DecodeConfig


def _reads(p: l2_prefetch.PrefetchPlan, steps_per_cta: int) -> set:
    """(row, col) boxes of the first ``steps_per_cta`` steps of every CTA of the next kernel,
    simulated from its unit order (each CTA's own unit count: the last may own fewer)."""
    out = set()
    for j in range(p.ctas):
        count = min(p.per_cta, p.units - j * p.per_cta)
        for t in range(min(steps_per_cta, count * p.steps)):
            g = j * p.per_cta + t // p.steps
            kb = (g % p.split_k) * p.steps + t % p.steps
            for b in range(p.block_k // p.box_cols):
                out.add(((g // p.split_k) * p.block_n, kb * p.block_k + b * p.box_cols))
    return out


@pytest.mark.parametrize("n,k,bn,bk,split,per,ctas,budget", [
    (448, 1024, 64, 128, 2, 3, 5, 40_000),      # ragged: 14 units on 5 next CTAs, 3 current
    (28672, 4096, 64, 512, 1, 7, 256, 16 << 20),   # the 8B's gate/up in its default config
    (4096, 4096, 64, 512, 4, 1, 264, 64 << 20),    # the 8B's o, the whole weight (budget > it)
    (256, 768, 64, 256, 3, 2, 7, 1),               # the smallest budget: one step
])
def test_plan_covers_the_next_kernels_first_steps(n, k, bn, bk, split, per, ctas, budget):
    p = l2_prefetch.plan(n, k, bn, bk, split, per, budget)
    per_step = p.ctas * bn * bk
    assert p.depth == min(-(-budget // per_step), per * p.steps)
    issued = [box for c in range(ctas) for box in l2_prefetch.boxes(p, c, ctas)]
    assert all(0 <= r <= n - bn and 0 <= col <= k - p.box_cols for r, col in issued)
    # Every box of the next kernel's first `depth` steps, and none it does not read at all.
    assert _reads(p, p.depth) <= set(issued) <= _reads(p, p.per_cta * p.steps)
    if p.depth == per * p.steps:
        assert set(issued) == _reads(p, p.depth) and p.bytes() == n * k


def test_no_plan_without_a_budget_or_a_decode_kernel_next():
    assert l2_prefetch.plan(4096, 4096, 64, 512, 4, 1, 0) is None
    cfg = mgpu.kernel_config(1, 4096, 4096)
    w = jnp.zeros((4096, 4096), jnp.int8)
    assert mgpu.prefetch_plan(1, w, cfg, 1 << 20) is not None
    assert mgpu.prefetch_plan(1, None, cfg, 1 << 20) is None
    assert mgpu.prefetch_plan(1, w, mgpu.default_config(300, 4096, 4096), 1 << 20) is None   # prefill
    assert mgpu.prefetch_plan(1, w[:, :100], cfg, 1 << 20) is None   # the next one is not a decode kernel


@pytest.mark.parametrize("store_mn", [False, True])
def test_kernel_result_is_unchanged_by_the_prefetch(store_mn):
    """Interpret mode: the prefetch is a no-op there, so this checks the extra operand and the
    plan's indices trace and leave the partials bit for bit."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((5, 512)), jnp.bfloat16)
    q, s = ref.quantize_weight(jnp.asarray(rng.standard_normal((192, 512)), jnp.float32), jnp.int8)
    nxt, _ = ref.quantize_weight(jnp.asarray(rng.standard_normal((448, 1024)), jnp.float32), jnp.int8)
    cfg = DecodeConfig(64, 128, 2, split_k=2, per_cta=3, store_mn=store_mn)
    plan = l2_prefetch.plan(448, 1024, 64, 256, 2, 3, 1 << 20)
    xp = jnp.pad(x, ((0, 3), (0, 0)))
    plain = mgpu_decode.decode_matmul_t(xp, q, config=cfg, fp8=ref.FP8, interpret=True)
    warm = mgpu_decode.decode_matmul_t(xp, q, config=cfg, fp8=ref.FP8, interpret=True, prefetch=nxt,
                                       prefetch_plan=plan)
    np.testing.assert_array_equal(np.asarray(warm), np.asarray(plain))
    with pytest.raises(ValueError, match="prefetch weight"):
        mgpu_decode.decode_matmul_t(xp, q, config=cfg, fp8=ref.FP8, interpret=True, prefetch=nxt[:64],
                                    prefetch_plan=plan)


def test_cuda_lowering_issues_the_prefetches():
    xs = jax.ShapeDtypeStruct((1, 4096), jnp.bfloat16)
    ws = jax.ShapeDtypeStruct((6144, 4096), jnp.int8)
    ss = jax.ShapeDtypeStruct((6144,), jnp.float32)
    nxt = jax.ShapeDtypeStruct((4096, 4096), jnp.int8)

    def lowered(budget):
        fn = jax.jit(lambda x, w, s, p: mgpu.quant_matmul(x, w, s, prefetch=p, prefetch_bytes=budget))
        return fn.trace(xs, ws, ss, nxt).lower(lowering_platforms=("cuda",)).as_text()

    op = "cp.async.bulk.prefetch.tensor.2d.L2"
    assert op in lowered(8 << 20)
    assert op not in lowered(0)


def test_model_chains_each_projection_to_the_next_weight(monkeypatch):
    """Tracing a decode step of the bundled model (int8, the kernel interpreted): qkv prefetches
    o, o gate/up, gate/up down, down the next layer's qkv (the last layer's down nothing)."""
    cfg, params = qe.load("int8")
    params = {k: dataclasses.replace(v, interpret="gpu") if k in PROJECTIONS else v
              for k, v in params.items()}
    seen = set()
    real = mgpu_decode.decode_matmul_t

    def spy(xp, w, *, prefetch=None, **kw):
        seen.add((tuple(w.shape), None if prefetch is None else tuple(prefetch.shape)))
        return real(xp, w, prefetch=prefetch, **kw)

    monkeypatch.setattr(mgpu_decode, "decode_matmul_t", spy)
    monkeypatch.setattr(mgpu, "DECODE_PREFETCH_BYTES", 1 << 20)
    jax.clear_caches()   # traces cached under another budget
    kv = qe.allocate_kv_cache(cfg, 4, qe.PAGE, cfg.dtype, qe.make_mesh(1))
    b = StepInput(token_ids=np.array([5], np.int32), positions=np.array([3], np.int32),
                  slot_mapping=np.array([qe.PAGE + 3], np.int32), page_table=np.array([[1, 2, 3]], np.int32),
                  seq_lens=np.array([4], np.int32), query_start_loc=np.array([0, 1], np.int32),
                  num_seqs=np.array([1], np.int32), logits_indices=np.array([0], np.int32))
    try:
        jax.jit(lambda p, k, b: forward(cfg, p, k, b)).trace(params, kv, b)
    finally:
        jax.clear_caches()
    shape = {name: (int(np.prod(params[name].out_shape)), params[name].q.shape[-1]) for name in PROJECTIONS}
    chain = [("wqkv", "wo"), ("wo", "wgu"), ("wgu", "wd"), ("wd", "wqkv")]
    assert seen == {(shape[a], shape[b]) for a, b in chain} | {(shape["wd"], None)}
