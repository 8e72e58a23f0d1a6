"""StepHandle: one dispatched ordinary step, its device outputs on their way to the host.

Where it sits: ``Runner.dispatch`` returns it right after the launch; the engine's loop keeps it
in flight while it schedules and dispatches the next step, then reads it (``result``: the
host's only wait) and hands the ``RunnerOutput`` to ``Scheduler.update``. (The speculative
step's handle is ``jserve.spec.verify_step.SpecStepHandle``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from jserve.scheduler_output import RunnerOutput, SchedulerOutput


@dataclass
class StepHandle:
    """A dispatched step: its plan and its device outputs, on their way to the host."""

    sched_out: SchedulerOutput
    tokens: jax.Array | np.ndarray          # int32[S] (a burst's: int32[N, S]); host once fetched
    logprobs: tuple[Any, ...] | None        # (chosen [R], top_ids [R, N], top_lp [R, N]) if asked
    top_n: tuple[int, ...]                  # per row: top-N asked (0: none / not sampling)

    def ready(self) -> bool:
        """Whether reading the step will not wait for the device."""
        return isinstance(self.tokens, np.ndarray) or self.tokens.is_ready()

    def fetch(self) -> None:
        """The outputs as host arrays from now on (before their device buffers are donated to a
        later step: ``host_outputs.HostOutputStep``); waits for the step if it has not finished.
        Copies (``np.array``): on a CPU ``np.asarray`` is a view of the device buffer, which
        would keep the buffer from being donated."""
        self.tokens = np.array(self.tokens)
        if self.logprobs is not None:
            self.logprobs = tuple(np.array(a) for a in self.logprobs)

    def result(self) -> RunnerOutput:
        """Wait for this step's tokens (the host's only wait) -> RunnerOutput, row order."""
        chunks = self.sched_out.chunks
        tokens = np.asarray(self.tokens)
        if tokens.ndim == 2:   # a burst (jserve/burst_step.py): int32[N, S], N tokens per row
            per_row = tokens.T.tolist()
            return RunnerOutput([per_row[r] if c.samples else [] for r, c in enumerate(chunks)])
        tokens = tokens.tolist()
        sampled = [[tokens[r]] if c.samples else [] for r, c in enumerate(chunks)]
        if self.logprobs is None:
            return RunnerOutput(sampled)
        lp, ids, tlp = (np.asarray(a) for a in self.logprobs)
        rows = range(len(chunks))
        return RunnerOutput(sampled, logprobs=[[float(lp[r])] for r in rows],
                            top_ids=[[ids[r, :n].tolist()] for r, n in zip(rows, self.top_n, strict=True)],
                            top_logprobs=[[tlp[r, :n].tolist()] for r, n in zip(rows, self.top_n,
                                                                                 strict=True)])
