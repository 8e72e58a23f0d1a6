"""Handoff: prefilled requests leave the prefill group for the decode group, KV pages and all.

Where it sits: ``DisaggEngine.step`` calls ``move`` between the two groups' steps (one host
thread: neither scheduler is planning meanwhile) and ``release_ready`` every iteration::

    move():  for each prefilled request, oldest first, while the decode group has room
               (a free row, no preempted request waiting, the pages):
               prefill.detach(req) -> its prefill pages (still allocated)
               decode pool.allocate(pages_needed(computed tokens)) -> req.page_ids
               decode.admit_prefilled(req): it runs from the next decode step on
             one KVHandoffMover.send for all of them (gather -> device_put -> scatter)
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

COUNTERS = ("disagg_handoffs", "disagg_transfer_pages", "disagg_transfer_bytes", "disagg_transfer_us")


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
        self.counters = dict.fromkeys(COUNTERS, 0)

    @property
    def num_waiting(self) -> int:
        """Prefilled requests waiting on the prefill group for room on the decode group."""
        return len(self.prefill.scheduler.prefilled())

    def move(self) -> bool:
        """Hand every prefilled request the decode group has room for; -> whether any moved."""
        ps: PrefillScheduler = self.prefill.scheduler
        ds: DecodeScheduler = self.decode.scheduler
        held: dict[str, list[int]] = {}
        src: list[int] = []
        dst: list[int] = []
        for req in ps.prefilled():
            n = ds.pool.pages_needed(req.num_computed_tokens)
            if not ds.has_room(n):
                break
            pages = ps.detach(req)
            new = ds.pool.allocate(n)
            src += pages[:n]
            dst += new
            held[req.request_id] = pages
            req.page_ids = new
            ds.admit_prefilled(req)
        if not held:
            return False
        runner = self.decode.runner
        runner.kv, received = self.mover.send(self.prefill.runner.kv, src, runner.kv, dst)
        self.in_flight.append(Transfer(held, received, time.perf_counter(), len(src)))
        c = self.counters
        c["disagg_handoffs"] += len(held)
        c["disagg_transfer_pages"] += len(src)
        c["disagg_transfer_bytes"] += len(src) * self.mover.page_bytes
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
        """A finished (aborted, stopped) request gives back the prefill pages it still holds."""
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
