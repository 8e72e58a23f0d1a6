"""The quantized matmul under tensor parallelism runs per shard (jserve/model/linear.py).

tp=2 on two forced host devices, the Pallas kernel interpreted on CPU (the TPU kernel: the
Mosaic GPU interpreter keeps one global shared memory and cannot run two devices' kernels at
once; tests/gpu/test_quant_engine_gpu.py runs the Mosaic GPU kernel at tp=2 on GPUs).
Column-parallel projections (fused QKV, gate/up) keep their output shard, row-parallel ones
(o, down) psum float32 partials, and w8a8's per-token scales are reduced over the shards
first. The bundled code-small's greedy tokens equal tp=1's.
"""

import dataclasses

import jax
import numpy as np
import pytest
import quant_eval as qe

from jserve.model.linear import QuantizedWeight, linear
from jserve.model.quant_params import PROJECTIONS
from sharding import STAGE_AXIS, TENSOR_AXIS, make_mesh

pytestmark = pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (XLA_FLAGS host count)")

PROMPT = [0, 334, 1150, 13, 2310, 302, 290, 331]
STEPS = 4   # each interpreted greedy run compiles a prefill and a decode step (~20 s each on CPU)


def interpreted(params: dict) -> dict:
    """The projections run the Pallas kernel interpreted (CPU) instead of the reference."""
    return {k: dataclasses.replace(v, interpret="tpu") if k in PROJECTIONS else v
            for k, v in params.items()}


@pytest.fixture(scope="module", params=["int8", "fp8_w8a8"])
def loaded(request):
    """(method, cfg, tp=1 params, tp=2 params, mesh); tp=1 runs the reference (what the engine
    runs on CPU; tests/kernels check the kernel against it), tp=2 the interpreted kernel."""
    method = request.param
    cfg, one = qe.load(method)
    mesh = make_mesh(2)
    _, two = qe.load(method, mesh=mesh)
    return method, cfg, one, interpreted(two), mesh


def test_weights_record_their_layout(loaded):
    _, _, _, two, _ = loaded
    # The stacked-layer axis maps to the pipeline stage axis (size 1 here: pp=1).
    assert two["wgu"].spec == (STAGE_AXIS, None, TENSOR_AXIS, None)     # column parallel: I
    assert two["wqkv"].spec[1] == TENSOR_AXIS and two["wqkv"].spec[-1] is None
    assert two["wo"].spec == (STAGE_AXIS, None, TENSOR_AXIS)            # row parallel: K
    assert two["wd"].spec == (STAGE_AXIS, None, TENSOR_AXIS)
    for name in PROJECTIONS:
        assert not two[name].q.sharding.is_fully_replicated


def test_tp2_kernel_per_shard_matches_tp1_greedy(loaded):
    method, cfg, one, two, mesh = loaded
    if method != "int8":
        pytest.skip("one method end to end is enough on CPU; w8a8's shard-reduced scales are "
                    "checked per projection below")
    ref = qe.greedy(cfg, one, PROMPT, STEPS)
    assert qe.greedy(cfg, two, PROMPT, STEPS, mesh=mesh) == ref


def test_linear_per_shard_equals_unsharded(loaded):
    """Each projection alone: tp=2 per shard == tp=1 (only the summation order may differ)."""
    method, cfg, one, two, mesh = loaded
    x = jax.random.normal(jax.random.key(0), (5, cfg.hidden_size), cfg.dtype)
    xi = jax.random.normal(jax.random.key(1), (5, cfg.intermediate_size), cfg.dtype)
    xo = jax.random.normal(jax.random.key(2), (5, two["wo"].q.shape[-1]), cfg.dtype)
    for name, inp in (("wqkv", x), ("wgu", x), ("wo", xo), ("wd", xi)):
        f = jax.jit(lambda x, w, m=None: linear(x, w, 1, m), static_argnums=2)
        a = np.asarray(f(inp, one[name]), np.float32)
        b = np.asarray(f(inp, two[name], mesh), np.float32)
        np.testing.assert_allclose(b, a, rtol=2e-2, atol=2e-2, err_msg=f"{method} {name}")


def test_sharded_step_calls_the_kernel_per_device(loaded):
    """The lowered tp=2 linear is a shard_map around the kernel: no weight all-gather."""
    _, cfg, _, two, mesh = loaded
    x = jax.ShapeDtypeStruct((4, cfg.intermediate_size), cfg.dtype)
    text = jax.jit(lambda x, w: linear(x, w, 0, mesh)).lower(x, two["wd"]).as_text()
    assert "manual_computation" in text and "all_gather" not in text
    assert "all_reduce" in text   # row parallel: psum of the partials
    assert isinstance(two["wd"], QuantizedWeight)
