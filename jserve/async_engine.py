"""AsyncEngine: the LLMEngine step loop on its own thread, requests in and outputs out via asyncio.

Where it sits: between the front-ends (server/: HTTP, gRPC) and ``LLMEngine``. ``LLMEngine`` is
not thread-safe, so every call into it happens on one engine thread; asyncio code talks to that
thread through a command queue, and outputs come back with ``loop.call_soon_threadsafe``::

    event loop(s)                         engine thread
    -------------                         -------------
    add_request() --_Add----------------> engine.add_request()  (ValueError / QueueFullError
         <--------- concurrent Future ---                         go back to the caller)
    RequestStream.abort() --_Abort------> engine.abort_request() (pages freed at once)
    call(fn) --_Call--------------------> fn(engine)             (inspection, tests)
                                          loop: take commands (blocks when idle: no spinning)
                                                step() -> RequestOutputs, stats() -> EngineStats
                                                  -> RequestMetrics -> StatsListener
    RequestStream <- call_soon_threadsafe-- per stream, cumulative outputs (newest wins)

It uses only the engine's narrow API (jserve/engine_api.py: ``startup``, ``stats()``,
``max_model_len``) plus add / abort / step, and offers front-ends the same kind of API:
``add_request`` / ``RequestStream`` / ``abort_all``, ``health()``, ``stats()``, ``startup``.

Outputs are cumulative, like vLLM's: each ``RequestOutput`` holds everything generated so far,
so a slow consumer only ever sees the newest one; ``DeltaTracker`` turns them into what is new.

Failures: an exception inside ``step()`` is logged and fails every request in flight with
``RequestFailedError`` (a batched step has no per-request blame); the loop keeps serving, with a
short back-off while steps keep failing. Shutdown (``shutdown``) refuses new requests
(``EngineDrainingError``), lets in-flight ones finish until a deadline, aborts the rest (their
streams end with finish_reason "abort") and stops the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from jserve.engine import LLMEngine, Prompt
from jserve.engine_api import EngineHealth, EngineStats, StartupInfo
from jserve.metrics import RequestMetrics, RequestStats, StatsListener, StatsLogger
from jserve.outputs import RequestOutput, SampleLogprobs
from jserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)
req_log = logging.getLogger("jserve.requests")

T = TypeVar("T")
_MAX_BACKOFF_S = 1.0


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (shut down or crashed); nothing more can be served."""


class EngineDrainingError(RuntimeError):
    """The engine is shutting down: in-flight requests finish, new ones are refused."""


class RequestFailedError(RuntimeError):
    """An engine step failed while this request was in flight; the request was aborted."""


# ------------------------------------------------------------------------------- commands
@dataclass
class _Add:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    arrival: float
    stream: RequestStream
    future: concurrent.futures.Future
    cache_salt: str | None = None
    priority: int = 0


@dataclass
class _Abort:
    request_id: str
    detach: bool          # True: the consumer is gone, drop its outputs


@dataclass
class _AbortAll:
    pass


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: concurrent.futures.Future


@dataclass
class _Stop:
    pass


@dataclass
class _Tracked:
    """Engine-thread state of one request: where its outputs go (timing: RequestMetrics)."""

    stream: RequestStream
    detached: bool = False


