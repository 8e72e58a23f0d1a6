"""Engine statistics: what the async engine reports per step and per request.

Where it sits: ``AsyncEngine`` (jserve/async_engine.py) feeds a ``RequestMetrics`` on its engine
thread with every step's ``EngineStats`` and every ``RequestOutput``; ``RequestMetrics`` turns
them into events for a ``StatsListener``; the server's Prometheus exporter (server/metrics.py) is
one. jserve itself exports nothing and depends on no metrics library::

    engine thread: step() -> engine.stats() -> StepStats -------> listener.on_step
                   RequestOutput (cumulative, .metrics) -> RequestMetrics.observe
                       first output carrying first_token_time -> listener.on_first_token
                       tokens new since the request's last output -> listener.on_token_gaps
                       finished -> RequestStats ---------------> listener.on_request_finished

Timing has one source: the engine stamps ``arrival_time`` and ``first_token_time`` into
``RequestOutput.metrics``; time-to-first-token is read from there. What ``RequestMetrics`` keeps
per request is only what a cumulative output cannot say by itself: how many tokens of each
sequence the previous output held, and when they came (generation-token counts, inter-token gaps).

Listener methods run on the engine thread: they must be quick and thread-safe, and an
exception raised by one is logged and ignored (it never stops the engine).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from jserve.engine_api import EngineStats
from jserve.outputs import RequestOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    """The engine after one ``step()``."""

    step_seconds: float          # wall time of the step (schedule + run + update + detokenize)
    engine: EngineStats          # LLMEngine.stats() right after the step


@dataclass(frozen=True)
class RequestStats:
    """One finished request (all ``n`` sequences of it)."""

    request_id: str
    finish_reasons: tuple[str, ...]   # one per sequence: "stop" | "length" | "abort" | "error"
    prompt_tokens: int
    generation_tokens: int            # summed over the n sequences
    e2e_seconds: float                # arrival -> last output
    ttft_seconds: float | None        # arrival -> first token; None when no token came
    queue_seconds: float | None = None    # arrival -> first scheduled; None if never scheduled
    prefill_seconds: float | None = None  # first scheduled -> first token
    decode_seconds: float | None = None   # first token -> last output


class StatsListener(Protocol):
    """Receives engine statistics on the engine thread (see the module docstring)."""

    def on_step(self, stats: StepStats) -> None: ...

    def on_first_token(self, ttft_seconds: float, prompt_tokens: int) -> None: ...

    def on_token_gaps(self, gaps_seconds: list[float], num_tokens: int) -> None:
        """``gaps_seconds``: one inter-token latency per sequence that advanced this step;
        ``num_tokens``: output tokens produced for the request this step."""
        ...

    def on_request_finished(self, stats: RequestStats) -> None: ...


@dataclass
class _Progress:
    """One request as its outputs have shown it so far."""

    metrics: Mapping[str, float]         # the newest RequestOutput.metrics (arrival, first token)
    prompt_tokens: int = 0
    tokens: dict[int, int] = field(default_factory=dict)        # sequence index -> tokens it holds
    token_time: dict[int, float] = field(default_factory=dict)  # sequence index -> its last token's time

    def ttft(self) -> float | None:
        first = self.metrics.get("first_token_time")
        return None if first is None else first - self.metrics["arrival_time"]


class RequestMetrics:
    """The engine's outputs -> ``StatsListener`` events (engine thread only; see the module
    docstring). ``listener`` None: nothing is reported, ``RequestStats`` are still returned."""

    def __init__(self, listener: StatsListener | None) -> None:
        self._listener = listener
        self._progress: dict[str, _Progress] = {}
        self.prompt_tokens_total = 0        # prompts that produced a first token (monotonic)
        self.generation_tokens_total = 0    # output tokens (monotonic)

    def added(self, request_id: str, arrival_time: float) -> None:
        """A request the engine accepted with ``arrival_time``; until its first output that is
        all there is to know about it (the engine reports the same value in ``metrics``)."""
        self._progress[request_id] = _Progress({"arrival_time": arrival_time})

    def step(self, step_seconds: float, stats: EngineStats) -> None:
        if self._listener is not None:
            self._emit(self._listener.on_step, StepStats(step_seconds, stats))

    def observe(self, out: RequestOutput, now: float) -> RequestStats | None:
        """One output of a request seen by ``added``; -> its ``RequestStats`` once finished."""
        p = self._progress.get(out.request_id)
        if p is None:
            return None
        gaps, new_total = [], 0
        for comp in out.outputs:
            n = len(comp.token_ids)
            new = n - p.tokens.get(comp.index, 0)
            if new <= 0:
                continue
            new_total += new
            if comp.index in p.token_time:
                gaps.append(now - p.token_time[comp.index])
            p.tokens[comp.index] = n
            p.token_time[comp.index] = now
        first = "first_token_time" in out.metrics and "first_token_time" not in p.metrics
        p.metrics, p.prompt_tokens = out.metrics, len(out.prompt_token_ids)
        self.generation_tokens_total += new_total
        if first:
            self.prompt_tokens_total += p.prompt_tokens
        if self._listener is not None and first:
            self._emit(self._listener.on_first_token, p.ttft(), p.prompt_tokens)
        if self._listener is not None and new_total:
            self._emit(self._listener.on_token_gaps, gaps, new_total)
        if not out.finished:
            return None
        return self._finish(out.request_id, tuple(c.finish_reason or "abort" for c in out.outputs), now)

    def failed(self, request_id: str, now: float) -> RequestStats | None:
        """The request was failed without a final output (an engine step raised)."""
        if request_id not in self._progress:
            return None
        return self._finish(request_id, ("error",), now)

    def forget(self, request_id: str) -> None:
        """Stop following a request without reporting it (the engine loop is shutting down)."""
        self._progress.pop(request_id, None)

    def _finish(self, request_id: str, reasons: tuple[str, ...], now: float) -> RequestStats:
        p = self._progress.pop(request_id)
        m = p.metrics
        arrival, scheduled, first = (m["arrival_time"], m.get("scheduled_time"),
                                     m.get("first_token_time"))
        stats = RequestStats(request_id, reasons, p.prompt_tokens, sum(p.tokens.values()),
                             now - arrival, p.ttft(),
                             queue_seconds=None if scheduled is None else scheduled - arrival,
                             prefill_seconds=(None if scheduled is None or first is None
                                              else first - scheduled),
                             decode_seconds=None if first is None else now - first)
        if self._listener is not None:
            self._emit(self._listener.on_request_finished, stats)
        return stats

    @staticmethod
    def _emit(event: Callable[..., None], *args: object) -> None:
        try:
            event(*args)
        except Exception:
            log.exception("stats listener %s failed", event.__name__)


class StatsLogger:
    """vLLM's periodic engine line: every ``interval_s`` while the engine is busy, one INFO line
    with the running / waiting sequences, KV use and prompt / generation throughput since the
    previous line. Fed on the engine thread after each step (``AsyncEngine``)."""

    def __init__(self, interval_s: float = 10.0, logger: logging.Logger | None = None) -> None:
        self.interval_s = interval_s
        self._log = logger or log
        self._last_time: float | None = None
        self._last_prompt = 0
        self._last_gen = 0

    def step(self, stats: EngineStats, prompt_tokens_total: int, generation_tokens_total: int,
             now: float) -> str | None:
        """-> the line logged, when one is due."""
        if self.interval_s <= 0:
            return None
        if self._last_time is None:
            self._last_time, self._last_prompt, self._last_gen = now, prompt_tokens_total, \
                generation_tokens_total
            return None
        dt = now - self._last_time
        if dt < self.interval_s:
            return None
        line = (f"engine: {stats.num_running} running, {stats.num_waiting} waiting, "
                f"KV cache {stats.kv_usage * 100:.1f}% used, "
                f"prompt {(prompt_tokens_total - self._last_prompt) / dt:.1f} tok/s, "
                f"generation {(generation_tokens_total - self._last_gen) / dt:.1f} tok/s")
        self._log.info("%s", line)
        self._last_time, self._last_prompt, self._last_gen = now, prompt_tokens_total, \
            generation_tokens_total
        return line

    def idle(self) -> None:
        """The engine went idle: the next busy period starts a fresh interval."""
        self._last_time = None
