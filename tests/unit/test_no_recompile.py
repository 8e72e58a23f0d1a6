"""DESIGN invariant 4: after warm-up, serving triggers no compilation."""

import numpy as np
from engine_helpers import CompileCounter

from jserve.sampling_params import SamplingParams


def test_serving_triggers_no_compile(make_engine):
    engine = make_engine("qwen2")
    with CompileCounter() as counter:
        rng = np.random.default_rng(0)
        params = [
            SamplingParams(temperature=0.0, max_tokens=9),
            SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_tokens=7),
            SamplingParams(temperature=1.0, top_k=5, max_tokens=5, logprobs=3),
            SamplingParams(temperature=0.7, repetition_penalty=1.2, presence_penalty=0.5,
                           max_tokens=6),
            SamplingParams(temperature=0.0, min_tokens=3, max_tokens=4, n=2),
        ]
        for i in range(12):
            engine.add_request(None, rng.integers(3, 400, 1 + 5 * i).tolist(), params[i % 5])
        while engine.has_unfinished_requests():
            engine.step()
    assert counter.count == 0, f"{counter.count} compilations while serving"
