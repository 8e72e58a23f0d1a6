"""ModelConfig parsing from HF config.json, EngineConfig validation."""

import json

import pytest
from fixture_paths import GOLDEN

from jserve.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig


def _cfg(name="llama"):
    return json.loads((GOLDEN / name / "config.json").read_text())


def test_rope_parameters_form_equals_legacy_form():
    legacy = _cfg()
    new = {k: v for k, v in legacy.items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = dict(legacy["rope_scaling"], rope_theta=legacy["rope_theta"])
    assert ModelConfig.from_hf_config(new) == ModelConfig.from_hf_config(legacy)


def test_mistral_window_and_qwen_bias():
    m = ModelConfig.from_hf_config(_cfg("mistral"))
    assert m.sliding_windows == (8, 8)
    q = ModelConfig.from_hf_config(_cfg("qwen2"))
    assert q.qkv_bias and q.tie_word_embeddings and q.sliding_windows == (None, None)


@pytest.mark.parametrize("change, match", [
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2}}, "rope_scaling"),
    ({"num_key_value_heads": 3}, "multiple"),
])
def test_bad_model_config(change, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config(_cfg() | change)


def test_missing_field_names_file():
    cfg = _cfg()
    del cfg["hidden_size"]
    with pytest.raises(ValueError, match="my/config.json.*hidden_size"):
        ModelConfig.from_hf_config(cfg, source="my/config.json")


@pytest.mark.parametrize("cls, kwargs, match", [
    (CacheConfig, {"page_size": 12}, "page_size"),
    (CacheConfig, {"num_pages": 1}, "num_pages"),
    (CacheConfig, {"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    (CacheConfig, {"activation_memory_bytes": -1}, "activation_memory_bytes"),
    (SchedulerConfig, {"max_num_seqs": 0}, "max_num_seqs"),
    (SchedulerConfig, {"max_num_seqs": 600, "max_num_batched_tokens": 512}, "max_num_seqs"),
    (SchedulerConfig, {"async_scheduling": "yes"}, "async_scheduling must be a bool, got 'yes'"),
    (SchedulerConfig, {"max_model_len": None}, "max_model_len must be a positive integer"),
    (ParallelConfig, {"tensor_parallel_size": 0}, "tensor_parallel_size must be an integer >= 1"),
    (CacheConfig, {"kv_cache_dtype": "int4"}, "kv_cache_dtype must be 'auto', 'bfloat16'"),
])
def test_bad_engine_configs(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_async_scheduling_defaults_on():
    assert SchedulerConfig().async_scheduling is True
    assert SchedulerConfig(async_scheduling=False).async_scheduling is False


def test_token_buckets():
    assert SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=8).token_buckets == (16, 32, 64, 100)
