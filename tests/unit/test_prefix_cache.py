"""Prefix caching and copy-on-write: the hash index, the scheduler with a model-free runner
(fake_kv_runner: a page mix-up changes the tokens), a 2,000-request randomized run, and the
tiny golden model (DESIGN invariant 5 with a prefix-cache hit; n = 4 sharing its prompt)."""

import random

import numpy as np
import pytest
from engine_helpers import run_engine
from fake_kv_runner import (
    VOCAB,
    Driver,
    FakeKVRunner,
    abort_in_flight,
    drive,
    host_store,
    reference_generation,
)

from jserve.config import SchedulerConfig
from jserve.kv_manager import KVCacheManager
from jserve.page_pool import PagePool
from jserve.prefix_cache import PrefixCache
from jserve.request import Request, RequestStatus
from jserve.sampling_params import SamplingParams
from jserve.scheduler import QueueFullError, Scheduler

PS = 4
ABORT = RequestStatus.FINISHED_ABORTED


def make_sched(num_pages=33, hash_fn=None, host_slots=0, swap_slots=0, mode="swap", **cfg):
    cfg.setdefault("max_num_seqs", 8)
    cfg.setdefault("max_num_batched_tokens", 32)
    cfg.setdefault("max_model_len", 128)
    pool = PagePool(num_pages, PS)
    tier = host_store(host_slots, "tier") if host_slots else None
    pc = PrefixCache(pool, hash_fn, tier) if hash_fn else PrefixCache(pool, host_tier=tier)
    swap = host_store(swap_slots, "swap") if swap_slots else None
    return Scheduler(SchedulerConfig(**cfg), KVCacheManager(pool, pc, swap, mode))


def req(rid, prompt, max_tokens=6, seed=0, **kw):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   seed=seed, **kw)


def check_clean(sched):
    pool = sched.pool
    sched.kv.check_invariants([])
    assert (pool.refcounts == 0).all() and pool.num_used == 0
    assert pool.num_empty + pool.num_evictable == pool.num_total


def assert_reference(sched, reqs):
    for r in reqs:
        assert (r.output_token_ids, r.status) == reference_generation(r, sched.max_model_len), r.request_id


# ----------------------------------------------------------------- the hash index


def test_collisions_verify_tokens_parent_and_salt():
    """Every page hashes to 0: lookups must still only follow exact prefixes."""
    pool = PagePool(16, 2)
    pc = PrefixCache(pool, hash_fn=lambda parent, toks, extra: 0)
    x, y, z, w = (1, 1), (2, 2), (3, 3), (4, 4)
    for tokens, salt in (([*x, *y], None), ([*z, *w], None), ([*x, *y], "s")):
        entries, pages = [], pool.allocate(2)
        pc.register(entries, pages, lambda i, t=tokens: tuple(t[2 * i:2 * i + 2]), salt, 2)
    assert pc.num_entries == 6
    assert len(pc.lookup([*x, *y], None, 9)) == 2
    assert len(pc.lookup([*x, *w], None, 9)) == 1      # w exists, but under parent z
    assert len(pc.lookup([*z, *y], None, 9)) == 1
    assert len(pc.lookup([*y, *x], None, 9)) == 0
    assert len(pc.lookup([*x, *y], "s", 9)) == 2 and pc.lookup([*x], "t", 9) == []
    assert len(pc.lookup([*x, *y, 5], None, 1)) == 1   # max_pages caps the run
    pc.check_invariants()


def test_duplicate_content_keeps_one_entry_and_reset_forgets_unused_pages():
    pool = PagePool(8, 2)
    pc = PrefixCache(pool)
    toks = lambda i: ((7, 8), (9, 9))[i]  # noqa: E731
    a, b = pool.allocate(2), pool.allocate(2)
    ea, eb = [], []
    pc.register(ea, a, toks, None, 2)
    pc.register(eb, b, toks, None, 2)  # computed twice (admitted in the same step): no new entry
    assert [e.serial for e in ea] == [e.serial for e in eb] and pc.num_entries == 2
    assert pool.cached[a].all() and not pool.cached[b].any()
    pool.free(a)
    pool.free(b)
    assert pool.num_evictable == 2 and pc.reset() == 2
    assert pc.num_entries == 0 and pc.lookup([7, 8, 9, 9], None, 9) == []
    pc.check_invariants()
    pool.check_invariants()


# ------------------------------------------------------------- scheduler, no model


