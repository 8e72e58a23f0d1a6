"""Scheduler: continuous batching, chunked prefill, preemption, stop checks. No model needed:
the runner is replaced by hand-made ``RunnerOutput``s (or, in the randomized test, by
fake_kv_runner's runner, which writes token ids into a host copy of the paged KV pool and
"samples" a hash of what it reads back, so a page mix-up changes the generated tokens; run
synchronously and overlapped). The one-step-late finishing rules of the overlapped loop have
their own tests in test_scheduler_overlap.py."""

import random

import pytest
from fake_kv_runner import VOCAB, Driver, FakeKVRunner, abort_in_flight, reference_generation

from jserve.config import SchedulerConfig
from jserve.page_pool import PagePool
from jserve.request import Request, RequestStatus
from jserve.sampling_params import SamplingParams
from jserve.scheduler import QueueFullError, Scheduler
from jserve.scheduler_output import RunnerOutput, SchedulerOutput

ABORT = RequestStatus.FINISHED_ABORTED


def make_req(rid: str, prompt_len: int, max_tokens: int | None = 16, eos: tuple[int, ...] = (),
             **sp) -> Request:
    prompt = [100 + (i % 50) for i in range(prompt_len)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **sp), eos_token_ids=eos)


def make_sched(num_pages: int = 65, page_size: int = 4, **cfg) -> Scheduler:
    cfg.setdefault("max_num_seqs", 8)
    cfg.setdefault("max_num_batched_tokens", 32)
    cfg.setdefault("max_model_len", 256)
    return Scheduler(SchedulerConfig(**cfg), PagePool(num_pages, page_size))


def check_output(sched: Scheduler, out: SchedulerOutput) -> None:
    """What every SchedulerOutput must satisfy, checked right after schedule()."""
    cfg = sched.config
    assert out.num_tokens <= cfg.max_num_batched_tokens
    assert out.num_seqs <= cfg.max_num_seqs
    assert len({c.req_id for c in out.chunks}) == out.num_seqs
    for c in out.chunks:
        r = sched.get_request(c.req_id)
        assert r.status is RequestStatus.RUNNING and c.num_tokens >= 1
        assert c.start + c.num_tokens == r.num_computed_tokens  # advanced: the row is in flight
        # a sampling row reaches the end and leaves a placeholder just past it
        end, total = c.start + c.num_tokens, r.num_tokens + r.num_placeholders
        assert end + 1 == total if c.samples else end < total
        assert len(r.page_ids) >= sched.pool.pages_needed(c.start + c.num_tokens)
    check_pages(sched)


def check_pages(sched: Scheduler) -> None:
    sched.pool.check_invariants()
    held = [p for r in sched.running for p in r.page_ids]
    assert len(held) == len(set(held)) == sched.pool.num_used
    assert 0 not in held
    assert all(not r.page_ids for r in sched.waiting)


def sampled(out: SchedulerOutput, token=lambda c: 1) -> RunnerOutput:
    """A hand-made result: ``token(chunk)`` for each sampling row, nothing for the others."""
    return RunnerOutput([[token(c)] if c.samples else [] for c in out.chunks])


def step(sched: Scheduler, tokens=None) -> tuple[SchedulerOutput, list[Request]]:
    """One schedule/update; ``tokens``: a callable chunk -> token id (default 1)."""
    out = sched.schedule()
    check_output(sched, out)
    touched = sched.update(out, sampled(out, tokens or (lambda c: 1)))
    check_pages(sched)
    return out, touched


def rows(sched: Scheduler) -> tuple[list[tuple[str, int, int, bool]], list[Request]]:
    """One step; its rows as (id, start, num_tokens, samples); every sampled token is 7."""
    out = sched.schedule()
    check_output(sched, out)
    seen = [(c.req_id, c.start, c.num_tokens, c.samples) for c in out.chunks]
    touched = sched.update(out, sampled(out, lambda c: 7))
    check_pages(sched)
    return seen, touched


def run_to_completion(sched: Scheduler, tokens=None, max_steps: int = 10_000) -> int:
    for n in range(max_steps):
        if not sched.has_unfinished():
            return n
        step(sched, tokens)
    raise AssertionError("requests did not finish")


# --------------------------------------------------------------------------- batching


