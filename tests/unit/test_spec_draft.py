"""Speculative decoding with a draft model (jserve/spec/draft.py).

The draft runs inside the speculative step over the same rows as the target (twin KV pages) and
proposes K drafts after verification (greedy rows: its argmax; random rows: samples of its q,
verified with min(1, p/q)). Greedy output is token-identical to the target
alone; a draft that IS the target is accepted almost always, across prefix hits, chunked
prefill, n > 1 and swap preemption (its K/V follows the target's pages); the bundled
``code-small`` + ``code-draft`` pair works out of the box through ``LLM(...)``; bad drafts
fail at start-up naming ``speculative_config.model``.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from engine_helpers import CompileCounter, assert_greedy_spec_variants_lean, run_engine
from fixture_paths import GOLDEN

from jserve.builder import EngineArgs, build_engine
from jserve.cli import build_parser, engine_args_from
from jserve.sampling_params import SamplingParams


def _draft(model, k=3):
    return {"method": "draft_model", "model": str(model), "num_speculative_tokens": k,
            "disable_by_batch_size": None}


def _greedy(max_tokens=30, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _tokens(engine, items):
    return [[c.token_ids for c in o.outputs] for o in run_engine(engine, items)]


def test_self_draft_is_accepted_and_tokens_match_through_preemption(make_engine):
    """A pool of 24 pages for 8 requests of ~90 tokens: preempted by swap between steps; the
    draft (the target's own weights) keeps its K/V through the moves and prefix hits."""
    base = make_engine("llama", async_scheduling=False)
    eng = make_engine("llama", num_pages=24, swap_space_gb=0.001, speculative_config=_draft(GOLDEN / "llama"))
    rng = np.random.default_rng(5)
    long_prompt = rng.integers(5, 500, 70).tolist()          # chunked (budget 64)
    items = [(rng.integers(5, 500, 40).tolist(), _greedy(50)) for _ in range(6)]
    items += [(long_prompt, _greedy(20, n=2)), (long_prompt + [9], _greedy(20))]  # prefix hit
    with CompileCounter() as c:
        got = _tokens(eng, items)
    assert got == _tokens(base, items)
    assert c.count == 0
    s = eng.kv_cache_stats()
    assert s["preemptions_swap"] > 0 and s["prefix_cache_hits_device"] > 0
    assert s["spec_decode_num_accepted_tokens"] >= 0.9 * s["spec_decode_num_draft_tokens"] > 0
    # A row that accepted every draft proposes K - 1 (its emitted token has no place in the
    # draft's forward over the step), the next row K again: between K - 1 and K per verify row.
    rows = s["spec_decode_num_drafts"]
    assert 2 * rows < s["spec_decode_num_draft_tokens"] < 3 * rows
    assert_greedy_spec_variants_lean(eng)   # the draft's loop, unrolled: no conditional either
    assert eng.scheduler.kv.pool.num_used == 0


def test_one_row_engine_pads_the_draft_decodes(monkeypatch, make_engine):
    """max_num_seqs 1: the draft's decodes run two rows, the second idle (one row would make
    every matrix-vector product XLA's multiply + reduce on the GPU); greedy tokens equal the
    target alone's, and a self-draft is still accepted."""
    import jax

    from jserve.spec import draft

    rows = set()
    forward = draft.hidden_states

    def record(cfg, params, kv, batch, **kw):
        if kw.get("decode_only") and batch.decode_rows == 1:   # the decodes (not the first forward)
            rows.add(batch.token_ids.shape[0])
        return forward(cfg, params, kv, batch, **kw)

    monkeypatch.setattr(draft, "hidden_states", record)
    jax.clear_caches()   # (other tests' engines traced the same step)
    base = make_engine("llama", max_num_seqs=1, async_scheduling=False)
    eng = make_engine("llama", max_num_seqs=1, speculative_config=_draft(GOLDEN / "llama"))
    assert rows == {2}
    rng = np.random.default_rng(8)
    items = [(rng.integers(5, 500, n).tolist(), _greedy(24)) for n in (12, 30)]
    assert _tokens(eng, items) == _tokens(base, items)
    s = eng.kv_cache_stats()
    assert s["spec_decode_num_accepted_tokens"] >= 0.9 * s["spec_decode_num_draft_tokens"] > 0


def test_sampled_self_draft_is_accepted_and_reproducible(make_engine):
    """Random rows sample their drafts from the draft's q and verify with min(1, p/q): a draft
    that IS the target has q == p, so (almost) every draft is accepted at temperature 1 (as
    point masses they would be accepted with probability p(d) only, near 1/V on this random
    model). Seeded rows reproduce, alone or batched with greedy rows, and preemption keeps it."""
    eng = make_engine("llama", num_pages=24, swap_space_gb=0.001,
                      speculative_config=_draft(GOLDEN / "llama"))
    rng = np.random.default_rng(6)
    prompts = [rng.integers(5, 500, n).tolist() for n in (9, 20, 13)]
    sp = [SamplingParams(temperature=1.0, seed=i, max_tokens=24, ignore_eos=True) for i in range(2)]
    sp.append(SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7, max_tokens=24,
                             ignore_eos=True))
    before = dict(eng.kv_cache_stats())
    first = _tokens(eng, list(zip(prompts, sp, strict=True)))
    s = eng.kv_cache_stats()
    drafted = s["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
    accepted = s["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
    assert drafted > 0 and accepted >= 0.95 * drafted, (accepted, drafted)
    alone = _tokens(eng, [(prompts[2], sp[2])])
    assert alone[0] == first[2]
    assert _tokens(eng, [(prompts[0], _greedy(10)), (prompts[2], sp[2])])[1] == first[2]
    # through swap preemptions (a resumed request takes another runner slot; its drafts and
    # their q then come from its first row there): still accepted
    before = dict(eng.kv_cache_stats())
    items = [(rng.integers(5, 500, 40).tolist(),
              SamplingParams(temperature=1.0, seed=10 + i, max_tokens=50, ignore_eos=True))
             for i in range(6)]
    _tokens(eng, items)
    s = {k: v - before.get(k, 0) for k, v in eng.kv_cache_stats().items()}
    assert s["preemptions_swap"] > 0
    assert s["spec_decode_num_accepted_tokens"] >= 0.95 * s["spec_decode_num_draft_tokens"] > 0
    assert eng.scheduler.kv.pool.num_used == 0


def test_bundled_pair_through_llm(xla_cache_dir):
    from jserve.llm import LLM

    common = dict(max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32,
                  compilation_cache_dir=xla_cache_dir)
    base = build_engine(EngineArgs(**common, async_scheduling=False))
    llm = LLM(**common, speculative_config={"method": "draft_model", "model": "code-draft",
                                            "num_speculative_tokens": 4})
    prompts = ["def fibonacci(n):", "import os\n\n\ndef list_files(path):\n    "]
    sp = _greedy(40)
    outs = llm.generate(prompts, sp)
    ref = run_engine(base, [(p, sp) for p in prompts])
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
    assert [o.outputs[0].text for o in outs] == [o.outputs[0].text for o in ref]
    m = outs[0].metrics
    assert m["spec_num_draft_tokens"] > 0 and m["spec_num_accepted_tokens"] > 0
    # seeded sampling with the draft: reproducible
    rnd = SamplingParams(temperature=0.8, top_p=0.95, seed=3, max_tokens=24)
    assert llm.generate(prompts[:1], rnd)[0].outputs[0].token_ids == \
        llm.generate(prompts[:1], rnd)[0].outputs[0].token_ids


def test_cli_flag_reaches_the_engine_args():
    ns = build_parser().parse_args(["generate", "--speculative-config",
                                    '{"method": "draft_model", "model": "code-draft", '
                                    '"num_speculative_tokens": 4}'])
    assert engine_args_from(ns).speculative_config == (   # the measured default filled in
        '{"disable_by_batch_size": 4, "method": "draft_model", "model": "code-draft", '
        '"num_speculative_tokens": 4}')
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--speculative-config", '{"method": "eagle"}'])


def test_bad_drafts_fail_at_start_up_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"speculative_config.model.*vocab_size \(8192\)"):
        build_engine(EngineArgs(model=str(GOLDEN / "llama"), dtype="float32", max_model_len=64,
                                num_pages=8, speculative_config=_draft("code-draft")))
    other = tmp_path / "other_tokenizer"
    shutil.copytree(GOLDEN / "llama", other)
    tok = other / "tokenizer.json"
    tok.write_text(tok.read_text() + " ")
    with pytest.raises(ValueError, match="speculative_config.model: the draft's tokenizer"):
        build_engine(EngineArgs(model=str(GOLDEN / "llama"), dtype="float32", max_model_len=64,
                                num_pages=8, speculative_config=_draft(other)))
    with pytest.raises(ValueError, match="speculative_config.model: 'nowhere'"):
        build_engine(EngineArgs(model=str(GOLDEN / "llama"), dtype="float32", max_model_len=64,
                                num_pages=8, speculative_config=_draft("nowhere")))


def test_plan_counts_the_draft_weights_and_twin_pages():
    """``jserve plan --speculative-config`` with the bundled pair: the planner's pool equals
    start-up's (plan_pool with the draft), and the draft's weights and KV bytes are in it."""
    from jserve.builder import make_engine_config, memory_budget, plan_pool, resolve_model
    from jserve.model.params import load_params, params_bytes
    from jserve.plan import plan_capacity
    from jserve.spec.draft import resolve_draft
    from sharding import make_mesh

    class _Device:
        platform = "tpu"   # reports its whole memory: usable = gpu_memory_utilization of it

        def memory_stats(self):
            return {"bytes_limit": 96 * 2**20, "bytes_in_use": 0}

    spec = {"method": "draft_model", "model": "code-draft", "num_speculative_tokens": 4}
    args = EngineArgs(model=None, max_model_len=512, gpu_memory_utilization=0.5,
                      activation_memory_bytes=2**20, speculative_config=spec)
    cfg, model_dir = resolve_model(args)
    config = make_engine_config(args, cfg)
    dcfg, ddir = resolve_draft(config.speculative, cfg, model_dir.path, cfg.dtype)
    mesh = make_mesh(1)
    weights = params_bytes(load_params(model_dir, cfg, mesh)) + params_bytes(load_params(ddir, dcfg, mesh))
    startup = plan_pool(config, memory_budget(config, weights, _Device(), lambda: 1 / 0), dcfg)
    plan = plan_capacity(None, gpu=48 * 2**20, max_model_len=512, activation_memory_bytes=2**20,
                         speculative_config=spec)
    # (no token-automaton table alone either: a speculative engine has none)
    alone = plan_capacity(None, gpu=48 * 2**20, max_model_len=512, activation_memory_bytes=2**20,
                          grammar_device_states=0)
    assert plan.weight_bytes_per_device == weights and plan.pool == startup
    assert plan.pool.num_pages < alone.pool.num_pages
    assert plan.kv_bytes_per_token == alone.kv_bytes_per_token + plan.draft_kv_bytes_per_token
    assert "draft      LlamaForCausalLM: 2 layers" in plan.render()


def test_tensor_parallel_draft_model(make_engine):
    """tp=2 (two CPU devices): target and draft pools sharded over kv heads; tokens match tp=1."""
    base = make_engine("llama", async_scheduling=False)
    eng = make_engine("llama", tensor_parallel_size=2, speculative_config=_draft(GOLDEN / "llama"))
    rng = np.random.default_rng(8)
    items = [(rng.integers(5, 500, n).tolist(), _greedy(24)) for n in (5, 33)]
    assert _tokens(eng, items) == _tokens(base, items)
    s = eng.kv_cache_stats()
    assert s["spec_decode_num_accepted_tokens"] >= 0.9 * s["spec_decode_num_draft_tokens"] > 0


def test_a_pausing_draft_model_catches_up_while_speculation_is_off(make_engine):
    """disable_by_batch_size=1: while a second request runs, steps take the target's ordinary
    program and the draft's catch-up (its forward over the step's tokens, no proposals); when
    speculation resumes the draft's pool holds every token, so a draft that IS the target is
    accepted throughout (without the catch-up, ~9%). Tokens equal the target alone, with the
    second request arriving while the first speculates (a shifted row in an off plan)."""
    base = make_engine("llama")
    eng = make_engine("llama", speculative_config={**_draft(GOLDEN / "llama"), "disable_by_batch_size": 1})
    steps = eng.runner.spec_steps
    assert not steps.every_step and sorted(steps._catch_up) == [16, 32, 64]
    off, catch_up = [], steps.catch_up
    steps.catch_up = lambda *a: off.append(1) or catch_up(*a)
    first, second = [5, 6, 7, 8, 9] * 6, [11, 12, 13] * 3

    def run(engine, late):
        engine.add_request("a", first, _greedy(max_tokens=60))
        got, step = {}, 0
        while engine.has_unfinished_requests():
            step += 1
            if step == late:
                engine.add_request("b", second, _greedy(max_tokens=12))
            for o in engine.step():
                if o.finished:
                    got[o.request_id] = o.outputs[0].token_ids
        return got

    try:
        for late in (3, 8):
            before = eng.kv_cache_stats()
            assert run(eng, late) == run(base, late), late
            after = eng.kv_cache_stats()
            drafted = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
            accepted = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
            assert drafted > 0 and accepted >= 0.9 * drafted, (late, drafted, accepted)
    finally:
        del steps.catch_up
    assert off   # steps without speculation ran the catch-up


def test_requests_admitted_at_load_never_draft_and_skip_the_catch_up(make_engine):
    """disable_by_batch_size=1 with a draft model (vLLM's rule): three requests queued at once
    are admitted above the load, never draft, and the draft's catch-up skips all their steps,
    prompt chunks included; their pages are prefix-cached apart, so a request arriving alone
    afterwards (it drafts) finds no hit on them and computes its prompt with the draft, and a
    second one hits its pages and finds the draft's K/V there (a self-draft is accepted).
    Tokens equal the target alone."""
    base = make_engine("llama")
    eng = make_engine("llama", speculative_config={**_draft(GOLDEN / "llama"), "disable_by_batch_size": 1})
    steps = eng.runner.spec_steps
    calls, catch_up, verified, dispatch = [], steps.catch_up, [], steps.dispatch
    steps.catch_up = lambda *a: calls.append(1) or catch_up(*a)
    steps.dispatch = lambda *a: verified.append(1) or dispatch(*a)
    shared = [5, 6, 7, 8, 9, 10, 11, 12] * 4   # two full pages of 16 shared by every prompt

    def run(engine, prompts):
        for rid, (tail, n) in prompts.items():
            engine.add_request(rid, shared + tail, _greedy(max_tokens=n))
        got, n = {}, 0
        while engine.has_unfinished_requests():
            n += 1
            got.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
            sched = engine.scheduler   # requests that never draft hold no lookahead pages
            for r in sched.running:
                if r.no_draft:
                    assert len(r.page_ids) == sched.pool.pages_needed(r.num_computed_tokens), r.request_id
        return got, n

    try:
        busy = {"a": ([20, 21], 24), "b": ([22, 23, 24], 10), "c": ([25], 6)}   # a runs alone last
        got, n = run(eng, busy)
        assert got == run(base, busy)[0]
        stats = eng.kv_cache_stats()
        assert stats["spec_decode_num_draft_tokens"] == 0 and n >= 20 and not calls, (n, calls)
        assert not verified   # no speculative step while none of the running may draft (a alone)
        alone = {"d": ([26, 27], 24)}
        assert run(eng, alone)[0] == run(base, alone)[0]
        after = eng.kv_cache_stats()
        assert after["prefix_cache_hits_device"] == stats["prefix_cache_hits_device"]   # apart
        drafted, accepted = after["spec_decode_num_draft_tokens"], after["spec_decode_num_accepted_tokens"]
        assert drafted > 0 and accepted >= 0.9 * drafted, (drafted, accepted)
        again = {"e": ([28, 29], 24)}   # shares d's prompt pages, which hold the draft's K/V
        assert run(eng, again)[0] == run(base, again)[0]
        last = eng.kv_cache_stats()
        assert last["prefix_cache_hits_device"] > after["prefix_cache_hits_device"]
        drafted = last["spec_decode_num_draft_tokens"] - after["spec_decode_num_draft_tokens"]
        accepted = last["spec_decode_num_accepted_tokens"] - after["spec_decode_num_accepted_tokens"]
        assert drafted > 0 and accepted >= 0.9 * drafted, (drafted, accepted)
    finally:
        del steps.catch_up, steps.dispatch
