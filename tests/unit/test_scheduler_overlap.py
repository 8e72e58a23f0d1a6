"""The overlapped loop's one-step-late finishing rules (no model needed).

``LLMEngine.step`` schedules and dispatches step N+1 before it reads step N's tokens::

    schedule(N) -> run(N) -> schedule(N+1) -> run(N+1) -> update(N) -> schedule(N+2) ...

so a request may finish (EOS, stop, max_tokens, abort) while its next row is in flight. One
test per bug class async schedulers have hit: tokens emitted past a stop, rows wasted over the
last token, aborts racing the step, ``min_tokens`` bans off by the in-flight token, preemption
of a request whose token is in flight, prefix-cache entries over unknown tokens, usage that
counts dropped tokens, runner state that is never dropped, and a fork sibling copying a page
its leader writes in the same step. Hand-made ``RunnerOutput``s pin the exact interleaving;
fake_kv_runner's runner + ``Driver`` check the tokens against the plain-list reference.
"""

import pytest
from fake_kv_runner import Driver, FakeKVRunner, drive, fake_model, host_store, reference_generation

from jserve.config import SchedulerConfig
from jserve.kv_manager import KVCacheManager
from jserve.page_pool import PagePool
from jserve.prefix_cache import PrefixCache
from jserve.request import Request, RequestStatus
from jserve.sampling_params import SamplingParams
from jserve.scheduler import Scheduler
from jserve.scheduler_output import RunnerOutput, SchedulerOutput

PS = 4
ABORT = RequestStatus.FINISHED_ABORTED
STOPPED = RequestStatus.FINISHED_STOPPED
LENGTH = RequestStatus.FINISHED_LENGTH
MODES = pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])


def make_sched(num_pages=33, prefix=False, swap_slots=0, mode="recompute", **cfg):
    cfg.setdefault("max_num_seqs", 8)
    cfg.setdefault("max_num_batched_tokens", 32)
    cfg.setdefault("max_model_len", 64)
    pool = PagePool(num_pages, PS)
    pc = PrefixCache(pool) if prefix else None
    swap = host_store(swap_slots, "swap") if swap_slots else None
    return Scheduler(SchedulerConfig(**cfg), KVCacheManager(pool, pc, swap, mode))


def req(rid, n_prompt=4, max_tokens=8, eos=(), seed=0, first=10, **sp):
    return Request(rid, list(range(first, first + n_prompt)), SamplingParams(max_tokens=max_tokens, **sp),
                   eos_token_ids=eos, seed=seed)


def res(out: SchedulerOutput, tokens) -> RunnerOutput:
    """Hand-made result: ``tokens`` (an int, or id -> int) for each sampling row."""
    pick = (lambda c: tokens) if isinstance(tokens, int) else (lambda c: tokens[c.req_id])
    return RunnerOutput([[pick(c)] if c.samples else [] for c in out.chunks])


def row(out: SchedulerOutput, rid: str):
    (c,) = [c for c in out.chunks if c.req_id == rid]
    return c


# ------------------------------------------------------------------ EOS / stop found late


def test_eos_while_the_next_row_is_in_flight_emits_nothing_past_it_and_frees_pages():
    sched = make_sched()
    r, other = req("r", eos=(2,)), req("o", first=30)
    sched.add_request(r)
    sched.add_request(other)
    o1 = sched.schedule()                 # both: prompt rows, sampling output 0
    o2 = sched.schedule()                 # both: decode rows over the in-flight tokens
    c = row(o2, "r")
    assert (c.start, c.num_tokens, c.token_ids, c.num_placeholders) == (4, 1, (), 1)
    assert c.samples and c.output_index == 1 and c.page_start == 1 and len(c.page_ids) == 1
    in_flight_page = c.page_ids[0]        # allocated for the in-flight row
    assert sched.update(o1, res(o1, {"r": 2, "o": 5})) == [r, other]
    assert r.status is STOPPED and r.stop_reason == 2 and r.output_token_ids == [2]
    assert r.page_ids == [] and sched.get_request("r") is None
    assert sched.pool.refcounts[in_flight_page] == 0
    assert sched.pool.num_used == len(other.page_ids)
    assert sched.update(o2, res(o2, {"r": 9, "o": 6})) == [other]  # r's late token: dropped
    assert r.output_token_ids == [2] and r.num_output_tokens == 1 and other.output_token_ids == [5, 6]
    o3 = sched.schedule()
    assert [c.req_id for c in o3.chunks] == ["o"] and o3.dropped == ["r"]
    sched.kv.check_invariants([other])


