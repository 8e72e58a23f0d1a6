"""DESIGN invariant 5: greedy tokens are the same alone, batched, chunk-prefilled and preempted."""

import numpy as np
import pytest
from engine_helpers import run_engine, run_tokens

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


def test_plain_and_general_samplers_agree(make_engine):
    """A sampled request (penalties, logprobs) decodes in the plain sampler's variant alone
    (no conditional) and in the general one beside a top-p request (a batch with filters moves
    to a bucket with the general sampler): the same tokens and logprobs."""
    engine = make_engine("llama")
    used = []
    for key, fn in list(engine.runner._compiled.items()):
        def counted(*a, _fn=fn, _key=key):
            used.append(_key)
            return _fn(*a)
        engine.runner._compiled[key] = counted
    prompt = _prompts(engine.config.model.vocab_size)[2]
    sp = SamplingParams(temperature=0.05, seed=3, max_tokens=10, ignore_eos=True, logprobs=2,
                        presence_penalty=2.0, frequency_penalty=1.0)
    top_p = SamplingParams(temperature=0.9, top_p=0.7, seed=4, max_tokens=10, ignore_eos=True)
    alone = run_engine(engine, [(prompt, sp)])[0].outputs[0]
    plain = {v for v in used if v.plain}
    assert plain, "the sampled decode steps did not take the plain sampler"
    used.clear()
    batched = run_engine(engine, [(prompt, sp), (prompt[:5], top_p)])[0].outputs[0]
    assert not any(v.plain for v in used) and any(v.tokens > min(v.tokens for v in plain) for v in used)
    assert batched.token_ids == alone.token_ids
    def chosen(out):
        return [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids, strict=True)]

    np.testing.assert_allclose(chosen(batched), chosen(alone), rtol=1e-5, atol=1e-5)
