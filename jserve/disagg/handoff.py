"""Handoff: prefilled requests leave the prefill group for the decode group, KV pages and all.

Where it sits: ``DisaggEngine.step`` calls ``move`` between the two groups' steps (one host
thread: neither scheduler is planning meanwhile) and ``release_ready`` every iteration::

    prefetch(step): right after the prefill group dispatched a step, the requests whose prompt
             it completes (their first token is sampled in it) have their pages gathered at
             once, if the decode group has room for them now: the gather then runs on the
             prefill device right behind that step, not behind the next prefill step that is
             dispatched before this one is read (which would delay the second token by a
             whole prefill step)
    move():  for each prefilled request, oldest first, while the decode group has room
               (a free row, no preempted request waiting, the pages):
               prefill.detach(req) -> its prefill pages (still allocated)
               decode pool.allocate(pages_needed(computed tokens)) -> req.page_ids
               decode.admit_prefilled(req): it runs from the next decode step on
             its prefetched buffers -> device_put -> scatter; the others in one
             KVHandoffMover.send (gather -> device_put -> scatter)
             -> Transfer (prefill pages held, the received buffers)
    release_ready(): a Transfer whose received buffers are ready (the decode side holds the
             bytes) frees its prefill pages (the prefix cache keeps the full ones as
             evictable: later hits still skip their compute)
    abort(id): the request's held prefill pages are freed at once (its decode pages go with
             the decode scheduler's finish_request)

When the decode group has no room, prefilled requests stay on the prefill group holding their
pages: the prefill group then fills up and stops admitting (back-pressure), never drops work.
Freeing at once on abort is safe on one host: the gather that reads the pages was dispatched
before any later step that may overwrite them (device order follows data dependence).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax

from jserve.disagg.group import Group
from jserve.disagg.schedulers import DecodeScheduler, PrefillScheduler
from jserve.disagg.transfer import KVHandoffMover
from jserve.scheduler_output import SchedulerOutput

COUNTERS = ("disagg_handoffs", "disagg_transfer_pages", "disagg_transfer_bytes", "disagg_transfer_us",
            "disagg_prefetched_handoffs")


@dataclass
class Transfer:
    """One dispatched copy: the prefill pages it holds per request, the buffers it filled."""

    held: dict[str, list[int]]        # request id -> prefill pages to free once the bytes landed
    received: list[jax.Array]         # buffers on the decode mesh
    start: float                      # perf_counter at dispatch
    num_pages: int


class Handoff:
    """Moves prefilled requests and their pages (see the module docstring)."""

    def __init__(self, prefill: Group, decode: Group, mover: KVHandoffMover) -> None:
        if not isinstance(prefill.scheduler, PrefillScheduler):
            raise TypeError("the prefill group needs a PrefillScheduler")
        if not isinstance(decode.scheduler, DecodeScheduler):
            raise TypeError("the decode group needs a DecodeScheduler")
        self.prefill, self.decode, self.mover = prefill, decode, mover
        self.in_flight: list[Transfer] = []
        # request id -> (pages, their buffers gathered on the prefill mesh: ``prefetch``)
        self.prefetched: dict[str, tuple[int, list[tuple[jax.Array, ...]]]] = {}
        self.counters = dict.fromkeys(COUNTERS, 0)

    @property
    def num_waiting(self) -> int:
        """Prefilled requests waiting on the prefill group for room on the decode group."""
        return len(self.prefill.scheduler.prefilled())

    def prefetch(self, step: SchedulerOutput) -> None:
        """Gather the pages of the requests whose prompt ``step`` (just dispatched on the
        prefill group) completes, while the decode group has room for all gathered so far."""
        ps: PrefillScheduler = self.prefill.scheduler
        ds: DecodeScheduler = self.decode.scheduler
        waiting = sum(n for n, _ in self.prefetched.values())
        for c in step.chunks:
            req = ps.get_request(c.req_id) if c.samples else None
            if req is None or req.num_output_tokens or c.req_id in self.prefetched:
                continue   # not a prompt's first sampled token, or gathered already
            n = ds.pool.pages_needed(req.num_computed_tokens)
            if not ds.has_room(waiting + n):
                return
            self.prefetched[c.req_id] = (n, self.mover.gather(self.prefill.runner.kv, req.page_ids[:n]))
            waiting += n

    def move(self) -> bool:
        """Hand every prefilled request the decode group has room for; -> whether any moved."""
        ps: PrefillScheduler = self.prefill.scheduler
        ds: DecodeScheduler = self.decode.scheduler
        for rid in [r for r in self.prefetched if ps.get_request(r) is None]:
            del self.prefetched[rid]   # finished on the prefill group (its first token ended it)
        held: dict[str, list[int]] = {}
        src: list[int] = []
        dst: list[int] = []
        received: list[jax.Array] = []
        runner, moved = self.decode.runner, 0
        for req in ps.prefilled():
            n = ds.pool.pages_needed(req.num_computed_tokens)
            if not ds.has_room(n):
                break
            moved += n
            pages = ps.detach(req)
            new = ds.pool.allocate(n)
            early = self.prefetched.pop(req.request_id, None)
            if early is not None and early[0] == n:
                runner.kv, got = self.mover.put(runner.kv, new, early[1])
                received += got
                self.counters["disagg_prefetched_handoffs"] += 1
            else:
                src += pages[:n]
                dst += new
            held[req.request_id] = pages
            req.page_ids = new
            ds.admit_prefilled(req)
        if not held:
            return False
        if src:
            runner.kv, got = self.mover.send(self.prefill.runner.kv, src, runner.kv, dst)
            received += got
        self.in_flight.append(Transfer(held, received, time.perf_counter(), moved))
        c = self.counters
        c["disagg_handoffs"] += len(held)
        c["disagg_transfer_pages"] += moved
        c["disagg_transfer_bytes"] += moved * self.mover.page_bytes
        return True

    def release_ready(self) -> bool:
        """Free the prefill pages of every transfer whose bytes are on the decode side."""
        done = [t for t in self.in_flight if all(b.is_ready() for b in t.received)]
        for t in done:
            self.in_flight.remove(t)
            self.counters["disagg_transfer_us"] += int((time.perf_counter() - t.start) * 1e6)
            self._free(t.held.values())
        return bool(done)

    def abort(self, request_id: str) -> None:
        """A finished (aborted, stopped) request gives back the prefill pages it still holds
        (and drops its prefetched buffers)."""
        self.prefetched.pop(request_id, None)
        for t in self.in_flight:
            pages = t.held.pop(request_id, None)
            if pages is not None:
                self._free([pages])

    def wait_array(self) -> jax.Array | None:
        """A received buffer not yet ready (something to block on), else None."""
        for t in self.in_flight:
            for b in t.received:
                if not b.is_ready():
                    return b
        return None

    def _free(self, page_lists) -> None:
        pool = self.prefill.scheduler.pool
        for pages in page_lists:
            pool.free(reversed(pages))
