"""TwoGroupScheduler: the scheduler ``LLMEngine``'s request bookkeeping sees, over two groups.

Where it sits: ``DisaggEngine`` is an ``LLMEngine`` (its add / abort / detokenize / stop
strings / ``n`` > 1 / outputs / stats code is reused as is) whose ``scheduler`` is this facade::

    add_request(req)        -> the prefill group (refused if it could not fit the decode pool)
    finish_request(id)      -> whichever group holds it, and the handoff's held prefill pages
    get_request(id)         -> either group
    plan(group) / update()  -> the group that planned the step reads its results
    num_running / waiting / preemptions, kv_stats() -> both groups (summed, and per group)

A request is in exactly one group's scheduler at any time: the handoff moves it between two
steps on the engine's thread.
"""

from __future__ import annotations

from jserve.disagg.group import Group
from jserve.disagg.handoff import Handoff
from jserve.request import Request, RequestStatus
from jserve.scheduler_output import RunnerOutput, SchedulerOutput


class TwoGroupScheduler:
    """The ``Scheduler`` surface ``LLMEngine`` uses, over a prefill and a decode group."""

    def __init__(self, prefill: Group, decode: Group, handoff: Handoff) -> None:
        self.prefill, self.decode, self.handoff = prefill, decode, handoff
        self.groups = (prefill, decode)
        self.config = prefill.scheduler.config
        self.max_model_len = min(prefill.scheduler.max_model_len, decode.scheduler.max_model_len)
        self.pool = prefill.scheduler.pool        # LLMEngine.pool: where requests start
        self.kv = prefill.scheduler.kv            # the prefix cache lives on the prefill side
        self.spec = None
        self._planned_by: dict[int, Group] = {}   # id(plan in flight) -> the group that made it

    # ------------------------------------------------------------- requests
    def add_request(self, req: Request) -> None:
        """Queue on the prefill group; ValueError if the sequence could never fit the decode
        group's pool, QueueFullError as ``Scheduler.add_request``."""
        d = self.decode.scheduler
        if req.num_tokens > d.max_model_len:
            raise ValueError(f"request {req.request_id!r}: prompt length {req.num_tokens} needs "
                             f"{d.pool.pages_needed(req.num_tokens)} KV pages, the decode group's "
                             f"pool has {d.pool.num_total} ({d.pool.capacity_tokens} tokens)")
        self.prefill.scheduler.add_request(req)

    def finish_request(self, request_id: str, status: RequestStatus,
                       stop_reason: int | str | None = None) -> None:
        for g in self.groups:
            g.scheduler.finish_request(request_id, status, stop_reason)
        self.handoff.abort(request_id)

    def get_request(self, request_id: str) -> Request | None:
        return (self.prefill.scheduler.get_request(request_id)
                or self.decode.scheduler.get_request(request_id))

    def has_unfinished(self) -> bool:
        return any(g.scheduler.has_unfinished() for g in self.groups)

    def spec_active(self) -> bool:
        return False   # speculative decoding is refused with disaggregation at start-up

    # ------------------------------------------------------------- steps
    def plan(self, group: Group) -> SchedulerOutput:
        """``group``'s next step plan (its scheduler's ``schedule``), remembered so ``update``
        hands the results back to the same group."""
        out = group.scheduler.schedule()
        self._planned_by[id(out)] = group
        return out

    def forget(self, sched_out: SchedulerOutput) -> None:
        """A plan that was not dispatched (empty, or only drops)."""
        self._planned_by.pop(id(sched_out), None)

    def update(self, sched_out: SchedulerOutput, runner_out: RunnerOutput) -> list[Request]:
        return self._planned_by.pop(id(sched_out)).scheduler.update(sched_out, runner_out)

    # ------------------------------------------------------------- metrics
    @property
    def num_running(self) -> int:
        return sum(g.scheduler.num_running for g in self.groups)

    @property
    def num_waiting(self) -> int:
        return sum(g.scheduler.num_waiting for g in self.groups)

    @property
    def num_preemptions_total(self) -> int:
        return sum(g.scheduler.num_preemptions_total for g in self.groups)

    def kv_stats(self) -> dict[str, int]:
        """Both groups' ``kv_stats`` summed (pages, prefix cache, swap, preemptions), plus per
        group ``disagg_{group}_{num_running, num_waiting, pages_used, pages_total}``, the
        prefilled requests waiting for decode room, and the handoff counters
        (``disagg_handoffs``, ``_transfer_pages``, ``_transfer_bytes``, ``_transfer_us``:
        dispatch to bytes on the decode side, as the loop observes it)."""
        total: dict[str, int] = {}
        for g in self.groups:
            for k, v in g.scheduler.kv_stats().items():
                total[k] = total.get(k, 0) + v
            for k, v in g.stats().items():
                total[f"disagg_{g.name}_{k}"] = v
        total["disagg_handoffs_waiting"] = self.handoff.num_waiting
        total["disagg_transfers_in_flight"] = len(self.handoff.in_flight)
        total.update(self.handoff.counters)
        return total

    def check_invariants(self) -> None:
        """Page refcounts equal holders on both sides, the handoff's held pages counted on the
        prefill side (tests)."""
        p, d = self.prefill.scheduler, self.decode.scheduler
        held = [Request(f"held-{i}", [0], None) for i in range(len(self.handoff.in_flight))]
        for fake, t in zip(held, self.handoff.in_flight, strict=True):
            fake.page_ids = [pg for pages in t.held.values() for pg in pages]
        p.kv.check_invariants(list(p._requests.values()) + held)
        d.kv.check_invariants(list(d._requests.values()))