def test_hit_starts_at_cached_tokens_and_never_covers_the_whole_prompt():
    sched = make_sched()
    runner = FakeKVRunner(sched.pool, sched.kv.host_slot_counts())
    prompt = list(range(10, 23))  # 13 tokens: 3 full pages + 1
    a = req("a", prompt)
    sched.add_request(a)
    drive(sched, runner)
    starts = {}
    rec = lambda out: starts.update({c.req_id: starts.get(c.req_id) or  # noqa: E731
                                     (c.start, c.num_tokens) for c in out.chunks})
    b, c = req("b", prompt), req("c", prompt[:12])  # c: exactly 3 pages -> only 2 reused
    d = req("d", prompt, cache_salt="other")
    for r in (b, c, d):
        sched.add_request(r)
    drive(sched, runner, on_schedule=rec)
    assert starts == {"b": (12, 1), "c": (8, 4), "d": (0, 13)}
    assert [r.num_cached_tokens for r in (a, b, c, d)] == [0, 12, 8, 0]
    assert_reference(sched, (a, b, c, d))
    s = sched.kv_stats()
    assert s["prefix_cache_hits_device"] == 20 and s["prefix_cache_queries"] == 13 * 3 + 12
    check_clean(sched)


def test_evicted_prefix_comes_back_from_the_host_tier():
    sched = make_sched(num_pages=9, host_slots=16, max_model_len=32)  # 8 pages of 4 tokens
    runner = FakeKVRunner(sched.pool, sched.kv.host_slot_counts())
    tier = sched.kv.prefix_cache.host_tier
    offloads = []

    def offloaded(out):  # plain values; the tier slot is valid from the schedule that queues it
        assert all(s == "tier" and tier.valid[slot] for _, s, slot in out.transfers.to_host)
        offloads.extend(out.transfers.to_host)

    first = req("first", range(100, 113), max_tokens=3)
    sched.add_request(first)
    drive(sched, runner, on_schedule=offloaded)
    for i in range(3):  # distinct prompts push first's pages out of the device pool
        sched.add_request(req(f"fill{i}", range(200 + 20 * i, 214 + 20 * i), max_tokens=3))
        drive(sched, runner, on_schedule=offloaded)
    assert len(offloads) == sched.kv_stats()["host_tier_pages_offloaded"]
    assert sched.kv_stats()["host_tier_pages_offloaded"] >= 3
    again = req("again", range(100, 113), max_tokens=3)
    sched.add_request(again)
    loads = []
    drive(sched, runner, on_schedule=lambda out: loads.extend(out.transfers.from_host))
    assert again.num_cached_tokens == 12 and len(loads) == 3
    assert all(s == "tier" for s, _, _ in loads)
    assert again.output_token_ids == first.output_token_ids
    s = sched.kv_stats()
    assert s["prefix_cache_hits_host"] == 12 and s["host_tier_pages_loaded"] == 3
    check_clean(sched)


def test_fork_shares_prompt_pages_and_copies_the_partial_page_on_write():
    sched = make_sched()
    runner = FakeKVRunner(sched.pool, sched.kv.host_slot_counts())
    prompt = list(range(30, 40))  # 10 tokens: pages 0, 1 full, page 2 partial
    lead = req("p#0", prompt, seed=1)
    sibs = [lead] + [req(f"p#{i}", prompt, seed=1 + i, fork_of=lead) for i in range(1, 4)]
    for r in sibs:
        sched.add_request(r)
    out = sched.schedule()  # the leader alone: the siblings wait for its prompt
    assert [c.req_id for c in out.chunks] == ["p#0"]
    sched.update(out, runner.run(out))
    out = sched.schedule()
    assert [(c.req_id, c.start, c.num_tokens) for c in out.chunks] == \
        [("p#0", 10, 1)] + [(f"p#{i}", 9, 1) for i in range(1, 4)]
    full = lead.page_ids[:2]
    assert all(r.page_ids[:2] == full for r in sibs)
    assert sched.pool.refcounts[full].tolist() == [4, 4]
    assert len(out.transfers.copies) == 3  # three copy the partial page; the last writes in place
    assert len({r.page_ids[2] for r in sibs}) == 4
    sched.update(out, runner.run(out))
    drive(sched, runner)
    assert_reference(sched, sibs)
    assert len({tuple(r.output_token_ids) for r in sibs}) == 4
    assert sched.kv_stats()["cow_copies"] == 3
    check_clean(sched)


