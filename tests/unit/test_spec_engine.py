"""Speculative decoding in the engine (n-gram drafts as rows of the ragged step).

Greedy output with speculation is token-identical to the engine without it (prefix hits,
chunked prefill, n > 1, logprobs, stop strings, preemption by swap and by recompute, the
overlapped loop above ``disable_by_batch_size``); rejected drafts roll back with no page
leaks and never reach the prefix cache; seeded sampling stays reproducible and batch
invariant; serving with speculation never compiles. Engines over the tiny golden llama are
shared per module (the speculative ones add only the verify variants to compile).
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import CompileCounter, assert_greedy_spec_variants_lean, run_engine

from jserve.builder import EngineArgs
from jserve.sampling_params import SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3, "disable_by_batch_size": None}   # drafts at any load


@pytest.fixture(scope="module")
def base(make_engine):
    return make_engine("llama", async_scheduling=False)


@pytest.fixture(scope="module")
def spec(make_engine):
    return make_engine("llama", speculative_config=NGRAM)


def _prompts():
    rng = np.random.default_rng(11)
    motif = rng.integers(5, 500, 9).tolist()
    return [motif * 4,                                  # repeats: drafts get accepted
            motif + rng.integers(5, 500, 6).tolist() + motif[:4],
            rng.integers(5, 500, 100).tolist(),         # > the 64-token budget: chunked prefill
            rng.integers(5, 500, 5).tolist()]


def _greedy(n=1, **kw):
    return SamplingParams(temperature=0.0, max_tokens=kw.pop("max_tokens", 24), ignore_eos=True,
                          n=n, **kw)


def _summary(out):
    return [(c.token_ids, c.text, c.finish_reason,
             None if c.logprobs is None else [sorted((k, round(v.logprob, 4)) for k, v in d.items())
                                              for d in c.logprobs])
            for c in out.outputs]


def _same(a_engine, b_engine, items):
    a = [_summary(o) for o in run_engine(a_engine, items)]
    b = [_summary(o) for o in run_engine(b_engine, items)]
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x == y, f"request {i} ({items[i][1]}) differs"


def test_greedy_with_ngram_drafts_is_token_identical(base, spec):
    ps = _prompts()
    before = dict(spec.kv_cache_stats())
    items = [(p, _greedy()) for p in ps]
    items += [(ps[0], _greedy(n=2)), (ps[1], _greedy(logprobs=2, max_tokens=12)),
              (ps[0] + [7], _greedy(max_tokens=40)),          # a prefix hit on ps[0]'s pages
              # rows with penalties get no drafts and sample exactly as without speculation
              (ps[3], SamplingParams(temperature=0.7, seed=4, repetition_penalty=1.3,
                                     frequency_penalty=0.3, max_tokens=16, logprobs=1))]
    _same(base, spec, items)
    after = spec.kv_cache_stats()
    rows = after["spec_decode_num_drafts"] - before["spec_decode_num_drafts"]
    accepted = after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"]
    assert rows > 0 and accepted > 0          # drafts were verified and some accepted
    assert after["prefix_cache_hits_device"] > before["prefix_cache_hits_device"]


def test_stop_strings_and_metrics(base, spec):
    ps = _prompts()
    ref = run_engine(base, [(ps[0], _greedy())])[0].outputs[0]
    stop = ref.text[6:10] if len(ref.text) > 10 else ref.text[-2:]
    stop_tok = ref.token_ids[7]
    items = [(ps[0], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop])),
             (ps[0], SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_tok])),
             (ps[0], SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_tok],
                                    min_tokens=10))]
    _same(base, spec, items)
    out = run_engine(spec, [(ps[0], _greedy())])[0]
    m = out.metrics
    assert m["spec_num_draft_tokens"] > 0
    assert 0 <= m["spec_num_accepted_tokens"] <= m["spec_num_draft_tokens"]
    assert m["spec_acceptance_rate"] == m["spec_num_accepted_tokens"] / m["spec_num_draft_tokens"]


def test_rollback_leaves_exactly_the_accepted_tokens(base, spec):
    """Step by step: every running request holds exactly the pages of its computed tokens
    (rejected drafts' pages are given back) and the pool's refcounts match; at the end no page
    is used. The prefix cache then serves a continuation from pages computed under
    speculation, and it matches the engine without speculation."""
    ps = _prompts()
    sched, kv = spec.scheduler, spec.scheduler.kv
    sp = _greedy(max_tokens=30)
    for p in ps:
        spec.add_request(None, p, sp)
    outs = {}
    while spec.has_unfinished_requests():
        for o in spec.step():
            if o.finished:
                outs[o.request_id] = o
        kv.check_invariants(sched.running)
        for r in sched.running:   # (a prefill step without drafts may still be in flight)
            assert len(r.page_ids) == kv.pool.pages_needed(r.num_computed_tokens), r.request_id
            if r.num_output_tokens and not r.num_placeholders:   # decoding, all rolled back
                assert r.num_computed_tokens == r.num_tokens - 1
    assert kv.pool.num_used == 0
    # continue each sequence from its cached pages (prompt + output) in both engines
    cont = [(p + o.outputs[0].token_ids, _greedy(max_tokens=8))
            for p, o in zip(ps, sorted(outs.values(), key=lambda o: int(o.request_id[4:])),
                            strict=True)
            if len(p) + 30 + 8 < 128]
    hits = spec.kv_cache_stats()["prefix_cache_hits_device"]
    _same(base, spec, cont)
    assert spec.kv_cache_stats()["prefix_cache_hits_device"] > hits


def test_ngram_drafts_chain_in_the_overlapped_loop(spec):
    """The lookup runs on the device: while speculating the loop keeps a step in flight, the
    next rows verify drafts the in-flight step made (``device_drafts``), and each running
    request's slot history holds its tokens (a prefix hit's cached prompt included)."""
    ps = _prompts()
    sched, runner = spec.scheduler, spec.runner
    run_engine(spec, [(ps[0], _greedy(max_tokens=8))])
    run_engine(spec, [(ps[3], _greedy(max_tokens=8))])   # its slot's history: other tokens
    schedule, plans = sched.schedule, []
    hits = spec.kv_cache_stats()["prefix_cache_hits_device"]

    def counting():
        out = schedule()
        plans.append(out)
        return out

    sched.schedule = counting
    try:
        for p in (ps[0] + [7], ps[1]):                     # the first: a prefix hit
            spec.add_request(None, p, _greedy(max_tokens=30))
        in_flight = checked = steps = 0
        late = None
        while spec.has_unfinished_requests():
            spec.step()
            steps += 1
            if steps == 3:   # admitted while speculation is on, its history comes with it (a
                # prefix hit on ps[1]'s first page: those tokens are never computed again)
                late = spec.add_request(None, ps[1][:16] + [5, 6, 7], _greedy(max_tokens=20))
            if plans[-1].has_drafts:
                in_flight += spec._in_flight is not None
            hist = np.asarray(runner.spec_steps.hist)
            for r in sched.running:   # (a stale history is sent again before speculation uses it)
                if r.request_id not in sched._stale_history:
                    s = runner.rows.slot_of(r.request_id)
                    assert hist[s, :r.num_tokens].tolist() == list(r.all_token_ids), r.request_id
                    checked += 1
    finally:
        sched.schedule = schedule
    chained = sum(c.device_drafts for out in plans for c in out.chunks)
    drafted = sum(out.has_drafts for out in plans)
    assert chained > 0 and in_flight == drafted > 0 and checked > 0
    assert spec.kv_cache_stats()["prefix_cache_hits_device"] >= hits + 2
    took = [c for out in plans for c in out.chunks if c.req_id == late and c.new is not None]
    assert took and took[0].new.history is not None and not any(
        c.history for out in plans for c in out.chunks if c.req_id == late)


def test_ngram_history_resumes_after_steps_without_speculation(base, make_engine):
    """disable_by_batch_size=1: while two requests run, steps take the ordinary variants (no
    lookup on the device); when one finishes speculation resumes, the other's slot history
    is sent again first (``ScheduledChunk.history``) and then holds its tokens, and its drafts
    get accepted. Tokens equal the engine without speculation."""
    eng = make_engine("llama", speculative_config={**NGRAM, "disable_by_batch_size": 1})
    ps = _prompts()
    items = [(ps[0], _greedy(max_tokens=40)), (ps[3], _greedy(max_tokens=6))]
    want = [o.outputs[0].token_ids for o in run_engine(base, items)]
    sched, runner = eng.scheduler, eng.runner
    schedule, dispatch, plans, spec_steps = sched.schedule, runner.spec_steps.dispatch, [], []

    def counting():
        out = schedule()
        plans.append(out)
        return out

    def spec_dispatch(r, out, *a, **k):
        spec_steps.append(out)
        return dispatch(r, out, *a, **k)

    sched.schedule, runner.spec_steps.dispatch = counting, spec_dispatch
    try:
        ids = [eng.add_request(None, p, sp) for p, sp in items]
        got, checked = {}, 0
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    got[o.request_id] = o.outputs[0].token_ids
            if plans[-1].speculative:
                hist = np.asarray(runner.spec_steps.hist)
                for r in sched.running:
                    if r.request_id not in sched._stale_history:
                        s = runner.rows.slot_of(r.request_id)
                        assert hist[s, :r.num_tokens].tolist() == list(r.all_token_ids), r.request_id
                        checked += 1
    finally:
        sched.schedule, runner.spec_steps.dispatch = schedule, dispatch
    assert [got[i] for i in ids] == want
    plain = [p for p in plans if p.chunks and not p.speculative]
    refreshed = [c for p in plans for c in p.chunks if c.history is not None]
    assert plain and refreshed and checked
    assert all(p.speculative or p.has_drafts for p in spec_steps)   # the rest ran plain variants
    assert len(spec_steps) < len([p for p in plans if p.chunks])
    assert eng.kv_cache_stats()["spec_decode_num_accepted_tokens"] > 0


def test_seeded_sampling_is_reproducible_and_batch_invariant(spec):
    ps = _prompts()
    sp = SamplingParams(temperature=0.9, top_p=0.9, seed=5, max_tokens=20, ignore_eos=True)
    alone = run_engine(spec, [(ps[0], sp)])[0].outputs[0].token_ids
    again = run_engine(spec, [(ps[0], sp)])[0].outputs[0].token_ids
    other = SamplingParams(temperature=1.0, seed=9, max_tokens=15, ignore_eos=True)
    batched = run_engine(spec, [(ps[1], other), (ps[0], sp), (ps[3], _greedy())])[1]
    assert alone == again == batched.outputs[0].token_ids
    spec._overlap = False   # the synchronous loop (host lookup, no chained rows): the same draws
    try:
        assert run_engine(spec, [(ps[0], sp)])[0].outputs[0].token_ids == alone
    finally:
        spec._overlap = True


def test_serving_with_speculation_never_compiles(spec):
    ps = _prompts()
    items = [(ps[0], _greedy()), (ps[1], SamplingParams(temperature=0.8, top_k=5, seed=1, max_tokens=10)),
             (ps[2], _greedy(logprobs=1, max_tokens=6)),
             (ps[3], SamplingParams(temperature=0.7, repetition_penalty=1.2, seed=3, max_tokens=8)),
             (ps[0], SamplingParams(temperature=1.0, seed=2, max_tokens=12, logprobs=3))]
    with CompileCounter() as c:
        run_engine(spec, items)
    assert c.count == 0


def test_greedy_speculative_variants_have_no_control_flow(spec):
    """An XLA GPU conditional or while loop reads its predicate on the host, holding the thread
    that launches the step until the device gets there: the greedy speculative variants (the
    ones batch-1 greedy decoding takes) have none, and return no logprob arrays; the general
    ones keep their run-time branches."""
    assert_greedy_spec_variants_lean(spec)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_keeps_greedy_tokens(base, make_engine, mode):
    """A pool of 24 pages (384 tokens) for 8 requests growing to ~100 tokens: requests are
    preempted (swapped or recomputed) between verify steps and still match."""
    eng = make_engine("llama", num_pages=24, preemption_mode=mode, speculative_config=NGRAM,
                      swap_space_gb=0.001 if mode == "swap" else 0.0)
    rng = np.random.default_rng(3)
    motif = rng.integers(5, 500, 7).tolist()
    items = [(motif * 6 + [int(t)], _greedy(max_tokens=50)) for t in rng.integers(5, 500, 8)]
    _same(base, eng, items)
    assert eng.kv_cache_stats()["preemptions"] > 0
    assert eng.kv_cache_stats()[f"preemptions_{mode}"] > 0
    assert eng.kv_cache_stats()["spec_decode_num_accepted_tokens"] > 0
    assert eng.scheduler.kv.pool.num_used == 0


def test_overlapped_loop_above_the_batch_threshold(base, make_engine):
    """disable_by_batch_size=2: with more requests running the loop overlaps without drafts,
    below it speculates synchronously; tokens match throughout."""
    eng = make_engine("llama", speculative_config={**NGRAM, "disable_by_batch_size": 2})
    ps = _prompts()
    items = [(p, _greedy(max_tokens=m)) for p, m in zip(ps, (40, 10, 12, 14), strict=True)]
    _same(base, eng, items)
    s = eng.kv_cache_stats()
    assert s["spec_decode_num_drafts"] > 0


def test_speculation_turning_off_with_a_verify_row_in_flight(base, make_engine):
    """disable_by_batch_size=1 and a second request arriving while the first speculates: the
    next plan (no drafts) is made while the first's verify row is in flight, so its row starts
    where that row's accepted drafts leave it (``shifted``) and only the speculative variant
    moves it. Tokens equal the engine without speculation (before the fix, the ordinary
    variant ran such plans and the rows decoded at stale positions)."""
    eng = make_engine("llama", speculative_config={**NGRAM, "disable_by_batch_size": 1})
    ps = [[5, 6, 7, 8, 9] * 6, [11, 12, 13] * 3]    # the first's drafts get accepted at once
    sp = _greedy(max_tokens=40)
    schedule, off_shifted = eng.scheduler.schedule, []

    def plans():
        out = schedule()
        off_shifted.extend(c for c in out.chunks if c.shifted and not out.speculative)
        return out

    def run(engine, late):
        engine.add_request("first", ps[0], sp)
        got, step = {}, 0
        while engine.has_unfinished_requests():
            step += 1
            if step == late:
                engine.add_request("second", ps[1], sp)
            for o in engine.step():
                if o.finished:
                    got[o.request_id] = o.outputs[0].token_ids
        return got

    eng.scheduler.schedule = plans
    for late in (3, 5, 8):
        assert run(eng, late) == run(base, late), late
    assert off_shifted   # the case happened: a shifted row in a plan without speculation


def test_bad_speculative_configs_fail_at_start_up_naming_the_field():
    for bad, field in [({"method": "medusa", "num_speculative_tokens": 2}, "method"),
                       ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"method": "ngram"}, "num_speculative_tokens"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
                         "prompt_lookup_max": 2}, "prompt_lookup_min"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 0},
                        "prompt_lookup_max"),   # named as given, not as the min it would default
                       ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": "x"},
                        "prompt_lookup_max"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "k": 1}, "k"),
                       ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
                       ({"method": "ngram", "num_speculative_tokens": 2,
                         "disable_by_batch_size": 0}, "disable_by_batch_size"),
                       ("{not json", "speculative_config")]:
        with pytest.raises(ValueError, match=f"speculative_config.*{field}" if field != "speculative_config"
                           else "speculative_config"):
            EngineArgs(speculative_config=bad)


def test_prometheus_exports_the_spec_decode_counters(spec):
    from prometheus_client import generate_latest

    from jserve.metrics import StepStats
    from server.metrics import PrometheusStats

    run_engine(spec, [(_prompts()[0], _greedy())])
    stats = spec.stats()
    prom = PrometheusStats("m", stats.kv_pages_total)
    prom.on_step(StepStats(0.01, stats))
    text = generate_latest(prom.registry).decode()
    for key in ("spec_decode_num_drafts", "spec_decode_num_draft_tokens",
                "spec_decode_num_accepted_tokens"):
        line = next(x for x in text.splitlines() if x.startswith(f"jserve:{key}_total{{"))
        assert float(line.split()[-1]) == stats.kv_cache[key] > 0


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_match_with_ngram_drafts(make_engine, arch):
    base = make_engine(arch)
    eng = make_engine(arch, speculative_config=NGRAM)
    ps = _prompts()
    items = [(ps[0], _greedy()), (ps[2], _greedy(max_tokens=12)), (ps[1], _greedy(n=2))]
    _same(base, eng, items)
    assert eng.kv_cache_stats()["spec_decode_num_draft_tokens"] > 0   # drafts were verified


def test_verify_steps_ask_the_attention_decode_tile_for_their_rows(monkeypatch, make_engine):
    """Speculative verify variants tell the paged attention kernel their 1 + k query rows per
    request (``StepInput.decode_rows``: on GPUs such rows then take its decode class's split-KV
    launch, not the prefill tiles); every other step keeps 1."""
    import jax

    import pallas_kernels

    asked = set()
    kernel = pallas_kernels.ragged_paged_attention

    def record(*a, **k):
        asked.add((k["decode_rows"], k["max_q_len"]))
        return kernel(*a, **k)

    monkeypatch.setattr(pallas_kernels, "ragged_paged_attention", record)
    jax.clear_caches()   # (other tests' engines traced the same layers)
    make_engine("llama", max_num_batched_tokens=16, speculative_config={**NGRAM, "num_speculative_tokens": 3})
    # greedy verify variants promise at most 1 + k rows (the decode launch alone on GPUs); the
    # general ones may hold prompt chunks; plain decode-only steps promise 1
    assert asked == {(1, None), (1, 1), (4, None), (4, 4)}


def test_greedy_verify_variant_takes_only_short_rows(monkeypatch, spec):
    """A step with a prompt chunk longer than 1 + k tokens runs the general verify variant even
    when every row is greedy (the greedy one runs attention's decode launch alone); steps of
    verify and decode rows run the greedy one."""
    ss = spec.runner.spec_steps
    k1 = ss.num_spec + 1
    seen: list[list] = []

    def wrap(key, fn):
        def call(*a):
            seen[-1].append(key[1])
            return fn(*a)
        return call

    monkeypatch.setattr(ss, "_compiled", {key: wrap(key, fn) for key, fn in ss._compiled.items()})
    dispatch = ss.dispatch

    def spy(runner, out, *a, **k):
        seen.append([max(c.num_tokens for c in out.chunks)])
        return dispatch(runner, out, *a, **k)

    monkeypatch.setattr(ss, "dispatch", spy)
    rng = np.random.default_rng(99)   # fresh prompts (no prefix hits): small buckets
    spec.add_request(None, _prompts()[0], _greedy(max_tokens=16))
    for _ in range(4):
        spec.step()
    spec.add_request(None, rng.integers(5, 500, 9).tolist(), _greedy(max_tokens=8))  # beside it
    while spec.has_unfinished_requests():
        spec.step()
    assert all(len(s) == 2 for s in seen), seen
    assert any(n > k1 for n, _ in seen) and any(g for _, g in seen), seen
    assert not any(g for n, g in seen if n > k1), seen