def test_budget_and_rows_respected_every_step():
    sched = make_sched(max_num_seqs=4, max_num_batched_tokens=16)
    reqs = [make_req(f"r{i}", 5 + 7 * i, max_tokens=5) for i in range(10)]
    for r in reqs:
        sched.add_request(r)
    run_to_completion(sched)  # step() checks budget and rows after each schedule()
    assert all(r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 5 for r in reqs)
    assert sched.pool.num_free == sched.pool.num_total


def test_chunked_prefill_then_decode():
    sched = make_sched(max_num_batched_tokens=32)
    r = make_req("a", 100, max_tokens=3)
    sched.add_request(r)
    seen = []
    for _ in range(6):
        ((_, start, n, samples),), touched = rows(sched)
        seen.append((start, n, samples))
        assert touched == ([r] if samples else [])
    assert seen == [(0, 32, False), (32, 32, False), (64, 32, False), (96, 4, True),
                    (100, 1, True), (101, 1, True)]
    assert r.output_token_ids == [7, 7, 7] and r.status is RequestStatus.FINISHED_LENGTH
    assert r.num_computed_tokens == 102 and not sched.has_unfinished()
    assert r.page_ids == [] and sched.pool.num_free == sched.pool.num_total


def test_decodes_and_prefill_chunk_mixed_in_one_step():
    sched = make_sched(max_num_batched_tokens=32)
    a, b = make_req("a", 10), make_req("b", 50)
    sched.add_request(a)
    step(sched)  # a: prefill 10 -> one token
    sched.add_request(b)
    assert rows(sched)[0] == [("a", 10, 1, True), ("b", 0, 31, False)]
    assert rows(sched)[0] == [("a", 11, 1, True), ("b", 31, 19, True)]
    assert a.num_output_tokens == 3 and b.num_output_tokens == 1


def test_fcfs_admission_no_skipping():
    # 8 usable pages of 4 tokens. "big" needs 6 pages for its prompt, "small" 1.
    sched = make_sched(num_pages=9, max_num_batched_tokens=64)
    first = make_req("first", 12, max_tokens=4)  # 3 pages (4 at the end)
    big, small = make_req("big", 24, max_tokens=2), make_req("small", 3, max_tokens=2)
    sched.add_request(first)
    out, _ = step(sched)
    sched.add_request(big)
    sched.add_request(small)
    out, _ = step(sched)
    # big doesn't fit (needs 6, 4 free after first grows); small would, but must not overtake.
    assert [c.req_id for c in out.chunks] == ["first"]
    assert list(sched.waiting) == [big, small]
    run_to_completion(sched)
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in (first, big, small))


def test_admission_order_is_arrival_order():
    sched = make_sched(max_num_seqs=3, max_num_batched_tokens=64)
    reqs = [make_req(f"r{i}", 4, max_tokens=3) for i in range(7)]
    for r in reqs:
        sched.add_request(r)
    admitted = []
    while sched.has_unfinished():
        out, _ = step(sched)
        admitted += [c.req_id for c in out.chunks if c.start == 0]
        assert sched.num_running <= 3
    assert admitted == [r.request_id for r in reqs]


# ------------------------------------------------------------------------- preemption


def test_preemption_newest_first_then_resumed_with_recompute():
    # 6 usable pages x 4 tokens; each request grows to 8 + 12 = 20 tokens = 5 pages.
    sched = make_sched(num_pages=7, max_num_batched_tokens=32)
    a, b = make_req("a", 8, max_tokens=12), make_req("b", 8, max_tokens=12)
    sched.add_request(a)
    sched.add_request(b)
    preempted_at = None
    resumed = None
    for n in range(200):
        if not sched.has_unfinished():
            break
        out, _ = step(sched, lambda c: 3 + c.output_index)
        if out.num_preempted and preempted_at is None:
            # the newest is preempted, never the oldest; the runner forgets it
            assert out.num_preempted == 1 and out.dropped == ["b"]
            assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
            assert b.page_ids == [] and sched.waiting[0] is b
            assert [c.req_id for c in out.chunks] == ["a"]
            preempted_at = (n, b.num_tokens)
        if preempted_at and resumed is None and any(c.req_id == "b" for c in out.chunks):
            (c,) = [c for c in out.chunks if c.req_id == "b"]
            assert c.new is not None and c.page_start == 0  # a fresh runner row
            resumed = (c.start, c.num_tokens)
    assert preempted_at is not None, "the tiny pool must force a preemption"
    assert a.num_preemptions == 0 and b.num_preemptions >= 1
    # Resumed from scratch: prompt and the tokens it had generated are recomputed.
    assert resumed == (0, preempted_at[1]) and preempted_at[1] > 8
    for r in (a, b):
        assert r.status is RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == list(range(3, 15))
    assert sched.pool.num_free == sched.pool.num_total


