"""The engine on a GPU: golden greedy tokens and bf16 serving (skipped without a GPU)."""

import numpy as np
import pytest
from fixture_paths import ARCHS, GOLDEN

from jserve.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ARCHS)
def test_golden_greedy_on_gpu(make_engine, arch):
    z = np.load(GOLDEN / arch / "reference.npz")
    prompts = [z["prompts"][i, :n].tolist() for i, n in enumerate(z["prompt_lens"])]
    engine = make_engine(arch)
    assert next(iter(engine.runner.kv[0][0].devices())).platform == "gpu"
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    ids = [engine.add_request(None, p, sp) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    for i, rid in enumerate(ids):
        assert done[rid] == z[f"greedy_{i}"].tolist()


def test_bf16_engine_serves(make_engine):
    engine = make_engine("qwen2", dtype="bfloat16")
    sp = SamplingParams(temperature=0.8, top_p=0.9, seed=0, max_tokens=16, ignore_eos=True)
    rid = engine.add_request(None, [3, 4, 5, 6], sp)
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == rid and o.finished:
                out = o
    assert out is not None and len(out.outputs[0].token_ids) == 16