@MODES
def test_eos_found_late_matches_the_reference_and_usage_counts_emitted_tokens(overlap):
    """The fake model's first token is made an EOS (min_tokens bans it once): requests stop
    at EOS, at max_tokens and at max_model_len while their next rows are in flight."""
    sched = make_sched(max_model_len=20)
    reqs = []
    for i in range(6):
        probe = req(f"r{i}", n_prompt=3 + i, seed=i)
        eos = (fake_model(probe.prompt_token_ids, i),)
        reqs.append(req(f"r{i}", n_prompt=3 + i, seed=i, eos=eos, max_tokens=None if i == 5 else 4 + i,
                        min_tokens=i % 2))
    for r in reqs:
        sched.add_request(r)
    d = drive(sched, FakeKVRunner(sched.pool, sched.kv.host_slot_counts()), overlap)
    for r in reqs:
        assert (r.output_token_ids, r.status) == reference_generation(r, sched.max_model_len)
        assert d.emitted[r.request_id] == r.num_output_tokens == len(r.output_token_ids)
        assert r.num_tokens == r.num_prompt_tokens + r.num_output_tokens
    statuses = {r.status for r in reqs}
    assert statuses == {STOPPED, LENGTH}
    assert sched.pool.num_used == 0


# ------------------------------------------------------------------------- max_tokens


@pytest.mark.parametrize("max_tokens", [1, 2, 5])
@MODES
def test_max_tokens_reached_no_row_over_the_final_placeholder(max_tokens, overlap):
    sched = make_sched()
    r = req("r", max_tokens=max_tokens, ignore_eos=True)
    sched.add_request(r)
    sampling = []
    d = drive(sched, FakeKVRunner(sched.pool, sched.kv.host_slot_counts()), overlap,
              on_schedule=lambda out: sampling.extend(c.output_index for c in out.chunks if c.samples))
    assert sampling == list(range(max_tokens))  # one sampling row per token, none wasted
    assert (r.output_token_ids, r.status) == reference_generation(r, sched.max_model_len)
    assert r.status is LENGTH and d.emitted["r"] == max_tokens


def test_max_model_len_reached_no_row_over_the_final_placeholder():
    sched = make_sched(max_model_len=13)
    r = req("r", n_prompt=10, max_tokens=None, ignore_eos=True)
    sched.add_request(r)
    o1 = sched.schedule()
    o2 = sched.schedule()
    sched.update(o1, res(o1, 5))
    o3 = sched.schedule()
    assert [c.start for c in (*o1.chunks, *o2.chunks, *o3.chunks)] == [0, 10, 11]
    assert sched.schedule().chunks == []  # token 13 would pass max_model_len: no row
    sched.update(o2, res(o2, 6))
    sched.update(o3, res(o3, 7))
    assert r.output_token_ids == [5, 6, 7] and r.status is LENGTH and r.num_tokens == 13


# ------------------------------------------------------------------------------ aborts


@pytest.mark.parametrize("status", [ABORT, STOPPED])
def test_abort_between_schedule_and_update_drops_that_rows_token_and_frees_pages(status):
    """An abort (or a stop string the engine found) lands while two rows of the request are in
    flight (overlapped): neither token is appended, its pages are free at once."""
    sched = make_sched()
    a, b = req("a"), req("b", first=30)
    sched.add_request(a)
    sched.add_request(b)
    o1 = sched.schedule()
    o2 = sched.schedule()
    held = list(a.page_ids)
    sched.finish_request("a", status, stop_reason="</s>" if status is STOPPED else None)
    assert a.status is status and a.page_ids == [] and (sched.pool.refcounts[held] == 0).all()
    assert sched.update(o1, res(o1, 11)) == [b]
    assert sched.update(o2, res(o2, 12)) == [b]
    assert a.output_token_ids == [] and b.output_token_ids == [11, 12]
    o3 = sched.schedule()
    assert [c.req_id for c in o3.chunks] == ["b"] and o3.dropped == ["a"]
    sched.kv.check_invariants([b])


