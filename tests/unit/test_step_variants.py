"""StepVariants: which token bucket and compiled step a plan runs in (no model, no compile)."""

import pytest

from jserve.config import SchedulerConfig
from jserve.sampling_params import SamplingParams
from jserve.step_program import StepVariant
from jserve.step_variants import StepVariants, decode_buckets, greedy_rows

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=0.8)


def never() -> bool:
    raise AssertionError("filters asked where they cannot matter")


def test_decode_buckets():
    assert decode_buckets((16, 32, 64, 128), 64) == {16, 32, 64}
    assert decode_buckets((16, 32, 64), 8) == {16}
    assert decode_buckets((64,), 64) == {64}


def test_buckets_and_variants():
    v = StepVariants(SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=128))
    assert v.buckets == (16, 32, 64, 128) and v.decode == {16, 32}
    assert v.smallest(17) == 32
    assert v.bucket(17, lambda: False) == 32
    assert v.bucket(17, lambda: True) == 64       # a batch with filters: the general sampler
    assert v.bucket(70, never) == 128
    with pytest.raises(ValueError, match="exceeds max_num_batched_tokens"):
        v.smallest(129)
    assert v.choose(16, False, False, True, [GREEDY], never) == StepVariant(16, False, True, True)
    assert v.choose(16, False, False, False, [GREEDY], never) == StepVariant(16, False, True)
    assert v.choose(32, False, True, True, [GREEDY], never) == StepVariant(32, False, False, plain=True)
    assert v.choose(32, False, False, True, [SAMPLED], never) == StepVariant(32, False, False, plain=True)
    assert v.choose(64, False, False, True, [SAMPLED], never) == StepVariant(64, False, False)
    logprobs = SamplingParams(temperature=0.0, logprobs=1)
    assert not greedy_rows([GREEDY, logprobs]) and greedy_rows([GREEDY])
    assert set(v.all()) >= {v.choose(t, False, False, True, [p], lambda: False)
                            for t in v.buckets for p in (GREEDY, SAMPLED)}


def test_largest_decode_bucket_keeps_the_general_sampler():
    """When the budget is one decode bucket, a batch with filters has nowhere to move: that
    bucket compiles both samplers."""
    v = StepVariants(SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=16))
    assert v.bucket(16, lambda: True) == 16
    assert v.choose(16, False, False, True, [SAMPLED], lambda: True) == StepVariant(16, False, False)
    assert v.choose(16, False, False, True, [SAMPLED], lambda: False) == StepVariant(16, False, False,
                                                                                      plain=True)
    assert {StepVariant(16, False, False), StepVariant(16, False, False, plain=True)} <= set(v.all())
