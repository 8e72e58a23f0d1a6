"""Preemption by swap, the recompute fallback, and the host KV tier: with a model-free runner
(fake_kv_runner) and with the tiny golden model (outputs equal unconstrained runs, no page
leaks in the device pool or the host stores, no compile while pages move)."""

import numpy as np
import pytest
from engine_helpers import CompileCounter, run_engine
from fake_kv_runner import Driver, FakeKVRunner, drive, host_store, reference_generation

from jserve.config import SchedulerConfig
from jserve.kv_manager import KVCacheManager
from jserve.page_pool import PagePool
from jserve.request import Request, RequestStatus
from jserve.sampling_params import SamplingParams
from jserve.scheduler import Scheduler

PS = 4


def make_sched(num_pages, swap_slots, mode="swap", **cfg):
    cfg.setdefault("max_num_seqs", 8)
    cfg.setdefault("max_num_batched_tokens", 32)
    cfg.setdefault("max_model_len", 64)
    pool = PagePool(num_pages, PS)
    swap = host_store(swap_slots, "swap") if swap_slots else None
    return Scheduler(SchedulerConfig(**cfg), KVCacheManager(pool, None, swap, mode))


def two_growing(sched):
    # 6 usable pages of 4 tokens; each request grows to 8 + 12 = 20 tokens = 5 pages.
    a = Request("a", list(range(10, 18)), SamplingParams(max_tokens=12, ignore_eos=True), seed=1)
    b = Request("b", list(range(20, 28)), SamplingParams(max_tokens=12, ignore_eos=True), seed=2)
    sched.add_request(a)
    sched.add_request(b)
    return a, b