@MODES
def test_aborts_in_flight_with_the_fake_runner_no_leaks(overlap):
    sched = make_sched(num_pages=13, max_num_batched_tokens=16)
    reqs = [req(f"r{i}", n_prompt=3 + 2 * i, seed=i, max_tokens=6 + i, ignore_eos=True) for i in range(6)]
    for r in reqs:
        sched.add_request(r)
    victims = ["r1", "r4", "r2"]
    aborted = []

    def in_flight(out):  # after run(out), before the update that follows: its rows are in flight
        if d.steps > 2 and victims and any(c.req_id == victims[0] for c in out.chunks):
            sched.finish_request(victims[0], ABORT)
            aborted.append(victims.pop(0))

    d = Driver(sched, FakeKVRunner(sched.pool, sched.kv.host_slot_counts()), overlap)
    d.drain(in_flight=in_flight)
    assert aborted == ["r1", "r4", "r2"]
    for r in reqs:
        ref = reference_generation(r, sched.max_model_len)
        if r.request_id in aborted:
            assert r.status is ABORT and r.output_token_ids == ref[0][:r.num_output_tokens]
        else:
            assert (r.output_token_ids, r.status) == ref
        assert d.emitted.get(r.request_id, 0) == r.num_output_tokens
    sched.kv.check_invariants([])
    assert sched.pool.num_used == 0


# -------------------------------------------------------------------------- min_tokens


def test_min_tokens_bans_use_the_output_index_that_counts_the_in_flight_token():
    sched = make_sched()
    r = req("r", eos=(2,), stop_token_ids=(42,), min_tokens=2)
    sched.add_request(r)
    o1 = sched.schedule()
    o2 = sched.schedule()                 # over the in-flight output 0: samples output 1
    assert (row(o1, "r").output_index, row(o2, "r").output_index) == (0, 1)
    assert set(row(o1, "r").banned_ids) == set(row(o2, "r").banned_ids) == {2, 42}
    sched.update(o1, res(o1, 7))
    o3 = sched.schedule()                 # output 2: min_tokens reached, nothing banned
    assert row(o3, "r").output_index == 2 and row(o3, "r").banned_ids == ()
    sched.update(o2, res(o2, 8))
    o4 = sched.schedule()
    assert row(o4, "r").output_index == 3 and row(o4, "r").banned_ids == ()
    sched.update(o3, res(o3, 2))          # EOS at output 2: stops
    sched.update(o4, res(o4, 9))          # dropped
    assert r.output_token_ids == [7, 8, 2] and r.status is STOPPED


@MODES
def test_min_tokens_ban_applies_to_the_right_token(overlap):
    """The fake model's natural first two tokens are made EOS / stop ids; with min_tokens=2 the
    runner must ban them exactly at output indices 0 and 1 (a ban off by one changes tokens)."""
    sched = make_sched()
    reqs = []
    for i in range(4):
        p = list(range(10 + i, 14 + 2 * i))
        t0 = fake_model(p, i)
        t1 = fake_model(p + [t0], i)
        r = Request(f"r{i}", p, SamplingParams(max_tokens=6, min_tokens=2, stop_token_ids=(t1,)),
                    eos_token_ids=(t0,), seed=i)
        reqs.append(r)
        sched.add_request(r)
    drive(sched, FakeKVRunner(sched.pool, sched.kv.host_slot_counts()), overlap)
    for r in reqs:
        assert (r.output_token_ids, r.status) == reference_generation(r, sched.max_model_len)
        assert r.output_token_ids[0] not in r.eos_token_ids + r.sampling_params.stop_token_ids


# -------------------------------------------------------------------------- penalties


def test_penalty_rows_run_over_the_in_flight_token():
    """Penalty statistics live on the device: a penalty request sends its history once, when it
    takes a runner slot, and then runs over placeholders like any other request."""
    sched = make_sched()
    p, o = req("p", repetition_penalty=1.2), req("o", first=30)
    sched.add_request(p)
    sched.add_request(o)
    o1 = sched.schedule()
    new = row(o1, "p").new
    assert new.history == tuple(p.prompt_token_ids) and new.num_prompt == 4
    assert row(o1, "o").new.history is None  # no penalties: nothing sent
    o2 = sched.schedule()
    c = row(o2, "p")
    assert c.num_placeholders == 1 and c.new is None and c.output_index == 1
    sched.update(o1, res(o1, {"p": 5, "o": 6}))
    o3 = sched.schedule()
    assert row(o3, "p").num_placeholders == 1 and row(o3, "p").token_ids == ()


# ------------------------------------------------------------------------- preemption