def randomized(n_requests, seed, hash_fn=None, overlap=False):
    """Requests drawn from a few shared prefixes, forks (n > 1), salts, min_tokens, random
    aborts (also of rows in flight: between schedule and update), a swap space and a host tier
    that both run out (swap and recompute preemptions). ``overlap``: the engine's overlapped
    loop (schedule N+1 before update N). -> (sched, runner, aborted ids, {id: (tokens, status)})."""
    rng = random.Random(seed)
    sched = make_sched(num_pages=41, hash_fn=hash_fn, host_slots=24, swap_slots=14, max_num_seqs=12,
                       max_num_batched_tokens=48, max_model_len=96, max_waiting=40)
    runner = FakeKVRunner(sched.pool, sched.kv.host_slot_counts())
    driver = Driver(sched, runner, overlap)
    prefixes = [[rng.randrange(VOCAB) for _ in range(n)] for n in (4, 11, 16, 23, 40)]
    groups = []
    for i in range(n_requests):
        prompt = (rng.choice(prefixes) if rng.random() < 0.8 else []) + \
            [rng.randrange(VOCAB) for _ in range(rng.randint(0 if rng.random() < 0.3 else 1, 20))]
        prompt = prompt or [1]
        max_tokens = rng.randint(1, 30)
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=rng.random() < 0.5,
                            min_tokens=rng.randint(0, min(3, max_tokens)) if rng.random() < 0.2 else 0)
        salt = "s" if rng.random() < 0.1 else None
        eos = tuple(rng.sample(range(VOCAB), rng.randint(0, 1)))
        n = rng.choice((2, 3, 4)) if rng.random() < 0.15 else 1
        lead = Request(f"r{i}", prompt, sp, eos_token_ids=eos, seed=rng.randrange(1000), cache_salt=salt)
        groups.append([lead] + [Request(f"r{i}#{j}", prompt, sp, eos_token_ids=eos, seed=lead.seed + j,
                                        cache_salt=salt, fork_of=lead) for j in range(1, n)])
    all_reqs = [r for g in groups for r in g]
    groups.reverse()
    aborted = set()

    def in_flight(out):  # an abort arrives while the step runs
        abort_in_flight(sched, rng, aborted, out)

    while groups or driver.busy:
        for _ in range(rng.randint(0, 3)):
            if not groups or sched.config.max_waiting - sched.num_waiting < len(groups[-1]):
                break
            for r in groups.pop():
                sched.add_request(r)
        if rng.random() < 0.03 and sched.has_unfinished():
            victim = rng.choice(list(sched.waiting) + sched.running)
            sched.finish_request(victim.request_id, ABORT)
            aborted.add(victim.request_id)
        driver.step(in_flight=in_flight)
        assert driver.steps < 100_000
    sched.schedule()
    check_clean(sched)
    assert sched.kv.swap_space.num_used == 0
    for r in all_reqs:
        assert r.is_finished and r.page_ids == [] and not r.swap_slots
        assert driver.emitted.get(r.request_id, 0) == r.num_output_tokens  # usage: what update emitted
        ref = reference_generation(r, sched.max_model_len)
        if r.request_id in aborted:
            assert r.status is ABORT and r.output_token_ids == ref[0][:r.num_output_tokens]
        else:
            assert (r.output_token_ids, r.status) == ref, r.request_id
    return sched, runner, aborted, {r.request_id: (r.output_token_ids, r.status) for r in all_reqs}


@pytest.fixture(scope="module")
def runs_2000():
    return {overlap: randomized(2000, seed=5, overlap=overlap) for overlap in (False, True)}


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_randomized_2000_requests_shared_prefixes_no_leaks_same_tokens(runs_2000, overlap):
    sched, runner, aborted, _ = runs_2000[overlap]
    s = sched.kv_stats()
    assert len(aborted) > 20
    assert s["prefix_cache_hits_device"] > 0.3 * s["prefix_cache_queries"]
    assert s["prefix_cache_hits_host"] > 0 and s["host_tier_evictions"] > 0
    assert s["cow_copies"] > 50 and s["device_evictions"] > 0
    assert s["preemptions_swap"] > 10 and s["preemptions_recompute"] > 0  # swap space ran out too
    assert s["pages_swapped_in"] > 0 and 0 < runner.num_copies <= s["cow_copies"]
    assert s["swap_resume_tokens_lost"] > 0  # cached pages lost while swapped: recomputed
    # Overlapped, decode rows run over the in-flight token (fed by the runner, not the host).
    assert (runner.num_placeholder_rows > 1000) if overlap else runner.num_placeholder_rows == 0


