"""The step-cost probes in benchmarks/ (step_floor.py, cmdbuf_probe.py) call the compiled decode
step directly, outside the runner, so a change of the step's arguments breaks them silently
until the next GPU run. Run each once on the tiny llama fixture (one engine, CPU)."""

import numpy as np
import pytest
from fixture_paths import GOLDEN

from benchmarks import cmdbuf_probe, step_floor
from jserve.builder import EngineArgs, build_engine


@pytest.fixture(scope="module")
def engine():
    return build_engine(EngineArgs(model=str(GOLDEN / "llama"), dtype="float32", max_model_len=64,
                                   max_num_seqs=4, max_num_batched_tokens=16, num_pages=32))


def test_step_floor_calls_the_decode_step(engine):
    ms, host_ms, idle_ms, kernels = step_floor.floor_a(engine, n=2, context=20)
    assert ms > 0 and host_ms > 0 and idle_ms > 0 and kernels >= 0
    assert np.asarray(engine.runner._prev_tokens).shape[0] >= 1


def test_cmdbuf_probe_calls_the_decode_step(engine):
    r = engine.runner
    step = r._compiled[(r.bucket_for(1)[0], False, True, True)]
    assert cmdbuf_probe.idle_call_ms(engine, step, in_place=True, n=1, context=20) > 0
    assert cmdbuf_probe.idle_call_ms(engine, step, in_place=False, n=1, context=20) > 0
