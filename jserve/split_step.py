"""The split step: a step's forward and its sampler as two programs, for host-masked rows.

Where it sits: owned by the runner, driven by ``LLMEngine.step``. A grammar's (or bad words')
mask for a row's next token needs the token the row sampled in the step in flight, which the
overlapped loop has not read yet. With the fused step the engine read that step before planning
the next, so the device idled while the host read, planned and filled masks. Split::

    engine:  schedule N+1 | forward(N+1) | read N, fill masks(N+1) | sample(N+1) | schedule N+2 ...
    device:  ... sample(N) | forward(N+1) ...........................| sample(N+1) | forward(N+2)

The forward's placeholders read step N's tokens on the device, as in the fused overlapped step;
the host fills the masks while the forward runs. The logits f32[R, V] stay on the device between
the halves. A row whose request finished at step N gets no mask; its token is dropped.

Compiled at warm-up on a GPU or TPU with the overlapped loop (``Runner.split_wanted``): two
programs per decode bucket (the buckets a pure decode step lands in, where the loop's overlap
matters). Not on CPU, where the "device" is the host's own cores and the overlap measured no gain
(benchmarks/RESULTS.md, session 7); tests compile them there with ``Runner.prepare_split``. For
larger steps (prefill chunks, flash prefill, draft rows) and multi-process jobs the engine reads
the step in flight first, then dispatches the fused step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax

log = logging.getLogger(__name__)


def abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of a pytree of arrays (for lowering off the main thread)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


class SplitPrograms:
    """The split step's compiled (forward, sampler) pair per decode bucket (compiled on a
    worker thread; ``wait`` joins it)."""

    def __init__(self, buckets: list[int], lower: Callable[[int, tuple], tuple[Any, Any]],
                 arguments: Callable[[], tuple]) -> None:
        """``lower(bucket, abstract args)`` -> the two lowered programs; ``arguments()``: the
        live arrays whose shapes the programs take (read on the caller's thread)."""
        self.buckets = tuple(buckets)
        self._lower = lower
        self._arguments = arguments
        self._compiled: dict[int, tuple[Any, Any]] = {}
        self._lock = threading.Lock()
        self._future: Future | None = None
        self.steps = 0   # split steps dispatched (tests and metrics)

    def start(self) -> None:
        """Begin compiling every bucket's pair on a background thread (idempotent)."""
        if self._future is not None or not self.buckets:
            return
        args = abstract(self._arguments())
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jserve-split-compile")
        self._future = pool.submit(self._compile_all, args)
        self._future.add_done_callback(self._report)
        pool.shutdown(wait=False)

    @staticmethod
    def _report(future: Future) -> None:
        if future.exception() is not None:   # the engine keeps reading first, as before
            log.error("split step compile failed: %r", future.exception())

    def _compile_all(self, args: tuple) -> None:
        t0 = time.perf_counter()
        for t in self.buckets:
            fwd, smp = self._lower(t, args)
            pair = (fwd.compile(), smp.compile())
            with self._lock:
                self._compiled[t] = pair
        log.info("split step (forward, sampler) compiled for token buckets %s in %.1f s: host-masked "
                 "rows now overlap the host's mask fill with the forward", self.buckets,
                 time.perf_counter() - t0)

    def wait(self) -> None:
        """Block until the background compile is done (re-raises its error)."""
        if self._future is not None:
            self._future.result()

    def ready(self, token_bucket: int) -> bool:
        with self._lock:
            return token_bucket in self._compiled

    def programs(self, token_bucket: int) -> tuple[Any, Any]:
        with self._lock:
            return self._compiled[token_bucket]