@pytest.mark.parametrize("penalties", [False, True], ids=["plain", "penalties"])
@pytest.mark.parametrize("swap_slots, mode", [(8, "swap"), (0, "recompute")])
@MODES
def test_preempted_with_its_token_in_flight_gets_the_token_and_resumes(swap_slots, mode, overlap,
                                                                       penalties):
    # 6 usable pages of 4 tokens; each request grows to 8 + 12 = 20 tokens = 5 pages.
    sched = make_sched(num_pages=7, swap_slots=swap_slots, mode=mode)
    pen = dict(presence_penalty=0.5) if penalties else {}
    a = Request("a", list(range(10, 18)), SamplingParams(max_tokens=12, ignore_eos=True, **pen), seed=1)
    b = Request("b", list(range(20, 28)), SamplingParams(max_tokens=12, ignore_eos=True, **pen), seed=2)
    sched.add_request(a)
    sched.add_request(b)
    seen = {}

    def on_schedule(out):
        if out.num_preempted and "pre" not in seen:
            assert b.status is RequestStatus.PREEMPTED and "b" in out.dropped
            seen["pre"] = (b.num_placeholders, b.num_output_tokens, b.num_tokens, b.num_computed_tokens)
        elif "pre" in seen and "resume" not in seen and any(c.req_id == "b" for c in out.chunks):
            c = row(out, "b")
            seen["resume"] = (c.start, c.num_placeholders, c.new is not None, b.num_output_tokens,
                              c.token_ids)
            # the penalty history it takes a new runner slot with: prompt + every output so far
            want = (*b.prompt_token_ids, *b.output_token_ids) if penalties else None
            assert c.new.history == want and c.new.num_prompt == (8 if penalties else 0)

    drive(sched, FakeKVRunner(sched.pool, sched.kv.host_slot_counts()), overlap, on_schedule=on_schedule)
    placeholders, n_out, n_tok, computed = seen["pre"]
    start, ph, new, n_out_resumed, token_ids = seen["resume"]
    assert placeholders == (1 if overlap else 0)   # its token was in flight when preempted
    assert n_out_resumed == n_out + placeholders   # ... and landed before it resumed
    assert new and ph == 0                         # a fresh runner row, all tokens known
    if mode == "swap":
        assert start == computed                   # where it was: nothing recomputed
    else:
        assert start == 0 and len(token_ids) == n_tok + placeholders
    for r in (a, b):
        assert (r.output_token_ids, r.status) == reference_generation(r, sched.max_model_len)
    s = sched.kv_stats()
    assert s[f"preemptions_{mode}"] >= 1
    assert sched.pool.num_used == 0 and (sched.kv.swap_space is None or sched.kv.swap_space.num_used == 0)


def test_abort_of_a_request_preempted_with_its_token_in_flight():
    sched = make_sched(num_pages=7, swap_slots=8, mode="swap")
    a = Request("a", list(range(10, 18)), SamplingParams(max_tokens=12, ignore_eos=True), seed=1)
    b = Request("b", list(range(20, 28)), SamplingParams(max_tokens=12, ignore_eos=True), seed=2)
    sched.add_request(a)
    sched.add_request(b)
    d = Driver(sched, FakeKVRunner(sched.pool, sched.kv.host_slot_counts()), overlap=True)
    seen = []

    def in_flight(out):  # the plan that preempted b ran; b's last row's result is not read yet
        if out.num_preempted and not seen:
            assert b.status is RequestStatus.PREEMPTED and b.num_placeholders == 1 and b.swap_slots
            seen.append(b.num_output_tokens)
            sched.finish_request("b", ABORT)
            assert not b.swap_slots and sched.kv.swap_space.num_used == 0

    d.drain(in_flight=in_flight)
    assert seen and b.num_output_tokens == seen[0] and b.status is ABORT
    assert (a.output_token_ids, a.status) == reference_generation(a, sched.max_model_len)
    assert sched.pool.num_used == 0 and sched.kv.swap_space.num_used == 0


# ------------------------------------------------------------------------ prefix cache


