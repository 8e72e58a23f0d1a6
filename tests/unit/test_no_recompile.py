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


def test_flash_variant_and_swap_trigger_no_compile(make_engine):
    """The flash-prefill variant and swap preemption (page moves to host and back) run only
    what warm-up compiled."""
    engine = make_engine("llama", num_pages=13, flash_prefill_min_tokens=16,
                         enable_prefix_caching=False)
    calls = {}
    for key, fn in list(engine.runner._compiled.items()):
        def counted(*a, _fn=fn, _key=key):
            calls[_key] = calls.get(_key, 0) + 1
            return _fn(*a)
        engine.runner._compiled[key] = counted
    rng = np.random.default_rng(5)
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    with CompileCounter() as counter:
        for n in (20, 33, 18, 41):
            engine.add_request(None, rng.integers(3, 400, n).tolist(), sp)
        while engine.has_unfinished_requests():
            engine.step()
    assert counter.count == 0, f"{counter.count} compilations while serving"
    assert any(v.fresh_prefill for v in calls), "no step took the flash variant"
    assert engine.kv_cache_stats()["preemptions_swap"] > 0, "no request was swapped"