def test_request_being_scheduled_preempts_itself_when_newest():
    # 3 usable pages of 4 tokens. a (2 tokens) holds 1 page, b (8 tokens) holds 2 full pages.
    sched = make_sched(num_pages=4, max_num_batched_tokens=32)
    a, b = make_req("a", 2, max_tokens=4), make_req("b", 8, max_tokens=2)
    c = make_req("c", 1, max_tokens=1)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # a: [0, 2), b: [0, 8); both sample. Pool full.
    sched.add_request(c)
    out = sched.schedule()  # a: pos 2 fits its page; b: pos 8 needs a 3rd page and b is newest
    check_output(sched, out)
    assert out.num_preempted == 1 and out.dropped == ["b"] and [ch.req_id for ch in out.chunks] == ["a"]
    assert b.status is RequestStatus.PREEMPTED and b.page_ids == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b, c]  # no admission in a step that preempted
    sched.update(out, RunnerOutput([[1]]))
    run_to_completion(sched)
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in (a, b, c))
    assert b.output_token_ids == [1, 1] and a.output_token_ids == [1] * 4


def test_a_running_request_always_has_a_token_to_compute():
    sched = make_sched()
    r = make_req("a", 4)
    sched.add_request(r)
    step(sched)
    r.num_computed_tokens = r.num_tokens  # corrupt: nothing left to compute
    with pytest.raises(AssertionError, match="nothing to compute"):
        sched.schedule()


# ---------------------------------------------------------------------- stop checks


def finish_one(tokens: list[int], prompt_len: int = 4, **kw) -> Request:
    sched = make_sched(**{k: kw.pop(k) for k in ("max_model_len",) if k in kw})
    r = make_req("x", prompt_len, **kw)
    sched.add_request(r)
    it = iter(tokens)
    while sched.has_unfinished():
        step(sched, lambda c: next(it))
    assert sched.pool.num_free == sched.pool.num_total
    return r


def test_max_tokens_finishes_with_length():
    r = finish_one([5] * 10, max_tokens=4)
    assert r.output_token_ids == [5] * 4 and r.finish_reason == "length" and r.stop_reason is None


def test_eos_stops_and_is_kept_in_output():
    r = finish_one([5, 6, 2, 7], eos=(2, 9))
    assert r.output_token_ids == [5, 6, 2] and r.finish_reason == "stop" and r.stop_reason == 2


def test_stop_token_ids_stop():
    r = finish_one([5, 6, 42, 7], stop_token_ids=(42,))
    assert r.output_token_ids == [5, 6, 42] and r.status is RequestStatus.FINISHED_STOPPED
    assert r.stop_reason == 42


def test_min_tokens_suppresses_early_stop():
    r = finish_one([2, 42, 5, 2, 9], eos=(2,), stop_token_ids=(42,), min_tokens=3)
    assert r.output_token_ids == [2, 42, 5, 2] and r.stop_reason == 2
    r = finish_one([2, 42, 5, 2, 9], eos=(2,), stop_token_ids=(42,), min_tokens=2)
    assert r.output_token_ids == [2, 42] and r.stop_reason == 42


def test_ignore_eos_keeps_going_but_stop_token_ids_still_stop():
    r = finish_one([2, 2, 2, 2], eos=(2,), ignore_eos=True, max_tokens=3)
    assert r.output_token_ids == [2, 2, 2] and r.finish_reason == "length"
    r = finish_one([2, 2, 8, 2], eos=(2,), ignore_eos=True, stop_token_ids=(8,))
    assert r.output_token_ids == [2, 2, 8] and r.stop_reason == 8


