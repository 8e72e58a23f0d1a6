"""The decode step's twin executables on a GPU (jserve/host_outputs.py, an A/B; skipped without one):
each takes every other step on one donated buffer of its own, written in place while the
previous step's tokens are still on their way to the host, and the tokens stay golden."""

import numpy as np
import pytest
from engine_helpers import assert_twins_in_turn_in_place, recording, run_tokens
from fixture_paths import GOLDEN

from jserve import host_outputs
from jserve.sampling_params import SamplingParams
from jserve.step_program import StepVariant

pytestmark = pytest.mark.gpu


def test_twins_write_their_own_buffers_in_place_and_keep_the_golden_tokens(make_engine, monkeypatch):
    z = np.load(GOLDEN / "llama" / "reference.npz")
    prompts = [z["prompts"][i, :n].tolist() for i, n in enumerate(z["prompt_lens"])]
    monkeypatch.setattr(host_outputs, "TWIN_MAX_TOKENS", 256)   # (an A/B, off by default)
    engine = make_engine("llama")
    r = engine.runner
    step = r._compiled[StepVariant(r.bucket_for(1)[0], False, True, True)]
    assert len(step.executables) == 2   # a twin on a GPU
    seen: list = []
    step.executables = recording(step.executables, seen)
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, tokens in enumerate(run_tokens(engine, prompts, sp)):
        assert tokens == z[f"greedy_{i}"].tolist()
    assert_twins_in_turn_in_place(seen)
