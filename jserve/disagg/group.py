"""Group: one device group of a disaggregated engine (its scheduler, runner, steps in flight).

Where it sits: owned by ``DisaggEngine`` (jserve/disagg/engine.py), which drives both groups
from one host thread without letting the slow one hold up the fast one: a group plans and
dispatches its next step while at most one of its steps is in flight (the overlapped loop of
``LLMEngine.step``), and its oldest step is read only once the device has finished it::

    pending: [N]        -> schedule + dispatch N+1 (the device always has the next step)
    pending: [N, N+1]   -> wait: read N once it is done (``oldest_ready``), then plan N+2

So a long prefill chunk on the prefill group never delays a decode step of the decode group.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import jax

from jserve.engine_api import StartupInfo
from jserve.runner import Runner, StepHandle
from jserve.scheduler import Scheduler

MAX_IN_FLIGHT = 2   # steps a group keeps dispatched: the one running and the next


@dataclass
class Group:
    """One device group: ``name`` is "prefill" or "decode"."""

    name: str
    scheduler: Scheduler
    runner: Runner
    startup: StartupInfo                     # this group's pool plan and limits
    device_ids: tuple[int, ...]
    pending: deque[StepHandle] = field(default_factory=deque)   # dispatched, not read; oldest first
    last_step_tokens: int = 0

    def can_plan(self) -> bool:
        """A next step may be planned: fewer than two in flight and some request unfinished."""
        return len(self.pending) < MAX_IN_FLIGHT and self.scheduler.has_unfinished()

    def oldest_ready(self) -> bool:
        """The oldest step in flight has finished on the device (reading it will not block)."""
        return bool(self.pending) and self.pending[0].tokens.is_ready()

    def oldest_output(self) -> jax.Array | None:
        """The array to wait on for the oldest step in flight (None: nothing in flight)."""
        return self.pending[0].tokens if self.pending else None

    def stats(self) -> dict[str, int]:
        """Gauges of this group for metrics: running / waiting sequences, KV pages."""
        s, pool = self.scheduler, self.scheduler.pool
        return {"num_running": s.num_running, "num_waiting": s.num_waiting,
                "pages_used": pool.num_used, "pages_total": pool.num_total}
