"""Disaggregation on 2 GPUs (skipped with fewer): prefill on GPU 0, decode on GPU 1 give one
GPU's tokens (float32, bundled model, bf16 KV and int8 KV with its scales), compile nothing
while serving, and leave both pools empty."""

import numpy as np
import pytest
from engine_helpers import CompileCounter, run_engine
from gpu_count import gpu_count

from jserve.builder import default_model_path
from jserve.sampling_params import SamplingParams

SMALL = dict(model=str(default_model_path()), max_model_len=256, max_num_seqs=8,
             max_num_batched_tokens=64, num_pages=160)
GROUPS = dict(prefill_devices=(0,), decode_devices=(1,))


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_count() < 2, reason="needs 2 GPUs")]


def _items():
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 8000, n).tolist() for n in (5, 40, 77, 130, 33)]
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)] * 4 + \
        [SamplingParams(temperature=0.8, seed=1, n=3, max_tokens=16)]
    return list(zip(prompts, params, strict=True))


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_disagg_on_two_gpus_matches_one(make_engine, kv):
    want = run_engine(make_engine(**SMALL, kv_cache_dtype=kv), _items())
    engine = make_engine(**SMALL, kv_cache_dtype=kv, **GROUPS)
    with CompileCounter() as counter:
        got = run_engine(engine, _items())
    assert counter.count == 0
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]
    engine.step()
    engine.groups.check_invariants()
    assert engine.prefill.scheduler.pool.num_used == 0 and engine.decode.scheduler.pool.num_used == 0
    assert engine.stats().kv_cache["disagg_transfer_bytes"] > 0
