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
    cfg = {"method": method, "num_speculative_tokens": 4, "disable_by_batch_size": None}
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


def test_sampled_self_draft_and_grammar_masks_on_gpu(make_engine):
    """Random rows sample their drafts from q and verify with min(1, p/q): a draft that is the
    target is accepted almost always; grammar rows verified per position stay valid and match
    the engine without speculation (greedy)."""
    import re

    from engine_helpers import run_engine

    draft = {"method": "draft_model", "model": str(GOLDEN / "llama"), "num_speculative_tokens": 4,
             "disable_by_batch_size": None}
    spec = make_engine("llama", speculative_config=draft)
    base = make_engine("llama")
    s0 = dict(spec.kv_cache_stats())
    with CompileCounter() as c:
        run_tokens(spec, _prompts(), SamplingParams(temperature=1.0, seed=1, max_tokens=40,
                                                    ignore_eos=True))
    assert c.count == 0
    s = spec.kv_cache_stats()
    drafted = s["spec_decode_num_draft_tokens"] - s0["spec_decode_num_draft_tokens"]
    accepted = s["spec_decode_num_accepted_tokens"] - s0["spec_decode_num_accepted_tokens"]
    assert drafted > 0 and accepted >= 0.95 * drafted, (accepted, drafted)
    pat = r"(ab|cd){2,6}x"
    items = [(p, SamplingParams(temperature=0.0, max_tokens=30, structured_outputs={"regex": pat}))
             for p in ("x", "hello", "def f():")]
    got = [o.outputs[0].text for o in run_engine(spec, items)]
    assert got == [o.outputs[0].text for o in run_engine(base, items)]
    assert all(re.fullmatch(pat, t) for t in got), got


@pytest.mark.parametrize("method", ["draft_model", "ngram"])
def test_chained_rows_equal_the_synchronous_loop_on_gpu(xla_cache_dir, method):
    """The bundled pair (a draft right about half the time, so rows move by every count from 0
    to K), and n-gram lookup on the device: the overlapped loop's chained rows
    (jserve/spec/chain.py) give the synchronous loop's tokens for greedy and seeded random
    rows, at the default memory share (the speculative step once copied a draft pool layer
    there and ran out of memory at start-up, session 13)."""
    from jserve.builder import EngineArgs, build_engine

    spec = ({"method": "draft_model", "model": "code-draft", "num_speculative_tokens": 4}
            if method == "draft_model" else
            {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
             "prompt_lookup_max": 3})
    args = dict(model="code-small", max_num_seqs=4, max_num_batched_tokens=64, max_model_len=512,
                compilation_cache_dir=xla_cache_dir, speculative_config=spec)
    engine = build_engine(EngineArgs(**args))
    prompts = ["def fibonacci(n):\n", "import os\nimport sys\n\ndef main():\n",
               "class Stack:\n    def __init__(self):\n"]
    sps = [SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True),
           SamplingParams(temperature=1.0, seed=3, max_tokens=64, ignore_eos=True),
           SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=64, ignore_eos=True)]
    from engine_helpers import run_engine

    items = list(zip(prompts, sps, strict=True))
    with CompileCounter() as c:
        overlapped = [o.outputs[0].token_ids for o in run_engine(engine, items)]
    assert c.count == 0
    engine._overlap = False   # the async_scheduling option on the same engine (test only)
    sync = [o.outputs[0].token_ids for o in run_engine(engine, items)]
    assert overlapped == sync
    assert engine.kv_cache_stats()["spec_decode_num_accepted_tokens"] > 0
    assert engine.scheduler.kv.pool.num_used == 0
