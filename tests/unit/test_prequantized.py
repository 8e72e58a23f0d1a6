"""Pre-quantized HF checkpoints (fixtures made here: tests/quant_fixtures.py): fine-grained FP8
with block scales and compressed-tensors FP8 (per-tensor / per-channel weight scales, no, dynamic
or static input scales) load into the quantized layout and give the same greedy tokens as a
float32 run on the weights they dequantize to; any other quantization_config is a clear error."""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import quant_eval as qe
from engine_helpers import run_tokens
from fixture_paths import GOLDEN
from quant_fixtures import compressed_tensors_fp8, fine_grained_fp8, random_tensors, tiny_config, write_model
from safetensors.numpy import load_file

from checkpoints import CheckpointError, HFModelDir, checkpoint_scheme
from jserve.config import ModelConfig
from jserve.model.linear import QuantizedWeight
from jserve.model.params import load_params, params_bytes
from jserve.model.quant_params import resolve_scheme, weight_bytes
from jserve.sampling_params import SamplingParams
from sharding import make_mesh

PROMPT = list(range(3, 30))

# name -> (q heads, maker, fp8 activations): the float32 twin must give the same tokens
FORMATS = {
    "fp8_block": (4, lambda t: fine_grained_fp8(t, (32, 32)), None),
    "ct_tensor_weight_only": (6, lambda t: compressed_tensors_fp8(t, "tensor", None), None),
    "ct_channel_weight_only": (6, lambda t: compressed_tensors_fp8(t, "channel", None), None),
    "ct_channel_dynamic": (6, lambda t: compressed_tensors_fp8(t, "channel", "dynamic"), "dynamic"),
    "ct_tensor_static": (6, lambda t: compressed_tensors_fp8(t, "tensor", "static"), "static"),
}


def _pair(tmp_path, name):
    heads, make, act = FORMATS[name]
    cfg = tiny_config(heads=heads)
    stored, deq, qc = make(random_tensors(cfg, seed=heads))
    quant = write_model(tmp_path / "quant", cfg, stored, qc)
    dense = write_model(tmp_path / "dense", cfg, deq)
    return quant, dense, stored, act


@pytest.mark.parametrize("name", list(FORMATS))
def test_prequantized_matches_its_dequantized_float32_twin(tmp_path, name):
    quant, dense, stored, act = _pair(tmp_path, name)
    qdir, ddir = HFModelDir(quant), HFModelDir(dense)
    cfg = ModelConfig.from_hf_config(qdir.config, dtype="float32")
    qp = load_params(qdir, cfg, make_mesh(1))
    dp = load_params(ddir, cfg, make_mesh(1))
    for w in (qp[k] for k in ("wqkv", "wo", "wgu", "wd")):
        assert isinstance(w, QuantizedWeight) and w.q.dtype == jnp.float8_e4m3fn
        assert w.act_quant == (act is not None)
        assert (w.group is not None) == (name == "fp8_block")
    assert params_bytes(qp) == weight_bytes(cfg, resolve_scheme(qdir.config, None, "x"))
    if act == "static":   # one input scale per layer: the max over the fused projections
        s = [stored[f"model.layers.{i}.self_attn.{p}_proj.input_scale"][0] for i in range(2) for p in "qkv"]
        np.testing.assert_allclose(np.asarray(qp["wqkv"].input_scale), np.max(np.reshape(s, (2, 3)), 1))
    got = qe.greedy(cfg, qp, PROMPT, 16)
    want = qe.greedy(cfg, dp, PROMPT, 16)
    if act is None:
        assert got == want
    else:   # fp8 activations round every activation: the first tokens still agree
        assert qe.agreement(got, want) >= 4, (got, want)


