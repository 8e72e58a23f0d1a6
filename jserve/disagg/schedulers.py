"""The two groups' schedulers: ordinary ``Scheduler``s plus the moves a handoff needs.

Where it sits: inside each group of a ``DisaggEngine`` (jserve/disagg/engine.py). The prefill
scheduler stops scheduling a request once its prompt is computed and a token sampled (it is
*prefilled*: held, pages kept, until the handoff takes it); the decode scheduler takes such a
request as running, its KV already in the decode pool::

    prefill  waiting -> running: prompt chunks ... last chunk samples t0 -> held (prefilled)
                      detach(req): out of the queues and the runner; its pages stay allocated
                      (the handoff frees them once the decode side holds their bytes)
    decode   admit_prefilled(req): running, num_computed_tokens = num_tokens - 1: its next row
                      is an ordinary decode row over t0 (the runner gets the whole page row)

Everything else (chunked prefill, prefix-cache hits, n > 1 forks, preemption by swap or
recompute) is the base class's, unchanged.
"""

from __future__ import annotations

from jserve.request import Request, RequestStatus
from jserve.scheduler import Scheduler


def is_prefilled(req: Request) -> bool:
    """Every token but the last (sampled, possibly still in flight) is computed, and at least
    one output token exists: the prefill group's work on ``req`` is done."""
    return (req.num_output_tokens + req.num_placeholders >= 1
            and req.num_computed_tokens >= req.num_tokens + req.num_placeholders - 1)


class PrefillScheduler(Scheduler):
    """Prefills prompts, samples their first token, then holds the request for the handoff."""

    def _schedulable(self, req: Request) -> bool:
        return not is_prefilled(req) and super()._schedulable(req)

    def prefilled(self) -> list[Request]:
        """Running requests ready to move (first token on the host), oldest first."""
        return [r for r in self.running if not r.num_placeholders and is_prefilled(r)]

    def detach(self, req: Request) -> list[int]:
        """Take ``req`` out of this scheduler (and, at the next step, out of the runner) without
        freeing its pages; -> the page ids it held (the caller frees them). Requests that
        would fork ``req``'s prompt pages later (``n`` > 1 siblings not admitted yet) fall back
        to the prefix cache: those page ids are about to change meaning."""
        if req.status is not RequestStatus.RUNNING or not is_prefilled(req):
            raise ValueError(f"request {req.request_id!r} is not a prefilled running request")
        self.running.remove(req)
        del self._requests[req.request_id]
        self._drop(req.request_id)
        for other in self._requests.values():
            if other.fork_of is req:
                other.fork_of = None
        pages, req.page_ids, req.page_entries = req.page_ids, [], []
        return pages


class DecodeScheduler(Scheduler):
    """Generates the tokens after the first; requests arrive prefilled, pages filled."""

    def has_room(self, num_pages: int) -> bool:
        """Whether a prefilled request needing ``num_pages`` pages can be admitted now: a free
        running row, no preempted request waiting to resume (they go first), and the pages
        (plus one for its next token, unless nothing runs: a request alone always fits)."""
        reserve = 1 if self.running else 0
        return (len(self.running) < self.config.max_num_seqs and not self.waiting
                and self.pool.num_free >= num_pages + reserve)

    def admit_prefilled(self, req: Request) -> None:
        """``req`` (its ``page_ids`` already pages of this pool holding its computed KV) runs
        from now on; its next row computes its last token and samples the one after."""
        if req.request_id in self._requests:
            raise ValueError(f"request id {req.request_id!r} is already scheduled")
        if req.num_computed_tokens != req.num_tokens - 1 or req.num_placeholders:
            raise ValueError(f"request {req.request_id!r} is not prefilled "
                             f"({req.num_computed_tokens}/{req.num_tokens} tokens computed)")
        if len(req.page_ids) != self.pool.pages_needed(req.num_computed_tokens):
            raise ValueError(f"request {req.request_id!r}: {len(req.page_ids)} pages for "
                             f"{req.num_computed_tokens} computed tokens")
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        self._requests[req.request_id] = req
