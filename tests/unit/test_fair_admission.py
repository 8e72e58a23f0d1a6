"""Fair admission and per-request priority in the scheduler (no model: hand-made runner outputs).

One API request with ``n`` sequences must not fill the batch ahead of a request that arrives
after it; a lower ``priority`` value is admitted first; within one request the leader still goes
before its siblings (they share its prompt pages).
"""

from jserve.config import SchedulerConfig
from jserve.page_pool import PagePool
from jserve.request import Request, RequestStatus
from jserve.sampling_params import SamplingParams
from jserve.scheduler import Scheduler
from jserve.scheduler_output import RunnerOutput


def _sched(max_num_seqs: int, num_pages: int = 65) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64, max_model_len=256)
    return Scheduler(cfg, PagePool(num_pages, 4))


def _group(rid: str, n: int, max_tokens: int = 4, priority: int = 0) -> list[Request]:
    """The ``n`` sequences of one API request, as the engine makes them (siblings fork the leader)."""
    params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens)
    prompt = [100 + i for i in range(6)]
    reqs: list[Request] = []
    for i in range(n):
        reqs.append(Request(rid if n == 1 else f"{rid}#{i}", prompt, params, priority=priority,
                            fork_of=reqs[0] if reqs else None))
    return reqs


def _admitted_in_order(sched: Scheduler) -> list[str]:
    """Run to completion; the request ids in the order they were first scheduled."""
    order: list[str] = []
    for _ in range(1000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        order += [c.req_id for c in out.chunks if c.req_id not in order]
        sched.update(out, RunnerOutput([[1] if c.samples else [] for c in out.chunks]))
    assert not sched.has_unfinished()
    assert sched.pool.num_free == sched.pool.num_total
    return order


def test_a_late_small_request_is_not_starved_by_many_sequences():
    sched = _sched(max_num_seqs=2)
    big = _group("big", n=8)
    small = _group("small", n=1)
    for r in big + small:
        sched.add_request(r)
    order = _admitted_in_order(sched)
    # The leader first, then the small request (0 running) before big's siblings (1 running).
    assert order[:2] == ["big#0", "small"]
    assert [r for r in order if r.startswith("big")] == [f"big#{i}" for i in range(8)]
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in big + small)


def test_sequences_of_two_requests_take_turns():
    sched = _sched(max_num_seqs=4)
    a, b = _group("a", n=6), _group("b", n=6)
    for r in a + b:
        sched.add_request(r)
    order = _admitted_in_order(sched)
    first_wave = order[:4]
    assert sorted(first_wave) == ["a#0", "a#1", "b#0", "b#1"]


def test_lower_priority_value_is_admitted_first():
    sched = _sched(max_num_seqs=1)
    reqs = _group("late-urgent", 1, priority=-5)
    early = _group("early", 1, priority=3) + _group("normal", 1)
    for r in early + reqs:
        sched.add_request(r)
    assert _admitted_in_order(sched) == ["late-urgent", "normal", "early"]


def test_equal_requests_keep_arrival_order():
    sched = _sched(max_num_seqs=2)
    reqs = [r for i in range(5) for r in _group(f"r{i}", 1)]
    for r in reqs:
        sched.add_request(r)
    assert _admitted_in_order(sched) == [f"r{i}" for i in range(5)]
