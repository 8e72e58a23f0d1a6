"""Steps made only of fresh prompts attend with flash attention over the chunk's own K/V
(``flash_prefill_min_tokens``): same greedy tokens as HF, the paged path for everything else
(decodes, later chunks, prefix-cache hits), and no compile while serving."""

import numpy as np
import pytest
from engine_helpers import CompileCounter, run_engine, run_tokens
from fixture_paths import ARCHS, GOLDEN

from jserve.config import SchedulerConfig
from jserve.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


class CountingStep:
    """Wraps a compiled step and counts its calls (the runner picks one per step on the host)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


class Tally:
    def __init__(self, steps):
        self.steps = steps

    @property
    def calls(self):
        return sum(s.calls for s in self.steps)


def count_steps(engine):
    """-> (paged, flash) call tallies over every compiled bucket of the runner."""
    r = engine.runner
    r._compiled = {k: CountingStep(v) for k, v in r._compiled.items()}
    return (Tally([v for k, v in r._compiled.items() if not k.fresh_prefill]),
            Tally([v for k, v in r._compiled.items() if k.fresh_prefill]))


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_prompt_steps_use_flash_and_match_hf(make_engine, arch):
    z = np.load(GOLDEN / arch / "reference.npz")
    prompts = [z["prompts"][i, :n].tolist() for i, n in enumerate(z["prompt_lens"])]
    engine = make_engine(arch, flash_prefill_min_tokens=16, enable_prefix_caching=False)
    paged, fresh = count_steps(engine)
    with CompileCounter() as counter:
        outs = run_tokens(engine, prompts, GREEDY)
    for i, tokens in enumerate(outs):
        assert tokens == z[f"greedy_{i}"].tolist(), f"{arch} prompt {i}"
    assert fresh.calls >= 1 and paged.calls >= 31  # the prompts' step, then the decodes
    assert counter.count == 0, f"{counter.count} compilations while serving"


def test_chunked_and_cached_prompts_take_the_paged_path(make_engine):
    engine = make_engine("llama", flash_prefill_min_tokens=16, max_num_batched_tokens=32)
    paged, fresh = count_steps(engine)
    rng = np.random.default_rng(3)
    long_prompt = rng.integers(5, 512, 70).tolist()  # 3 chunks of <= 32: only the first is fresh
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    (first,) = run_engine(engine, [(long_prompt, sp)])
    assert fresh.calls == 1
    (again,) = run_engine(engine, [(long_prompt, sp)])  # 64 tokens from the prefix cache
    assert again.num_cached_tokens == 64 and fresh.calls == 1
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    reference = make_engine("llama", flash_prefill_min_tokens=0, max_num_batched_tokens=32)
    paged_ref, fresh_ref = count_steps(reference)
    (ref,) = run_engine(reference, [(long_prompt, sp)])
    assert fresh_ref.calls == 0 and ref.outputs[0].token_ids == first.outputs[0].token_ids


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_flash_prefill_min_tokens_is_validated(value):
    with pytest.raises(ValueError, match="flash_prefill_min_tokens"):
        SchedulerConfig(flash_prefill_min_tokens=value)


def test_flash_buckets():
    cfg = SchedulerConfig(max_num_batched_tokens=2048, flash_prefill_min_tokens=1024)
    assert [b for b in cfg.token_buckets if cfg.flash_prefill(b)] == [1024, 2048]
    off = SchedulerConfig(max_num_batched_tokens=2048, flash_prefill_min_tokens=0)
    assert not any(off.flash_prefill(b) for b in off.token_buckets)
