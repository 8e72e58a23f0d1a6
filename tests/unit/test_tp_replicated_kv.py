"""Tensor parallelism beyond the KV-head count: tp=4 over 2 KV heads equals tp=1 (float32).

The engines run in a subprocess with 4 forced host devices (this session has 2)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixture_paths import ARCHS, GOLDEN

from jserve.builder import default_model_path
from jserve.config import ModelConfig
from jserve.model.kv_replicas import kv_head_replicas, serving_model_config

ROOT = Path(__file__).resolve().parents[2]


def _cfg(nq: int, nkv: int) -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=64,
                       intermediate_size=128, num_layers=1, num_heads=nq, num_kv_heads=nkv,
                       head_dim=16)


def test_replicas_arithmetic():
    assert kv_head_replicas(_cfg(4, 2), 1) == 1
    assert kv_head_replicas(_cfg(4, 2), 2) == 1
    assert kv_head_replicas(_cfg(4, 2), 4) == 2
    assert kv_head_replicas(_cfg(32, 8), 16) == 2
    served = serving_model_config(_cfg(32, 8), 16)
    assert (served.num_kv_heads, served.q_per_kv, served.q_per_kv_padded) == (16, 2, 2)
    assert serving_model_config(_cfg(4, 2), 2) == _cfg(4, 2)


@pytest.mark.parametrize("nq,nkv,tp", [(4, 2, 8), (12, 4, 8), (24, 8, 16)])
def test_uneven_replication_is_refused_by_name(nq, nkv, tp):
    with pytest.raises(ValueError, match="num_key_value_heads"):
        kv_head_replicas(_cfg(nq, nkv), tp)


def test_tp4_over_two_kv_heads_matches_tp1(xla_cache_dir):
    models = [str(default_model_path()), *(str(GOLDEN / a) for a in ARCHS)]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("tp_replicated_worker.py")),
                           "4", xla_cache_dir, *models], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for model in models:
        r = result[model]
        assert r["kv_heads"] == 4 and r["kv_devices"] == 4, model
        assert not r["kv_replicated"] and not r["wqkv_replicated"], model
        assert r["tpN"] == r["tp1"], model
