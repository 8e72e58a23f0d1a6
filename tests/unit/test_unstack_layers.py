"""w8a8 projections as one array per layer (jserve/model/linear.py, ``unstack_layers``): the step
takes each layer's fp8 weight as an argument instead of slicing a stack (XLA copies a slice
handed to cuBLASLt's fp8 GEMM), with the same tokens; a stack laid out over pipeline stages
stays whole; the engine's built params hold the per-layer form."""

import jax
import numpy as np
import pytest
import quant_eval as qe

from jserve.model.decoder import forward
from jserve.model.linear import QuantizedWeight, unstack_fp8_dot_weights, unstack_layers
from jserve.model.quant_params import PROJECTIONS
from jserve.step_input import StepInput
from sharding import make_mesh

PROMPT = [0, 334, 1150, 13, 2310, 302, 290, 331]


@pytest.fixture(scope="module")
def loaded():
    return qe.load("fp8_w8a8")


def test_w8a8_projections_split_per_layer_with_the_same_tokens(loaded):
    cfg, stacked = loaded
    split = unstack_fp8_dot_weights(dict(stacked))
    for name in PROJECTIONS:
        w, s = split[name], stacked[name]
        assert isinstance(w.q, tuple) and len(w.q) == cfg.num_layers
        assert all(a.shape == (1, *s.q.shape[1:]) and a.sharding == s.q.sharding for a in w.q)
        np.testing.assert_array_equal(np.asarray(w.q[1][0], np.float32), np.asarray(s.q[1], np.float32))
        assert w.out_shape == s.out_shape and w.k == s.k
        one = w.one_layer(2)
        assert len(one.q) == 1 and one.scale.shape == (1, *s.scale.shape[1:])
    assert qe.greedy(cfg, split, PROMPT, 6) == qe.greedy(cfg, stacked, PROMPT, 6)


def test_step_slices_no_per_layer_weight(loaded):
    """In the traced step the per-layer fp8 arrays reach the layers as they are; the stacked form
    slices each layer out of its stack (what XLA turned into a copy before cuBLASLt)."""
    cfg, stacked = loaded
    kv = qe.allocate_kv_cache(cfg, 4, qe.PAGE, cfg.dtype, make_mesh(1))
    b = StepInput(token_ids=np.array([5], np.int32), positions=np.array([3], np.int32),
                  slot_mapping=np.array([qe.PAGE + 3], np.int32), page_table=np.array([[1, 2, 3]], np.int32),
                  seq_lens=np.array([4], np.int32), query_start_loc=np.array([0, 1], np.int32),
                  num_seqs=np.array([1], np.int32), logits_indices=np.array([0], np.int32))

    def sliced_q_inputs(params):
        jaxpr = jax.make_jaxpr(lambda p, k, b: forward(cfg, p, k, b))(params, kv, b).jaxpr
        leaves = jax.tree.leaves({n: params[n].q for n in PROJECTIONS})
        flat = jax.tree.leaves((params, kv, b))
        q_vars = {jaxpr.invars[i] for i, a in enumerate(flat) if any(a is leaf for leaf in leaves)}
        return sum(1 for e in jaxpr.eqns if e.primitive.name == "slice" and set(e.invars) & q_vars)

    assert sliced_q_inputs(stacked) == len(PROJECTIONS) * cfg.num_layers
    assert sliced_q_inputs(unstack_fp8_dot_weights(dict(stacked))) == 0


def test_weight_only_and_stage_sharded_stacks_stay_whole(loaded):
    cfg, stacked = loaded
    int8 = qe.load("int8")[1]
    # (weight-only stacks go to the Pallas kernels, which take their slices in place)
    assert unstack_fp8_dot_weights(dict(int8))["wgu"] is int8["wgu"]
    if len(jax.devices()) < 2:
        pytest.skip("a pipeline-sharded stack needs 2 devices (XLA_FLAGS host count)")
    mesh = make_mesh(1, pipeline_parallel_size=2)
    w = stacked["wd"]
    staged = QuantizedWeight(jax.device_put(w.q, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        "stage"))), w.scale, w.input_scale, act_quant=True)
    assert unstack_layers(staged) is staged


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (XLA_FLAGS host count)")
def test_tensor_parallel_per_layer_arrays_match_the_stack():
    """tp=2: each per-layer array keeps the stack's tensor sharding and the sharded matmuls
    (per shard, row-parallel ones reduced) give the stacked form's logits."""
    from fixture_paths import GOLDEN

    from checkpoints import HFModelDir
    from jserve.config import ModelConfig
    from jserve.model.params import load_params

    mdir = HFModelDir(GOLDEN / "llama")
    cfg = ModelConfig.from_hf_config(mdir.config, dtype="float32")
    mesh = make_mesh(2)
    stacked = load_params(mdir, cfg, mesh, "fp8_w8a8")
    split = unstack_fp8_dot_weights(dict(stacked))
    assert not split["wd"].q[0].sharding.is_fully_replicated
    prompt = list(range(5, 30))
    np.testing.assert_allclose(qe.prefill_logits(cfg, split, prompt, mesh),
                               qe.prefill_logits(cfg, stacked, prompt, mesh), rtol=1e-6, atol=1e-6)
