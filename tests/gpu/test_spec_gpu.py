"""Speculative decoding on a GPU (skipped without one): greedy output with n-gram and with
draft-model speculation equals the engine without it, on all three fixture architectures
(each its own draft: acceptance is then near 1), and serving never
compiles."""

import numpy as np
import pytest
from engine_helpers import CompileCounter, run_tokens
from fixture_paths import ARCHS, GOLDEN

from jserve.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


def _prompts():
    rng = np.random.default_rng(1)
    motif = rng.integers(5, 500, 8).tolist()
    return [motif * 5, rng.integers(5, 500, 90).tolist(), rng.integers(5, 500, 6).tolist()]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_speculative_greedy_matches_on_gpu(make_engine, arch, method):
    cfg = {"method": method, "num_speculative_tokens": 4}
    cfg.update({"prompt_lookup_min": 1} if method == "ngram" else {"model": str(GOLDEN / arch)})
    base = make_engine(arch)
    spec = make_engine(arch, speculative_config=cfg)
    assert next(iter(spec.runner.kv[0][0].devices())).platform == "gpu"
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    with CompileCounter() as c:
        got = run_tokens(spec, _prompts(), sp)
    assert c.count == 0
    assert got == run_tokens(base, _prompts(), sp)
    assert spec.kv_cache_stats()["spec_decode_num_accepted_tokens"] > 0
