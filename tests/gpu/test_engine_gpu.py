"""The engine on a GPU: golden greedy tokens and bf16 serving (skipped without a GPU)."""

import numpy as np
import pytest
from engine_helpers import run_tokens
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
    for i, tokens in enumerate(run_tokens(engine, prompts, sp)):
        assert tokens == z[f"greedy_{i}"].tolist()


def test_bf16_engine_serves(make_engine):
    engine = make_engine("qwen2", dtype="bfloat16")
    sp = SamplingParams(temperature=0.8, top_p=0.9, seed=0, max_tokens=16, ignore_eos=True)
    (tokens,) = run_tokens(engine, [[3, 4, 5, 6]], sp)
    assert len(tokens) == 16


@pytest.mark.parametrize("arch", ARCHS)
def test_golden_greedy_with_flash_prefill_on_gpu(make_engine, arch):
    """Fresh-prompt steps through the Triton flash kernel inside the engine."""
    z = np.load(GOLDEN / arch / "reference.npz")
    prompts = [z["prompts"][i, :n].tolist() for i, n in enumerate(z["prompt_lens"])]
    engine = make_engine(arch, flash_prefill_min_tokens=16, enable_prefix_caching=False)
    sp = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for i, tokens in enumerate(run_tokens(engine, prompts, sp)):
        assert tokens == z[f"greedy_{i}"].tolist()


def test_large_steps_use_kernels_and_match_small_steps(make_engine):
    """1024-token steps (Pallas KV write + flash) give the greedy tokens of 128-token steps."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 512, 120).tolist() for _ in range(8)]
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    big = make_engine("llama", max_model_len=256, max_num_batched_tokens=1024, num_pages=160,
                      flash_prefill_min_tokens=1024, enable_prefix_caching=False)
    small = make_engine("llama", max_model_len=256, max_num_batched_tokens=128, num_pages=160,
                        flash_prefill_min_tokens=0, enable_prefix_caching=False)
    assert run_tokens(big, prompts, sp) == run_tokens(small, prompts, sp)