def test_max_tokens_wins_over_eos_on_the_same_token():
    r = finish_one([5, 2], eos=(2,), max_tokens=2)
    assert r.output_token_ids == [5, 2] and r.finish_reason == "length"


def test_max_model_len_finishes_with_length():
    r = finish_one([5] * 100, prompt_len=10, max_tokens=None, max_model_len=16)
    assert r.num_tokens == 16 and r.num_output_tokens == 6 and r.finish_reason == "length"
    r = finish_one([5] * 100, prompt_len=16, max_tokens=None, max_model_len=16)
    assert r.num_output_tokens == 1 and r.finish_reason == "length"


def test_max_model_len_is_capped_by_the_pool():
    sched = make_sched(num_pages=5, page_size=4, max_model_len=64)  # 16 tokens fit
    assert sched.max_model_len == 16
    r = make_req("a", 10, max_tokens=None)
    sched.add_request(r)
    run_to_completion(sched)
    assert r.num_tokens == 16 and r.finish_reason == "length"


def test_logprobs_entries():
    sched = make_sched()
    r2, r0, rn = (make_req("two", 3, max_tokens=1, logprobs=2), make_req("zero", 3, max_tokens=1, logprobs=0),
                  make_req("none", 3, max_tokens=1))
    for r in (r2, r0, rn):
        sched.add_request(r)
    out = sched.schedule()
    ro = RunnerOutput([[4], [5], [6]], logprobs=[[-0.5], [-1.0], [-1.5]],
                      top_ids=[[[4, 9, 1]]] * 3, top_logprobs=[[[-0.5, -2.0, -3.0]]] * 3)
    assert sched.update(out, ro) == [r2, r0, rn]
    assert r2.output_logprobs == [(-0.5, [(4, -0.5), (9, -2.0)])]
    assert r0.output_logprobs == [(-1.0, [])]
    assert rn.output_logprobs == []


# ---------------------------------------------------------------- aborts and admission


def test_abort_waiting_and_running_frees_pages():
    sched = make_sched(max_num_seqs=1)
    a, b = make_req("a", 20), make_req("b", 20)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    assert a.page_ids and sched.num_running == 1 and sched.num_waiting == 1
    sched.finish_request("b", ABORT)
    assert b.status is ABORT and sched.num_waiting == 0 and sched.get_request("b") is None
    sched.finish_request("a", ABORT)
    assert a.status is ABORT and a.page_ids == [] and sched.num_running == 0
    assert sched.pool.num_free == sched.pool.num_total and not sched.has_unfinished()
    sched.finish_request("a", ABORT)  # idempotent
    sched.finish_request("nope", ABORT)
    assert a.status is ABORT
    with pytest.raises(ValueError, match="finished status"):
        sched.finish_request("a", RequestStatus.RUNNING)


def test_abort_between_schedule_and_update_skips_the_row():
    sched = make_sched()
    a, b = make_req("a", 5), make_req("b", 5)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.finish_request("a", ABORT)
    touched = sched.update(out, RunnerOutput([[11], [12]]))
    assert touched == [b] and a.output_token_ids == [] and b.output_token_ids == [12]
    check_pages(sched)


def test_stop_string_finish_keeps_reason():
    sched = make_sched()
    r = make_req("a", 5)
    sched.add_request(r)
    step(sched)
    sched.finish_request("a", RequestStatus.FINISHED_STOPPED, stop_reason="</s>")
    assert r.finish_reason == "stop" and r.stop_reason == "</s>" and r.page_ids == []


def test_queue_full():
    sched = make_sched(max_waiting=2)
    sched.add_request(make_req("a", 4))
    sched.add_request(make_req("b", 4))
    with pytest.raises(QueueFullError, match="waiting queue is full \\(2 requests\\)"):
        sched.add_request(make_req("c", 4))
    assert isinstance(QueueFullError("x"), RuntimeError)
    step(sched)  # both admitted: room again
    sched.add_request(make_req("c", 4))


