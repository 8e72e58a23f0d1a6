"""tp=2 on two fake CPU devices gives the same greedy tokens as tp=1."""

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
    wq = engine.runner.params["layers"][0]["wq"]
    assert len(wq.sharding.device_set) == 2 and not wq.sharding.is_fully_replicated
    k_pages = engine.runner.kv[0][0]
    assert len(k_pages.sharding.device_set) == 2
    assert _greedy(engine, prompts) == ref