def run(sched, on_step, overlap=False):
    runner = FakeKVRunner(sched.pool, sched.kv.host_slot_counts())
    drive(sched, runner, overlap, max_steps=500, on_schedule=on_step)
    return runner


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_swap_out_then_resume_where_it_was(overlap):
    sched = make_sched(num_pages=7, swap_slots=8)
    a, b = two_growing(sched)
    events = []

    def on_step(out):
        # Page moves are plain values; a slot is valid once its move is scheduled.
        assert all(s == "swap" and sched.kv.swap_space.valid[slot] for _, s, slot in out.transfers.to_host)
        assert all(s == "swap" for s, _, _ in out.transfers.from_host)
        if out.num_preempted:
            assert out.num_preempted == 1 and "b" in out.dropped
            assert b.status is RequestStatus.PREEMPTED and b.page_ids == []
            assert b.num_computed_tokens > 8 and len(b.swap_slots) == len(out.transfers.to_host)
            events.append(("out", b.num_computed_tokens, len(out.transfers.to_host)))
            assert not any(c.req_id == "b" for c in out.chunks)
        for c in out.chunks:
            if c.req_id == "b" and out.transfers.from_host:
                assert c.new is not None and c.page_start == 0  # the runner forgot b: a full row
                events.append(("in", c.start, len(out.transfers.from_host)))

    run(sched, on_step, overlap)
    (_, computed, n_out), (_, start, n_in) = events[:2]
    assert start == computed and n_in == n_out == -(-computed // PS)  # nothing recomputed
    for r in (a, b):
        assert (r.output_token_ids, r.status) == reference_generation(r, sched.max_model_len)
    s = sched.kv_stats()
    assert s["preemptions_swap"] >= 1 and s["preemptions_recompute"] == 0
    assert s["pages_swapped_out"] == s["pages_swapped_in"] > 0
    assert sched.pool.num_free == sched.pool.num_total and sched.kv.swap_space.num_used == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
@pytest.mark.parametrize("swap_slots, mode", [(1, "swap"), (8, "recompute"), (0, "swap")])
def test_recompute_when_swap_space_is_short_or_not_chosen(swap_slots, mode, overlap):
    sched = make_sched(num_pages=7, swap_slots=swap_slots, mode=mode)
    a, b = two_growing(sched)
    restarts = []
    run(sched, lambda out: restarts.extend(c.start for c in out.chunks if c.req_id == "b"
                                           and b.num_preemptions and c.start == 0), overlap)
    assert b.num_preemptions >= 1 and restarts  # started over from token 0
    for r in (a, b):
        assert (r.output_token_ids, r.status) == reference_generation(r, sched.max_model_len)
    s = sched.kv_stats()
    assert s["preemptions_recompute"] >= 1 and s["preemptions_swap"] == 0 and s["pages_swapped_out"] == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_abort_of_a_swapped_request_frees_its_slots(overlap):
    sched = make_sched(num_pages=7, swap_slots=8)
    a, b = two_growing(sched)
    driver = Driver(sched, FakeKVRunner(sched.pool, sched.kv.host_slot_counts()), overlap)
    while not b.swap_slots:
        driver.step()
    assert sched.kv.swap_space.num_used == len(b.swap_slots) > 0
    sched.finish_request("b", RequestStatus.FINISHED_ABORTED)
    assert sched.kv.swap_space.num_used == 0 and not b.swap_slots
    sched.kv.check_invariants(list(sched.running))
    driver.drain()
    assert (a.output_token_ids, a.status) == reference_generation(a, sched.max_model_len)
    sched.kv.check_invariants([])


# ------------------------------------------------------------- the tiny golden model

LENGTHS = (3, 9, 17, 24, 33, 40, 51, 60)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def assert_no_leaks(engine):
    kv = engine.scheduler.kv
    kv.check_invariants([])
    assert engine.pool.num_used == 0 and engine.pool.num_free == engine.pool.num_total
    assert kv.swap_space is None or kv.swap_space.num_used == 0
    assert engine.runner.mover.host.num_slots == kv.host_slot_counts()  # both sides agree


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(5, 512, n).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def swap_engine(make_engine):
    # 12 usable pages of 16 tokens: the 8 prompts (+12 new tokens each) cannot all fit; no
    # prefix cache, so every computed page of a preempted request goes to the swap space.
    return make_engine("llama", num_pages=13, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def alone(swap_engine, prompts):
    """Unconstrained: one request at a time (each fits the pool alone)."""
    return [run_engine(swap_engine, [(p, GREEDY)])[0].outputs[0].token_ids for p in prompts]


def test_swap_outputs_equal_unconstrained_run(swap_engine, prompts, alone):
    before = swap_engine.kv_cache_stats()
    outs = run_engine(swap_engine, [(p, GREEDY) for p in prompts])
    s = swap_engine.kv_cache_stats()
    assert s["preemptions_swap"] > before["preemptions_swap"]
    assert s["pages_swapped_in"] - before["pages_swapped_in"] > 0
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert_no_leaks(swap_engine)


def test_host_tier_serves_an_evicted_prefix_and_nothing_compiles(make_engine, prompts, alone):
    engine = make_engine("llama", num_pages=13, host_kv_cache_gb=0.001)  # ~128 host pages
    rng = np.random.default_rng(5)
    first = rng.integers(5, 512, 53).tolist()  # 3 full pages + 5 tokens
    with CompileCounter() as counter:
        (ref,) = run_engine(engine, [(first, GREEDY)])
        for _ in range(4):  # 4 x 4 pages of distinct prefixes: more than the 12-page pool
            run_engine(engine, [(rng.integers(5, 512, 60).tolist(), GREEDY)])
        assert engine.kv_cache_stats()["device_evictions"] >= 3
        (again,) = run_engine(engine, [(first, GREEDY)])
        # Swap, host tier and copy-on-write (n = 2) together, under pool pressure.
        mixed = run_engine(engine, [(p, GREEDY) for p in prompts] +
                           [(first, SamplingParams(n=2, temperature=0.0, max_tokens=12, ignore_eos=True))])
    assert again.num_cached_tokens == 48 and again.outputs[0].token_ids == ref.outputs[0].token_ids
    s = engine.kv_cache_stats()
    assert s["prefix_cache_hits_host"] >= 48 and s["host_tier_pages_loaded"] >= 3
    assert [o.outputs[0].token_ids for o in mixed[:-1]] == alone
    assert [c.token_ids for c in mixed[-1].outputs] == [ref.outputs[0].token_ids] * 2
    assert s["preemptions_swap"] > 0 and s["cow_copies"] > 0
    assert counter.count == 0, f"{counter.count} compilations while serving"
    assert_no_leaks(engine)
    assert engine.scheduler.kv.prefix_cache.num_host_pages > 0


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("field, value, msg", [
    ("preemption_mode", "evict", "preemption_mode must be 'swap' or 'recompute'"),
    ("swap_space_gb", -1.0, "swap_space_gb must be a number of GiB >= 0"),
    ("host_kv_cache_gb", float("nan"), "host_kv_cache_gb must be a number of GiB >= 0"),
    ("enable_prefix_caching", "yes", "enable_prefix_caching must be a bool"),
])
def test_cache_config_validation(field, value, msg):
    from jserve.config import CacheConfig

    with pytest.raises(ValueError, match=msg):
        CacheConfig(**{field: value})
    c = CacheConfig()
    assert (c.enable_prefix_caching, c.swap_space_gb, c.host_kv_cache_gb, c.preemption_mode) == \
        (True, 4.0, 0.0, "swap")


def test_cli_flags_reach_engine_args():
    from jserve.cli import build_parser, engine_args_from

    ns = build_parser().parse_args(["generate", "--no-enable-prefix-caching", "--swap-space-gb", "2",
                                    "--host-kv-cache-gb", "1.5", "--preemption-mode", "recompute"])
    a = engine_args_from(ns)
    assert (a.enable_prefix_caching, a.swap_space_gb, a.host_kv_cache_gb, a.preemption_mode) == \
        (False, 2.0, 1.5, "recompute")
    a = engine_args_from(build_parser().parse_args(["generate"]))
    assert (a.enable_prefix_caching, a.swap_space_gb, a.host_kv_cache_gb, a.preemption_mode) == \
        (True, 4.0, 0.0, "swap")


def test_host_stores_are_sized_from_gib():
    import dataclasses

    from fixture_paths import GOLDEN

    from jserve.builder import EngineArgs, make_engine_config, resolve_model
    from jserve.host_kv import host_page_bytes, host_slot_counts
    from jserve.kv_manager import make_kv_manager

    args = EngineArgs(model=str(GOLDEN / "llama"), dtype="float32", max_model_len=128,
                      swap_space_gb=1 / 1024, host_kv_cache_gb=2 / 1024)
    cfg = make_engine_config(args, resolve_model(args)[0])
    kv = make_kv_manager(cfg, 20)
    page_bytes = 2 * 2 * 16 * 2 * 16 * 4  # layers * (K, V) * page * kv heads * head dim * f32
    assert host_page_bytes(cfg) == page_bytes
    assert kv.swap_space.num_slots == 2**20 // page_bytes
    assert kv.prefix_cache.host_tier.num_slots == 2 * 2**20 // page_bytes
    # The runner sizes its host pages by the same function: both sides agree.
    assert host_slot_counts(cfg) == kv.host_slot_counts() == \
        {"swap": 2**20 // page_bytes, "tier": 2 * 2**20 // page_bytes}
    off_cfg = dataclasses.replace(cfg, cache=dataclasses.replace(
        cfg.cache, enable_prefix_caching=False, preemption_mode="recompute"))
    off = make_kv_manager(off_cfg, 20)
    assert off.prefix_cache is None and off.swap_space is None
    assert host_slot_counts(off_cfg) == off.host_slot_counts() == {}
    tiny = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, swap_space_gb=1e-9))
    assert host_slot_counts(tiny) == {"tier": 2 * 2**20 // page_bytes}  # 0 slots: no store
    assert make_kv_manager(tiny, 20).swap_space is None


# ------------------------------------------------------------- the two halves of a host store


def test_host_slots_are_bookkeeping_only():
    from jserve.host_kv import HostSlots

    slots = HostSlots("swap", 4)
    a = slots.allocate(3)
    assert a == [0, 1, 2] and slots.num_free == 1 and not slots.valid.any()
    slots.mark_valid(a[:2])  # their to_host moves were scheduled
    assert slots.valid.tolist() == [True, True, False, False]
    with pytest.raises(AssertionError, match="unreserved"):
        slots.mark_valid([3])
    slots.free([a[0]])
    assert slots.valid.tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="not all reserved once"):
        slots.free([a[0]])
    with pytest.raises(ValueError, match="cannot allocate 3 slots"):
        slots.allocate(3)
    slots.check_invariants()


def test_host_pages_are_the_runners_data():
    from jserve.host_pages import HostPages

    pages = HostPages({"swap": 2, "tier": 3})
    assert pages and not HostPages({"swap": 0}) and not HostPages({})
    pages.put("tier", 2, np.arange(4))
    np.testing.assert_array_equal(pages.get("tier", 2), np.arange(4))
    np.testing.assert_array_equal(pages.get("tier", 2), np.arange(4))  # kept: read again
    with pytest.raises(AssertionError, match="never put"):
        pages.get("swap", 1)
    with pytest.raises(AssertionError, match="never put"):
        pages.get("tier", 0)
    with pytest.raises(AssertionError, match="outside"):
        pages.put("swap", 2, np.arange(4))
    with pytest.raises(AssertionError, match="no host store 'disk'"):
        pages.get("disk", 0)


def test_kv_manager_rejects_two_stores_of_one_name():
    from jserve.prefix_cache import PrefixCache

    pool = PagePool(8, PS)
    with pytest.raises(ValueError, match="share the store name 'swap'"):
        tier = PrefixCache(pool, host_tier=host_store(2, "swap"))
        KVCacheManager(pool, tier, host_store(2, "swap"), "swap")


def test_mover_moves_pages_through_named_host_stores():
    """``KVPageMover`` on the CPU backend (pinned host memory exists there too): gathers to host,
    copies, loads from host, addressed by (store name, slot); its host pages are its own."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jserve.kv_transfer import KVPageMover
    from jserve.scheduler_output import KVTransfers

    dev = jax.devices()[0]
    sharding = NamedSharding(Mesh(np.array([dev]), ("tp",)), PartitionSpec())
    rng = np.random.default_rng(0)
    kv = [tuple(jax.device_put(jnp.asarray(rng.standard_normal((12, PS, 2, 8)), jnp.float32), sharding)
                for _ in range(2)) for _ in range(2)]
    expect = [(np.asarray(k), np.asarray(v)) for k, v in kv]
    assert not KVPageMover(kv, 4, {}).host_moves
    mover = KVPageMover(kv, 4, {"swap": 3, "tier": 5})
    assert mover.host.num_slots == {"swap": 3, "tier": 5} and mover.host_moves
    with pytest.raises(AssertionError, match="never put"):
        mover.move(kv, KVTransfers(from_host=[("tier", 0, 1)]))
    slots = [("swap", 0), ("tier", 4), ("tier", 0), ("swap", 2), ("tier", 1)]  # 5 = 4 + 1: two buckets
    src, dst = [1, 2, 3, 4, 5], [7, 8, 9, 10, 11]
    # Gathers read before the copy overwrites page 2.
    kv = mover.move(kv, KVTransfers(copies=[(1, 2)], to_host=[(p, s, i) for p, (s, i) in
                                                              zip(src, slots, strict=True)]))
    assert all(isinstance(mover.host.get(s, i), jax.Array) for s, i in slots)
    kv = mover.move(kv, KVTransfers(from_host=[(s, i, p) for (s, i), p in zip(slots, dst, strict=True)]))
    for (k, v), (ek, ev) in zip(kv, expect, strict=True):
        for got, want in ((np.asarray(k), ek), (np.asarray(v), ev)):
            np.testing.assert_array_equal(got[dst], want[src])
            np.testing.assert_array_equal(got[2], want[1])
            np.testing.assert_array_equal(got[[0, 1, 3, 4, 5, 6]], want[[0, 1, 3, 4, 5, 6]])