def test_unservable_prompts_rejected():
    sched = make_sched(num_pages=9, page_size=4, max_model_len=64)  # pool: 32 tokens
    with pytest.raises(ValueError, match="prompt length 65 exceeds max_model_len 64"):
        sched.add_request(make_req("a", 65))
    with pytest.raises(ValueError, match="prompt length 33 needs 9 KV pages, the pool has 8"):
        sched.add_request(make_req("b", 33))
    with pytest.raises(ValueError, match="empty prompt"):
        sched.add_request(make_req("c", 0))
    sched.add_request(make_req("d", 32))
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add_request(make_req("d", 3))
    assert sched.num_waiting == 1


# ------------------------------------------------------------------------ randomized


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_randomized_1000_requests_no_leaks_and_same_tokens_as_alone(overlap):
    rng = random.Random(1234)
    sched = make_sched(num_pages=97, page_size=4, max_num_seqs=16, max_num_batched_tokens=64,
                       max_model_len=160, max_waiting=48)
    runner = FakeKVRunner(sched.pool)
    driver = Driver(sched, runner, overlap)
    pending = []
    for i in range(1000):
        max_tokens = None if rng.random() < 0.03 else rng.randint(1, 40)
        sp = dict(max_tokens=max_tokens,
                  min_tokens=rng.randint(0, min(3, max_tokens or 3)),
                  ignore_eos=rng.random() < 0.1,
                  stop_token_ids=tuple(rng.sample(range(VOCAB), rng.randint(0, 1))))
        r = Request(f"r{i}", [rng.randrange(VOCAB) for _ in range(rng.randint(1, 140))],
                    SamplingParams(**sp), eos_token_ids=tuple(rng.sample(range(VOCAB), rng.randint(0, 2))))
        pending.append(r)
    pending.reverse()
    all_reqs = list(reversed(pending))
    add_index = {r.request_id: i for i, r in enumerate(all_reqs)}
    first_admissions: list[int] = []
    aborted: set[str] = set()
    preemptions = queue_full = 0
    running_before: set[str] = set()

    def on_schedule(out):
        nonlocal preemptions
        check_output(sched, out)
        preemptions += out.num_preempted
        # A step that preempts admits nobody (the preempted one would thrash straight back in).
        if out.num_preempted:
            assert {c.req_id for c in out.chunks} <= running_before
        first_admissions.extend(add_index[c.req_id] for c in out.chunks
                                if c.start == 0 and sched.get_request(c.req_id).num_preemptions == 0)
        assert out.chunks or out.num_preempted or not sched.has_unfinished() or overlap

    def in_flight(out):  # an abort arrives while the step runs
        abort_in_flight(sched, rng, aborted, out)

    while pending or driver.busy:
        for _ in range(rng.randint(0, 6)):
            if not pending:
                break
            try:
                sched.add_request(pending[-1])
                pending.pop()
            except QueueFullError:
                queue_full += 1
                break
        if rng.random() < 0.03 and sched.has_unfinished():  # abort anyone, waiting or running
            victim = rng.choice(list(sched.waiting) + sched.running)
            sched.finish_request(victim.request_id, ABORT)
            aborted.add(victim.request_id)
            assert victim.page_ids == [] and victim.status is ABORT
            check_pages(sched)
        running_before = {r.request_id for r in sched.running}
        touched = driver.step(on_schedule=on_schedule, in_flight=in_flight)
        assert all(r.request_id not in aborted for r in touched)
        check_pages(sched)
        assert driver.steps < 50_000

    assert sched.pool.num_free == sched.pool.num_total
    sched.pool.check_invariants()
    assert first_admissions == sorted(first_admissions)  # FCFS
    assert preemptions > 20 and queue_full > 0 and len(aborted) > 20
    assert (runner.num_placeholder_rows > 1000) if overlap else runner.num_placeholder_rows == 0
    finished = [r for r in all_reqs if r.request_id not in aborted]
    assert any(r.status is RequestStatus.FINISHED_STOPPED for r in finished)
    assert any(0 < r.sampling_params.min_tokens <= r.num_output_tokens for r in finished)
    for r in all_reqs:
        assert r.is_finished and r.page_ids == []
        assert driver.emitted.get(r.request_id, 0) == r.num_output_tokens
        tokens, status = reference_generation(r, sched.max_model_len)
        if r.request_id in aborted:
            assert r.status is ABORT and r.output_token_ids == tokens[:r.num_output_tokens]
            continue
        assert (r.output_token_ids, r.status) == (tokens, status), r.request_id