@pytest.mark.parametrize("first_token", [2, 5], ids=["eos", "continues"])
def test_prefix_cache_never_indexes_a_placeholder_position(first_token):
    """Prompt of 7 tokens (page 1 = positions 4..7): the in-flight row computes position 7
    over a placeholder. Page 1 is indexed only once token 7 is known, and never when the
    request stops there."""
    sched = make_sched(prefix=True)
    pc = sched.kv.prefix_cache
    r = req("r", n_prompt=7, eos=(2,))
    sched.add_request(r)
    o1 = sched.schedule()
    o2 = sched.schedule()
    assert row(o2, "r").num_placeholders == 1 and r.num_computed_tokens == 8 and r.num_tokens == 7
    assert pc.num_entries == 0
    sched.update(o1, res(o1, first_token))
    entries = [pc.entry_of_page(p) for p in range(sched.pool.num_pages)]
    entries = [e for e in entries if e is not None]
    if first_token == 2:  # stopped: page 1's last position holds a token nobody computes on
        assert [e.token_ids for e in entries] == [(10, 11, 12, 13)]
    else:
        assert [e.token_ids for e in entries] == [(10, 11, 12, 13), (14, 15, 16, first_token)]
    sched.update(o2, res(o2, 6))
    assert all(len(e.token_ids) == PS for e in entries)
    pc.check_invariants()


@MODES
def test_prefix_hits_under_overlap_serve_only_computed_pages(overlap):
    """Requests sharing a prompt arrive while the first one's rows are in flight; the driver
    checks after every step that each indexed page holds exactly its entry's tokens."""
    sched = make_sched(num_pages=41, prefix=True)
    prompt = list(range(10, 27))  # 17 tokens: 4 full pages + 1
    first = Request("first", prompt, SamplingParams(max_tokens=6, ignore_eos=True), seed=3)
    sched.add_request(first)
    d = Driver(sched, FakeKVRunner(sched.pool, sched.kv.host_slot_counts()), overlap)
    later = []
    for i in range(6):
        d.step()
        r = Request(f"r{i}", prompt + [i] * i, SamplingParams(max_tokens=5, ignore_eos=True), seed=i)
        sched.add_request(r)
        later.append(r)
    d.drain()
    for r in [first, *later]:
        assert (r.output_token_ids, r.status) == reference_generation(r, sched.max_model_len)
    assert sum(r.num_cached_tokens for r in later) > 0


# ------------------------------------------------------------------ n > 1 forks, drops


@MODES
def test_fork_siblings_share_only_pages_an_earlier_step_computed(overlap):
    """A sibling copies the leader's partial prompt page: the copy runs before the step's
    forward, so it must wait for a step after the leader's prompt row."""
    sched = make_sched(prefix=True)
    prompt = list(range(30, 40))  # 10 tokens: pages 0, 1 full, page 2 partial
    lead = Request("p#0", prompt, SamplingParams(max_tokens=6, ignore_eos=True), seed=1)
    sibs = [lead] + [Request(f"p#{i}", prompt, SamplingParams(max_tokens=6, ignore_eos=True), seed=1 + i,
                             fork_of=lead) for i in range(1, 4)]
    for r in sibs:
        sched.add_request(r)
    steps = []
    drive(sched, FakeKVRunner(sched.pool, sched.kv.host_slot_counts()), overlap,
          on_schedule=lambda out: steps.append([(c.req_id, c.start) for c in out.chunks]))
    assert steps[0] == [("p#0", 0)]  # the siblings wait for a step after the leader's prompt
    assert steps[1] == [("p#0", 10)] + [(f"p#{i}", 9) for i in range(1, 4)]  # shared to token 9
    for r in sibs:
        assert (r.output_token_ids, r.status) == reference_generation(r, sched.max_model_len)
    assert sched.kv_stats()["cow_copies"] == 3


def test_drops_reach_the_runner_when_a_plan_has_no_rows():
    """Overlapped: a finishes while b's last token is in flight, so the next plan has no rows;
    a's drop must still reach the runner (else the runner keeps a's state forever). The
    driver checks after every dispatched plan that the runner holds exactly the running ids."""
    sched = make_sched()
    a = req("a", max_tokens=1, ignore_eos=True)
    b = req("b", max_tokens=2, ignore_eos=True, first=30)
    sched.add_request(a)
    sched.add_request(b)
    runner = FakeKVRunner(sched.pool, sched.kv.host_slot_counts())
    d = Driver(sched, runner, overlap=True)
    plans = []
    d.drain(on_schedule=plans.append)
    assert [[c.req_id for c in p.chunks] for p in plans] == [["a", "b"], ["b"], []]
    sched.add_request(req("c", max_tokens=1, first=50))
    d.drain()
    assert set(runner.rows) <= {"c"} and not sched.has_unfinished()
    sched.add_request(req("e", max_tokens=1, first=60))
    d.step()
    assert set(runner.rows) == {"e"}
