"""tp=2 on two fake CPU devices gives the same greedy tokens as tp=1."""

import re

import jax
import numpy as np
import pytest
from engine_helpers import run_tokens

from jserve.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _greedy(engine, prompts):
    return run_tokens(engine, prompts, GREEDY)


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (XLA_FLAGS host count)")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tp2_matches_tp1(make_engine, arch):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(5, 500, n).tolist() for n in (4, 19, 37)]
    ref = _greedy(make_engine(arch), prompts)
    engine = make_engine(arch, tensor_parallel_size=2)
    wq = engine.runner.params["wqkv"]
    assert len(wq.sharding.device_set) == 2 and not wq.sharding.is_fully_replicated
    k_pages = engine.runner.kv[0][0]
    assert len(k_pages.sharding.device_set) == 2
    assert _greedy(engine, prompts) == ref


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (XLA_FLAGS host count)")
def test_tp2_with_flash_prefill_matches_tp1(make_engine):
    rng = np.random.default_rng(4)
    prompts = [rng.integers(5, 500, n).tolist() for n in (5, 23, 30)]
    ref = _greedy(make_engine("llama", flash_prefill_min_tokens=0), prompts)
    engine = make_engine("llama", tensor_parallel_size=2, flash_prefill_min_tokens=16)
    assert _greedy(engine, prompts) == ref


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (XLA_FLAGS host count)")
def test_attention_calls_run_per_device_under_tp(make_engine):
    """With KV heads divisible by tp, KV write and attention run under shard_map (a Pallas call
    left to the partitioner would gather the whole pool onto every device)."""
    from jserve.model.attention import head_parallel

    engine = make_engine("llama", tensor_parallel_size=2)
    runner = engine.runner
    assert head_parallel(runner.mesh, engine.config.model.num_kv_heads)
    text = runner.lower_step((16, False, False)).as_text()
    # KV write and attention each under shard_map, inside the one layer function every layer calls.
    assert text.count("manual_computation") >= 2
    # (the last layer's residual stream is read by nothing after the final norm; decoder._layers
    # keeps it an output, so JAX does not prune it into a function of its own: one function)
    calls = re.findall(r"call @(_layer\w*)\(", text)
    assert len(calls) == engine.config.model.num_layers and set(calls) == {"_layer"}
    assert not head_parallel(runner.mesh, 1) and not head_parallel(None, 8)