def test_randomized_2000_overlapped_tokens_equal_sync(runs_2000):
    (_, _, ab_sync, sync), (_, _, ab_over, over) = runs_2000[False], runs_2000[True]
    both = [rid for rid in sync if rid not in ab_sync and rid not in ab_over]
    assert len(both) > 1900
    assert [over[rid] for rid in both] == [sync[rid] for rid in both]


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_randomized_with_colliding_hashes_same_tokens(overlap):
    """A hash with 3 values: nearly every lookup walks colliding candidates."""
    sched, _, _, _ = randomized(300, seed=9, hash_fn=lambda parent, toks, extra: toks[0] % 3,
                                overlap=overlap)
    assert sched.kv_stats()["prefix_cache_hits_device"] > 0


def test_queue_full_still_raised_with_prefix_caching():
    sched = make_sched(max_waiting=1)
    sched.add_request(req("a", [1, 2, 3]))
    with pytest.raises(QueueFullError):
        sched.add_request(req("b", [1, 2, 3]))


# ------------------------------------------------------------- the tiny golden model

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine("llama")  # page 16, prefix caching on by default


@pytest.fixture(scope="module")
def prompts(engine):
    rng = np.random.default_rng(11)
    v = engine.config.model.vocab_size
    system = rng.integers(5, v, 48).tolist()  # 3 pages of 16
    return system, rng.integers(5, v, 9).tolist(), rng.integers(5, v, 13).tolist()


def test_shared_system_prompt_is_computed_once_and_output_is_unchanged(engine, prompts):
    system, user_a, user_b = prompts
    engine.reset_prefix_cache()
    (uncached,) = run_engine(engine, [(system + user_b, GREEDY)])
    assert uncached.num_cached_tokens == 0
    engine.reset_prefix_cache()
    starts = []
    dispatch = engine.runner.dispatch
    engine.runner.dispatch = lambda out: (starts.extend((c.req_id, c.start) for c in out.chunks),
                                          dispatch(out))[1]
    try:
        (a,) = run_engine(engine, [(system + user_a, GREEDY)])
        (b,) = run_engine(engine, [(system + user_b, GREEDY)])
    finally:
        del engine.runner.dispatch  # back to the class's method
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 48
    assert [s for rid, s in starts if rid == b.request_id][0] == 48  # computes only its own tokens
    assert b.outputs[0].token_ids == uncached.outputs[0].token_ids


def test_forced_hash_collisions_never_serve_wrong_kv(engine, prompts):
    system, user_a, user_b = prompts
    pc = engine.scheduler.kv.prefix_cache
    engine.reset_prefix_cache()
    (ref,) = run_engine(engine, [(system[16:] + system[:16] + user_b, GREEDY)])
    engine.reset_prefix_cache()
    default = pc.hash_fn
    pc.hash_fn = lambda parent, toks, extra: 42  # every page of every prompt collides
    try:
        run_engine(engine, [(system + user_a, GREEDY)])
        # Same pages in another order: every lookup finds colliding candidates, none verifies.
        (other,) = run_engine(engine, [(system[16:] + system[:16] + user_b, GREEDY)])
        (same,) = run_engine(engine, [(system[:32] + user_b, GREEDY)])
    finally:
        pc.hash_fn = default
        engine.reset_prefix_cache()
    assert other.num_cached_tokens == 0 and other.outputs[0].token_ids == ref.outputs[0].token_ids
    assert same.num_cached_tokens == 32


def test_n4_shares_prompt_pages_and_matches_four_separate_requests(engine, prompts):
    system, user_a, _ = prompts
    prompt = system[:21] + user_a  # 30 tokens: one full page + a partial one
    engine.reset_prefix_cache()
    cow0 = engine.kv_cache_stats()["cow_copies"]
    sp = SamplingParams(n=4, temperature=1.0, seed=77, max_tokens=8, ignore_eos=True)
    rid = engine.add_request(None, prompt, sp)
    shared = None
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o if o.request_id == rid else out
        kids = [r for r in engine.scheduler.running if r.request_id.startswith(rid + "#")]
        if shared is None and len(kids) == 4:
            shared = ([r.page_ids[0] for r in kids], engine.pool.refcounts[kids[0].page_ids[0]])
    assert shared is not None and len(set(shared[0])) == 1 and shared[1] == 4
    assert engine.kv_cache_stats()["cow_copies"] - cow0 == 3
    engine.reset_prefix_cache()
    seeds = [(77 + 0x9E3779B1 * i) % 2**32 for i in range(4)]
    alone = run_engine(engine, [(prompt, sp.replace(n=1, seed=s)) for s in seeds])
    assert [c.token_ids for c in out.outputs] == [o.outputs[0].token_ids for o in alone]
    assert engine.pool.num_used == 0