def test_engine_on_a_prequantized_checkpoint(tmp_path, make_engine):
    """The engine loads the golden Llama in fine-grained FP8 (tokenizer files copied) and its
    greedy tokens are those of the float32 twin."""
    tensors = {}
    for f in sorted(GOLDEN.joinpath("llama").glob("*.safetensors")):
        tensors.update({k: v.astype(np.float32) for k, v in load_file(str(f)).items()})
    stored, deq, qc = fine_grained_fp8(tensors, (16, 32))
    cfg = dict(HFModelDir(GOLDEN / "llama").config)
    quant = write_model(tmp_path / "q", cfg, stored, qc)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(GOLDEN / "llama" / f, quant / f)
    engine = make_engine(str(quant))
    got = run_tokens(engine, [PROMPT], SamplingParams(temperature=0.0, max_tokens=10))[0]
    dense = write_model(tmp_path / "d", cfg, deq)
    mcfg, params = qe.load(None, "float32", dense)
    assert got == qe.greedy(mcfg, params, PROMPT, 10)


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "awq", "bits": 4}, "quant_method 'awq' is not supported"),
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not supported"),
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group",
                                            "group_size": 128}}}}, "8-bit symmetric"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt 'e5m2'"),
])
def test_unsupported_quantization_config_is_a_startup_error(qc, match):
    with pytest.raises(CheckpointError, match=match) as e:
        checkpoint_scheme({"quantization_config": qc}, "ckpt/config.json")
    assert "supported quantization_config methods: fp8" in str(e.value)
    assert "compressed-tensors" in str(e.value)


def test_unsupported_checkpoint_fails_before_loading(tmp_path):
    cfg = tiny_config(heads=4)
    path = write_model(tmp_path, cfg, random_tensors(cfg), {"quant_method": "awq", "bits": 4})
    mdir = HFModelDir(path)
    with pytest.raises(CheckpointError, match="awq"):
        load_params(mdir, ModelConfig.from_hf_config(mdir.config), make_mesh(1))


def test_conflicting_or_partial_quantization(tmp_path):
    quant, _, stored, _ = _pair(tmp_path, "ct_channel_weight_only")
    mdir = HFModelDir(quant)
    cfg = ModelConfig.from_hf_config(mdir.config)
    with pytest.raises(ValueError, match="quantization='int8', but .* is a pre-quantized checkpoint"):
        load_params(mdir, cfg, make_mesh(1), "int8")
    qc = dict(mdir.config["quantization_config"], ignore=["lm_head", "model.layers.1.mlp.down_proj"])
    write_model(tmp_path / "partial", mdir.config, stored, qc)
    partial = HFModelDir(tmp_path / "partial")
    with pytest.raises(CheckpointError, match="leaves 'model.layers.1.mlp.down_proj' unquantized"):
        load_params(partial, cfg, make_mesh(1))


def test_missing_scale_names_the_tensor(tmp_path):
    quant, _, stored, _ = _pair(tmp_path, "ct_channel_weight_only")
    stored = dict(stored)
    del stored["model.layers.1.mlp.up_proj.weight_scale"]
    mdir = HFModelDir(quant)
    write_model(tmp_path / "broken", mdir.config, stored)
    broken = HFModelDir(tmp_path / "broken")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight_scale"):
        load_params(broken, ModelConfig.from_hf_config(broken.config), make_mesh(1))


def test_prequantized_checkpoint_quantizes_its_float_lm_head_on_request(tmp_path):
    """``quantize_lm_head`` on a pre-quantized checkpoint (its lm_head stored in float, as FP8
    checkpoints leave it): the head is quantized on load in the checkpoint's fp8, the block-scaled
    projections are untouched, and the plan counts what the tree holds."""
    quant, _, _, _ = _pair(tmp_path, "fp8_block")
    qdir = HFModelDir(quant)
    cfg = ModelConfig.from_hf_config(qdir.config, dtype="float32")
    qp = load_params(qdir, cfg, make_mesh(1), quantize_lm_head=True)
    head = qp["lm_head"]
    assert isinstance(head, QuantizedWeight) and head.q.dtype == jnp.float8_e4m3fn and head.group is None
    assert qp["wgu"].group is not None
    assert params_bytes(qp) == weight_bytes(cfg, resolve_scheme(qdir.config, None, "x", lm_head=True))
