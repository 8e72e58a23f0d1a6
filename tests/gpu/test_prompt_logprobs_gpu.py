"""prompt_logprobs on a GPU (the scorer's flash-attention prefill at small and large buckets)
agree with the logprobs the step's sampler reports for the same positions (skipped without a
GPU)."""

import pytest
from engine_helpers import run_engine
from fixture_paths import ARCHS

from jserve.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("prompt_len", [5, 70])
def test_prompt_logprobs_match_sampled_logprobs_on_gpu(make_engine, arch, prompt_len):
    engine = make_engine(arch)
    prompt = [3 + (7 * i) % 50 for i in range(prompt_len)]
    (gen,) = run_engine(engine, [(prompt, SamplingParams(temperature=0.0, max_tokens=3, logprobs=1,
                                                         ignore_eos=True))])
    comp = gen.outputs[0]
    (scored,) = run_engine(engine, [(prompt + comp.token_ids[:2],
                                     SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1))])
    plp = scored.prompt_logprobs
    assert plp[0] is None and len(plp) == prompt_len + 2
    for k in range(2):
        tid = comp.token_ids[k]
        assert plp[prompt_len + k][tid].logprob == pytest.approx(comp.logprobs[k][tid].logprob, abs=2e-3)
        assert plp[prompt_len + k][tid].rank == 1
