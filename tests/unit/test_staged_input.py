"""Staged step inputs (jserve/staged_input.py): each step's packed input copied into a fixed
device buffer per token bucket. The buffer keeps its address from call to call (the point:
the step's CUDA graph sees no moved input), and an engine whose runner stages its inputs
gives exactly the tokens it gave before (prefill chunks, decode, sampling with penalties)."""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import run_engine

from jserve.sampling_params import SamplingParams
from jserve.staged_input import StagedInputs, stage_inputs


def test_the_buffer_keeps_its_address_and_takes_each_input():
    import jax

    staged = StagedInputs([8, 8, 3], jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    first = staged.put(np.arange(8, dtype=np.int32))
    addr = first.unsafe_buffer_pointer()
    second = staged.put(np.arange(8, 16, dtype=np.int32))
    assert second.unsafe_buffer_pointer() == addr and first.is_deleted()
    assert np.asarray(second).tolist() == list(range(8, 16))
    assert np.asarray(staged.put(np.array([5, 6, 7], np.int32))).tolist() == [5, 6, 7]
    with pytest.raises(KeyError):
        staged.put(np.zeros(4, np.int32))


def test_an_engine_with_staged_inputs_gives_the_same_tokens(make_engine):
    eng = make_engine("llama", max_num_batched_tokens=32)
    rng = np.random.default_rng(2)
    items = [(rng.integers(5, 500, n).tolist(), sp) for n, sp in (
        (50, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)),   # chunked
        (7, SamplingParams(temperature=0.9, seed=3, max_tokens=10, ignore_eos=True)),
        (12, SamplingParams(temperature=0.7, seed=1, repetition_penalty=1.2, max_tokens=9,
                            ignore_eos=True, logprobs=2)))]

    def summary():
        return [[(c.token_ids, None if c.logprobs is None else
                  [sorted((k, round(v.logprob, 4)) for k, v in d.items()) for d in c.logprobs])
                 for c in o.outputs] for o in run_engine(eng, items)]

    before = summary()
    stage_inputs(eng.runner)
    assert eng.runner.staged_inputs is not None
    assert summary() == before
