"""The scheduler -> runner -> scheduler contract (plain dataclasses, host side).

Where it sits: ``Scheduler.schedule()`` returns a ``SchedulerOutput``; ``Runner`` packs it into
the device step input and returns a ``RunnerOutput`` with one sampled token per *row*;
``Scheduler.update(sched_out, runner_out)`` consumes it. Orchestration tests build
``RunnerOutput`` by hand, no model needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from jserve.host_kv import HostPageStore
from jserve.request import Request


@dataclass
class KVTransfers:
    """Page moves the runner makes during the step, in this order, before the forward::

        1. to_host    gather device pages -> host slots   (swap-out, host-tier offload)
        2. copies     device page -> device page          (copy-on-write)
        3. from_host  host slots -> device pages          (swap-in, host-tier hit)
        4. forward    writes this step's K/V

    Reads come before writes, so a page freed and handed out again in the same schedule is
    read (gathered / copied) before anything overwrites it. A gathered page is put into its
    host slot when its copy is dispatched (``HostPageStore.put``); the bytes land while the step
    runs.
    """

    copies: list[tuple[int, int]] = field(default_factory=list)                   # (src, dst) pages
    to_host: list[tuple[int, HostPageStore, int]] = field(default_factory=list)   # (page, store, slot)
    from_host: list[tuple[HostPageStore, int, int]] = field(default_factory=list)  # (store, slot, page)

    def __bool__(self) -> bool:
        return bool(self.copies or self.to_host or self.from_host)


@dataclass
class ScheduledChunk:
    """One row of the ragged step: ``num_tokens`` tokens of ``request`` from ``start``.

    ``start == request.num_computed_tokens`` when scheduled. ``samples`` is true when the chunk
    reaches the end of the request's known tokens, so the row's sampled token is kept.
    Pages covering ``[0, start + num_tokens)`` are allocated in ``request.page_ids``.
    """

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # row order of the step
    preempted: list[Request] = field(default_factory=list)       # preempted during this schedule
    transfers: KVTransfers = field(default_factory=KVTransfers)  # page moves before the forward

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_seqs(self) -> int:
        return len(self.chunks)

    @property
    def is_empty(self) -> bool:
        """Nothing for the runner: no rows and no page moves."""
        return not self.chunks and not self.transfers


@dataclass
class RunnerOutput:
    """Per row of the step (same order as ``SchedulerOutput.chunks``).

    sampled_token_ids: int32[num_rows]
    logprobs:          float32[num_rows] or None   logprob of the sampled token
    top_ids:           int32[num_rows, N] or None  top-N alternatives (N = max requested)
    top_logprobs:      float32[num_rows, N] or None
    """

    sampled_token_ids: np.ndarray
    logprobs: np.ndarray | None = None
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