# ------------------------------------------------------------------------------- streams
class RequestStream:
    """The outputs of one request, as an async iterator of cumulative ``RequestOutput``s.

    Ends after the output with ``finished=True``; raises ``RequestFailedError`` /
    ``EngineDeadError`` if the engine fails it. ``abort()`` (or leaving ``async with``) before
    the end aborts the request in the engine and frees its pages.
    """

    def __init__(self, request_id: str, engine: AsyncEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.finished = False
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def _put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while not isinstance(item, BaseException) and not self._queue.empty():
            item = self._queue.get_nowait()   # cumulative: the newest output supersedes
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Abort the request (no-op once finished). Safe to call from a cancelled task."""
        if not self.finished:
            self.finished = True
            self._engine._send(_Abort(self.request_id, detach=True))

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()


@dataclass(frozen=True)
class CompletionDelta:
    """What one sequence gained since the previous output of its request."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: SampleLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None


class DeltaTracker:
    """Turns the cumulative outputs of one request into per-sequence deltas (for streaming)."""

    def __init__(self) -> None:
        self._tokens: dict[int, int] = {}
        self._chars: dict[int, int] = {}
        self._done: set[int] = set()

    def update(self, out: RequestOutput) -> list[CompletionDelta]:
        """Deltas of the sequences that changed (new tokens, new text, or just finished)."""
        deltas = []
        for comp in out.outputs:
            i = comp.index
            nt, nc = self._tokens.get(i, 0), self._chars.get(i, 0)
            newly_done = comp.finish_reason is not None and i not in self._done
            if len(comp.token_ids) == nt and len(comp.text) == nc and not newly_done:
                continue
            self._tokens[i], self._chars[i] = len(comp.token_ids), len(comp.text)
            if newly_done:
                self._done.add(i)
            deltas.append(CompletionDelta(
                index=i, token_ids=list(comp.token_ids[nt:]), text=comp.text[nc:],
                logprobs=None if comp.logprobs is None else list(comp.logprobs[nt:]),
                finish_reason=comp.finish_reason, stop_reason=comp.stop_reason))
        return deltas


# ------------------------------------------------------------------------------- engine
class AsyncEngine:
    """Runs ``engine`` on a background thread (started here) and serves it to asyncio code.

    Only immutable facts of the engine (``tokenizer``, ``config``, ``max_model_len``,
    ``startup``) may be read from other threads; anything else goes through the engine thread.
    """

    def __init__(self, engine: LLMEngine, stats: StatsListener | None = None,
                 thread_name: str = "jserve-engine", log_stats_interval_s: float = 10.0) -> None:
        self._engine = engine
        self.tokenizer = engine.tokenizer
        self.config = engine.config
        self.max_model_len: int = engine.max_model_len
        self.startup: StartupInfo = engine.startup
        # Thread-safe: compiles a request's grammar into the engine's cache (call it off the
        # event loop before ``add_request``, so the engine thread only finds it cached).
        self.compile_grammar = engine.compile_grammar
        self._metrics = RequestMetrics(stats)
        self._stats_log = StatsLogger(log_stats_interval_s)   # one INFO line per interval while busy
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tracked: dict[str, _Tracked] = {}          # engine thread only
        self._lock = threading.Lock()                     # guards _closed vs. enqueueing
        self._closed = False
        self._draining = False
        self._stop_requested = False
        self._failures = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ asyncio side
    def health(self) -> EngineHealth:
        """SERVING, DRAINING (shutting down, refusing new requests) or STOPPED (loop ended)."""
        if self._draining:
            return EngineHealth.DRAINING
        if self._closed or not self._thread.is_alive():
            return EngineHealth.STOPPED
        return EngineHealth.SERVING

    @property
    def is_healthy(self) -> bool:
        """Running and accepting requests."""
        return self.health() is EngineHealth.SERVING

    @property
    def is_draining(self) -> bool:
        return self._draining

    @property
    def num_in_flight(self) -> int:
        return len(self._tracked)

    def _send(self, cmd: object) -> None:
        with self._lock:
            if self._closed:
                if isinstance(cmd, (_Add, _Call)):
                    cmd.future.set_exception(EngineDeadError(self._dead_message()))
                return
            self._commands.put(cmd)

    def _dead_message(self) -> str:
        if self._error is not None:
            return f"the engine has stopped after an error: {type(self._error).__name__}: {self._error}"
        return "the engine has shut down"

    async def add_request(self, prompt: Prompt, params: SamplingParams,
                          request_id: str | None = None, cache_salt: str | None = None,
                          priority: int = 0) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it. ``priority``:
        lower is admitted first (vLLM's meaning); equal priorities share the batch fairly.

        Raises ``ValueError`` (bad input), ``QueueFullError`` (waiting queue full),
        ``EngineDrainingError`` or ``EngineDeadError``; nothing is queued on error.
        """
        if self._draining:
            raise EngineDrainingError("the server is shutting down; not accepting new requests")
        rid = request_id if request_id is not None else f"req-{uuid.uuid4().hex}"
        stream = RequestStream(rid, self, asyncio.get_running_loop())
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._send(_Add(rid, prompt, params, time.monotonic(), stream, fut, cache_salt, priority))
        try:
            await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            self._send(_Abort(rid, detach=True))   # the add may still land: undo it
            raise
        return stream

    async def generate(self, prompt: Prompt, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request; closing or cancelling the iteration aborts it."""
        stream = await self.add_request(prompt, params, request_id)
        async with stream:
            async for out in stream:
                yield out

    async def stats(self) -> EngineStats:
        """A snapshot of the engine (queues, KV cache), taken on the engine thread between steps."""
        return await self.call(LLMEngine.stats)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` on the engine thread between steps and return its result
        (inspection and tests; front-ends use the methods above)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._send(_Call(fn, fut))
        return await asyncio.wrap_future(fut)

    def abort_all(self) -> None:
        """Abort every request in flight; their streams end with finish_reason "abort"."""
        self._send(_AbortAll())

    def begin_drain(self) -> None:
        """Refuse new requests from now on; in-flight ones keep running."""
        self._draining = True

    async def shutdown(self, timeout_s: float = 30.0) -> None:
        """Drain: wait up to ``timeout_s`` for in-flight requests, abort the rest, stop the thread."""
        self.begin_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout_s, 0.0)
        while self._thread.is_alive() and self.num_in_flight and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self.num_in_flight:
            log.warning("shutdown deadline (%.1f s) passed; aborting %d request(s)", timeout_s,
                        self.num_in_flight)
            self.abort_all()
        self._send(_Stop())
        await asyncio.to_thread(self._thread.join)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while True:
                busy = self._engine.has_unfinished_requests()
                if not busy and self._stop_requested:
                    break
                wait = None if not busy else 0.0      # idle: block on the queue, no spinning
                if busy and self._failures:           # steps keep failing: back off a little
                    wait = min(0.01 * 2 ** self._failures, _MAX_BACKOFF_S)
                for cmd in self._take(wait):
                    self._handle(cmd)
                if self._engine.has_unfinished_requests():
                    self._step()
        except BaseException as e:  # a bug in the loop itself: fail everything, loudly
            log.exception("engine loop crashed")
            self._error = e
        finally:
            self._close()

    def _take(self, wait: float | None) -> list[object]:
        """All queued commands; blocks up to ``wait`` seconds (forever if None) for the first."""
        cmds: list[object] = []
        try:
            if wait is None:
                cmds.append(self._commands.get())
            elif wait > 0:
                cmds.append(self._commands.get(timeout=wait))
        except queue.Empty:
            pass
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                return cmds

    def _handle(self, cmd: object) -> None:
        if isinstance(cmd, _Add):
            self._handle_add(cmd)
        elif isinstance(cmd, _Abort):
            tr = self._tracked.get(cmd.request_id)
            if tr is not None:
                tr.detached = tr.detached or cmd.detach
                self._engine.abort_request(cmd.request_id)
        elif isinstance(cmd, _AbortAll):
            for rid in list(self._tracked):
                self._engine.abort_request(rid)
        elif isinstance(cmd, _Call):
            try:
                cmd.future.set_result(cmd.fn(self._engine))
            except Exception as e:
                cmd.future.set_exception(e)
        elif isinstance(cmd, _Stop):
            self._stop_requested = True
        else:
            raise TypeError(f"unknown engine command {cmd!r}")

    def _handle_add(self, cmd: _Add) -> None:
        try:
            rid = self._engine.add_request(cmd.request_id, cmd.prompt, cmd.params, arrival_time=cmd.arrival,
                                           cache_salt=cmd.cache_salt, priority=cmd.priority)
        except Exception as e:
            req_log.debug("request rejected id=%s error=%r", cmd.request_id, str(e))
            cmd.future.set_exception(e)
            return
        self._tracked[rid] = _Tracked(stream=cmd.stream)
        self._metrics.added(rid, cmd.arrival)
        if req_log.isEnabledFor(logging.DEBUG):
            prompt_len = len(cmd.prompt) if isinstance(cmd.prompt, list) else None
            p = cmd.params
            req_log.debug("request added id=%s prompt_tokens=%s n=%d max_tokens=%s temperature=%s "
                          "top_p=%s top_k=%s seed=%s", rid, prompt_len, p.n, p.max_tokens,
                          p.temperature, p.top_p, p.top_k, p.seed)
        cmd.future.set_result(rid)

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            outs = self._engine.step()
        except Exception as e:
            self._failures += 1
            log.exception("engine step failed (%d in a row); failing %d in-flight request(s)",
                          self._failures, len(self._tracked))
            self._fail_in_flight(e)
            return
        self._failures = 0
        step_s = time.perf_counter() - t0
        stats = self._engine.stats()
        self._metrics.step(step_s, stats)
        now = time.monotonic()
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        for out in outs:
            tr = self._tracked.get(out.request_id)
            if tr is None:
                continue
            finished = self._metrics.observe(out, now)
            if out.finished:
                del self._tracked[out.request_id]
                _log_finished(finished)
            if not tr.detached:
                deliveries.setdefault(tr.stream._loop, []).append((tr.stream, out))
        for loop, items in deliveries.items():
            _deliver_threadsafe(loop, items)
        self._stats_log.step(stats, self._metrics.prompt_tokens_total,
                             self._metrics.generation_tokens_total, now)
        if not self._engine.has_unfinished_requests():
            self._stats_log.idle()

    def _fail_in_flight(self, exc: Exception) -> None:
        err = RequestFailedError(f"engine step failed: {type(exc).__name__}: {exc}")
        now = time.monotonic()
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, BaseException]]] = {}
        for rid, tr in list(self._tracked.items()):
            try:
                self._engine.abort_request(rid)
            except Exception:
                log.exception("abort of %s after a failed step failed too", rid)
            del self._tracked[rid]
            _log_finished(self._metrics.failed(rid, now))
            if not tr.detached:
                deliveries.setdefault(tr.stream._loop, []).append((tr.stream, err))
        for loop, items in deliveries.items():
            _deliver_threadsafe(loop, items)

    def _close(self) -> None:
        """Thread exit: refuse further commands, fail whatever is still pending or in flight."""
        with self._lock:
            self._closed = True
        dead = EngineDeadError(self._dead_message())
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, (_Add, _Call)):
                cmd.future.set_exception(dead)
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, BaseException]]] = {}
        for rid, tr in self._tracked.items():
            self._metrics.forget(rid)
            if not tr.detached:
                deliveries.setdefault(tr.stream._loop, []).append((tr.stream, dead))
        self._tracked.clear()
        for loop, items in deliveries.items():
            _deliver_threadsafe(loop, items)


def _log_finished(stats: RequestStats | None) -> None:
    if stats is None or not req_log.isEnabledFor(logging.DEBUG):
        return
    ttft = "-" if stats.ttft_seconds is None else f"{stats.ttft_seconds * 1e3:.1f}"
    req_log.debug("request finished id=%s reasons=%s output_tokens=%d ttft_ms=%s e2e_ms=%.1f",
                  stats.request_id, ",".join(stats.finish_reasons), stats.generation_tokens, ttft,
                  stats.e2e_seconds * 1e3)


def _deliver(items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, item in items:
        stream._put(item)


def _deliver_threadsafe(loop: asyncio.AbstractEventLoop,
                        items: list[tuple[RequestStream, Any]]) -> None:
    try:
        loop.call_soon_threadsafe(_deliver, items)
    except RuntimeError:  # that event loop is closed: its consumers are gone
        log.debug("dropping %d output(s) for a closed event loop", len(items))
