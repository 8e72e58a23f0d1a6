"""Engine statistics: what the async engine reports per step and per request.

Where it sits: ``AsyncEngine`` (jserve/async_engine.py) measures these on its engine thread and
hands them to a ``StatsListener``; the server's Prometheus exporter (server/metrics.py) is one.
jserve itself exports nothing and depends on no metrics library::

    engine thread: step() -> StepStats ------------------> listener.on_step
                   outputs -> first token / token gaps -> listener.on_first_token / on_token_gaps
                   finished request -> RequestStats -----> listener.on_request_finished

Listener methods run on the engine thread: they must be quick and thread-safe, and an
exception raised by one is logged and ignored (it never stops the engine).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class StepStats:
    """The engine after one ``step()``."""

    step_seconds: float          # wall time of the step (schedule + run + update + detokenize)
    num_running: int             # sequences in the running batch
    num_waiting: int             # sequences queued (new or preempted)
    kv_pages_used: int
    kv_pages_free: int
    num_preemptions_total: int   # since start-up (monotonic)
    # LLMEngine.kv_cache_stats(): prefix-cache / swap / CoW counters (monotonic) and gauges.
    kv_stats: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestStats:
    """One finished request (all ``n`` sequences of it)."""

    request_id: str
    finish_reasons: tuple[str, ...]   # one per sequence: "stop" | "length" | "abort" | "error"
    prompt_tokens: int
    generation_tokens: int            # summed over the n sequences
    e2e_seconds: float                # arrival -> last output
    ttft_seconds: float | None        # arrival -> first token; None when no token came


class StatsListener(Protocol):
    """Receives engine statistics on the engine thread (see the module docstring)."""

    def on_step(self, stats: StepStats) -> None: ...

    def on_first_token(self, ttft_seconds: float, prompt_tokens: int) -> None: ...

    def on_token_gaps(self, gaps_seconds: list[float], num_tokens: int) -> None:
        """``gaps_seconds``: one inter-token latency per sequence that advanced this step;
        ``num_tokens``: output tokens produced for the request this step."""
        ...

    def on_request_finished(self, stats: RequestStats) -> None: ...
