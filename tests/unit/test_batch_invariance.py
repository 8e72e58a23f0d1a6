"""DESIGN invariant 5: greedy tokens are the same alone, batched, chunk-prefilled and preempted."""

import numpy as np
import pytest
from engine_helpers import run_tokens

from jserve.sampling_params import SamplingParams

LENGTHS = (3, 9, 17, 24, 33, 40, 51, 60)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts(vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [rng.integers(5, vocab, n).tolist() for n in LENGTHS]


def _run(engine, prompts):
    return run_tokens(engine, prompts, GREEDY)


@pytest.fixture(scope="module")
def alone(make_engine):
    engine = make_engine("llama")
    prompts = _prompts(engine.config.model.vocab_size)
    return prompts, [_run(engine, [p])[0] for p in prompts]


def test_batched_equals_alone(make_engine, alone):
    prompts, ref = alone
    engine = make_engine("llama")
    assert _run(engine, prompts) == ref


def test_chunked_prefill_equals_alone(make_engine, alone):
    prompts, ref = alone
    # A budget of 16 tokens forces every prompt longer than that into several chunks.
    engine = make_engine("llama", max_num_batched_tokens=16, max_num_seqs=4)
    assert _run(engine, prompts) == ref


def test_preemption_equals_alone(make_engine, alone):
    prompts, ref = alone
    # 12 usable pages of 16 tokens: the 8 prompts (+12 new tokens each) cannot all fit.
    engine = make_engine("llama", num_pages=13)
    outs = _run(engine, prompts)
    assert engine.scheduler.num_preemptions_total > 0
    assert outs == ref
    assert engine.pool.num_free == engine.pool.num_total
