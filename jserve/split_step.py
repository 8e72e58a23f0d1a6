"""The split step: a step's forward and its sampler as two programs, for host-masked rows.

Where it sits: owned by the runner, driven by ``LLMEngine.step``. A grammar's (or bad words')
mask for a row's next token needs the token the row sampled in the step in flight, which the
overlapped loop has not read yet. With the fused step the engine read that step before planning
the next, so the device idled while the host read, planned and filled masks. Split::

    engine:  schedule N+1 | forward(N+1) | read N, fill masks(N+1) | sample(N+1) | schedule N+2 ...
    device:  ... sample(N) | forward(N+1) ...........................| sample(N+1) | forward(N+2)

The forward's placeholders read step N's tokens on the device, as in the fused overlapped step;
the host fills the masks while the forward runs. When step N is already done at that point (the
host, not the device, is the bottleneck: small models, many grammar rows), the engine reads it
first and fills the masks on a helper thread while it dispatches the forward
(``LLMEngine._forward_beside_grammar``). The logits f32[R, V] stay on the device between
the halves. A row whose request finished at step N gets no mask; its token is dropped.

Compiled at warm-up on a GPU or TPU with the overlapped loop (``Runner.split_wanted``): two
programs per decode bucket (the buckets a pure decode step lands in, where the loop's overlap
matters). Not on CPU, where the "device" is the host's own cores and the overlap measured no gain
(benchmarks/RESULTS_v2_sessions_5-8.md, session 7); tests compile them there with
``Runner.compile_split``. For larger steps (prefill chunks, flash prefill, draft rows), batches
with top-k / top-p / min-p rows (the split's sampler is the plain one, ``step_program``) and
multi-process jobs the engine reads the step in flight first, then dispatches the fused step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from jserve.compile_pool import CUBLAS_MIN_TOKENS, compile_each, compiler_options
from jserve.scheduler_output import SchedulerOutput
from jserve.step_buffers import StepLayout

log = logging.getLogger(__name__)


@dataclass
class SplitPending:
    """A split step between its halves: the forward is dispatched, the sampler waits for the
    host masks (``Runner.dispatch_sample``)."""

    sched_out: SchedulerOutput
    layout: StepLayout
    joint: Any                  # the step's input array, as the forward got it
    slots: np.ndarray           # slot of each row
    params: list                # SamplingParams of each row
    logits: jax.Array | None    # f32[R, V], on the device (None until ``launch_forward``)
    mask_slot: np.ndarray       # int32[R]: the packed mask rows (static masks; -1 free)
    host_masks: np.ndarray      # int32[R, W]: each row's host mask (all ones: none)
    sample_rows: dict[str, int]  # request id -> its sampling row


class SplitPrograms:
    """The split step's compiled (forward, sampler) pair per decode bucket."""

    def __init__(self, buckets: list[int], lower: Callable[[int], tuple[Any, Any]]) -> None:
        """``lower(bucket)`` -> the bucket's two lowered programs."""
        self.buckets = tuple(buckets)
        self._lower = lower
        self._compiled: dict[int, tuple[Any, Any]] = {}
        self._halves: dict[int, dict[int, Any]] = {}   # (``put``)
        self.steps = 0   # split steps dispatched (tests and metrics)

    def compile(self, threads: int = 1, gpu: bool = False, cublas_from: int = CUBLAS_MIN_TOKENS) -> None:
        """Compile every bucket's pair (once), ``threads`` programs at a time (lowered in turn:
        tracing holds the GIL, XLA's compile does not); ``gpu``: with the GPU's per-bucket XLA
        options (``compile_pool.compiler_options``, cuBLAS from ``cublas_from`` tokens)."""
        if self._compiled or not self.buckets:
            return
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            done = compile_each({(t, j): low for t in self.buckets
                                 for j, low in enumerate(self._lower(t))}, pool,
                                lambda key: compiler_options(key[0], gpu, cublas_from))
        self._compiled = {t: (done[t, 0], done[t, 1]) for t in self.buckets}
        log.info("split step (forward, sampler) compiled for token buckets %s in %.1f s",
                 self.buckets, time.perf_counter() - t0)

    def put(self, token_bucket: int, half: int, compiled: Any) -> None:
        """One compiled half (0: forward, 1: sampler) of a bucket's pair, compiled by
        ``Runner.compile`` beside the step variants; the pair is ready once both are in."""
        pending = self._halves.setdefault(token_bucket, {})
        pending[half] = compiled
        if len(pending) == 2:
            self._compiled[token_bucket] = (pending[0], pending[1])

    def ready(self, token_bucket: int) -> bool:
        return token_bucket in self._compiled

    def programs(self, token_bucket: int) -> tuple[Any, Any]:
        return self._compiled[token_bucket]
