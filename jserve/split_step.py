"""The split step: a step's forward and its sampler as two programs, for host-masked rows.

Where it sits: owned by the runner, driven by ``LLMEngine.step``. A grammar's (or bad words')
mask for a row's next token needs the token the row sampled in the step in flight, which the
overlapped loop has not read yet. With the fused step the engine read that step before planning
the next, so the device idled while the host read, planned and filled masks. Split::

    engine:  schedule N+1 | forward(N+1) | read N, fill masks(N+1) | sample(N+1) | schedule N+2 ...
    device:  ... sample(N) | forward(N+1) ...........................| sample(N+1) | forward(N+2)

Both programs take device buffers only. The step's packed input is copied into a fixed buffer
per bucket (``staged_input.StagedInputs``) that both read, so neither's CUDA graph is updated
for it before a launch: a host array handed to an executable is a fresh buffer every call
(H200, 64 rows of Qwen2.5-0.5B: the two launches 2.6-2.7 -> 0.8-0.9 ms per step,
benchmarks/RESULTS_v2_sessions_27-29.md, session 29). The host masks go up by
``jax.device_put`` on the thread that filled them (a fresh buffer: the sampler's small graph is
updated, which cost less than a staged copy of 1.2 MiB, measured), and the sampler reads the
mask slots from the packed input.

The forward's placeholders read step N's tokens on the device, as in the fused overlapped step;
the host fills the masks while the forward runs. When step N is already done before the plan
(the host, not the device, is the bottleneck: small models, many grammar rows), the engine reads
it first, advances the grammars on a helper thread while it plans step N+1, and fills the masks
there while it dispatches the forward (``GrammarSteps.forward_beside``). The logits
f32[R, V] stay on the device between the halves. A row whose request finished at step N gets
no mask; its token is dropped.

Compiled at warm-up on a GPU or TPU with the overlapped loop (``Runner.split_wanted``): two
programs per decode bucket (the buckets a pure decode step lands in, where the loop's overlap
matters). Not on CPU, where the "device" is the host's own cores and the overlap measured no gain
(benchmarks/RESULTS_v2_sessions_5-8.md, session 7); tests compile them there with
``Runner.compile_split``. For larger steps (prefill chunks, flash prefill, draft rows), batches
with top-k / top-p / min-p rows (the split's sampler is the plain one, ``step_program``) and
multi-process jobs the engine reads the step in flight first, then dispatches the fused step.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jserve.compile_pool import CUBLAS_MIN_TOKENS, compile_each, compiler_options
from jserve.scheduler_output import SchedulerOutput
from jserve.staged_input import StagedInputs
from jserve.step_buffers import StepLayout
from jserve.step_program import StepVariant, forward_step, sample_step

log = logging.getLogger(__name__)


@dataclass
class SplitPending:
    """A split step between its halves: the forward is dispatched, the sampler waits for the
    host masks (``Runner.dispatch_sample``)."""

    sched_out: SchedulerOutput
    layout: StepLayout
    joint: Any                  # the step's input array on the device, as the forward got it
    slots: np.ndarray           # slot of each row
    params: list                # SamplingParams of each row
    logits: jax.Array | None    # f32[R, V], on the device (None until ``launch_forward``)
    host_masks: np.ndarray      # int32[R, W]: each row's host mask (all ones: none)
    sample_rows: dict[str, int]  # request id -> its sampling row
    device_masks: jax.Array | None = None   # host_masks on the device (``Runner.upload_masks``)

    def stage(self, token_masks: dict[str, np.ndarray]) -> None:
        """Copy host masks (request id -> int32[W]) into this step's rows; rows without one
        keep their static mask or none. (The engine's grammar thread fills ``host_masks`` in
        place instead: ``ConstraintTracker.masks``' ``out``.)"""
        for rid, m in token_masks.items():
            if rid in self.sample_rows:
                self.host_masks[self.sample_rows[rid]] = m


class SplitPrograms:
    """The split step's compiled (forward, sampler) pair per decode bucket."""

    def __init__(self, buckets: list[int], lower: Callable[[int], tuple[Any, Any]],
                 input_size: Callable[[int], int], sharding: Any) -> None:
        """``lower(bucket)`` -> the bucket's two lowered programs; ``input_size(bucket)`` -> the
        length of its packed input (its staged buffer's)."""
        self.buckets = tuple(buckets)
        self._lower = lower
        self._input_size = input_size
        self._sharding = sharding
        self._compiled: dict[int, tuple[Any, Any]] = {}
        self._halves: dict[int, dict[int, Any]] = {}   # (``put``)
        self._joints: StagedInputs | None = None   # (``stage_joint``)
        self.steps = 0   # split steps dispatched (tests and metrics)

    def stage_joint(self, host: np.ndarray) -> jax.Array:
        """A step's packed input int32[n] -> its bucket's fixed device buffer holding it (the
        buffers' copy programs compiled on first use: warm-up's ``warm_pair``, or a test's
        first split step)."""
        if self._joints is None:
            self._joints = StagedInputs([self._input_size(t) for t in self.buckets], self._sharding)
        return self._joints.put(host)

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


def lower_pair(runner: Any, token_bucket: int) -> tuple[Any, Any]:
    """Lower a bucket's two programs over ``runner``'s state -> (forward, sampler) lowered. The
    forward donates the pool and the slot table; the sampler the penalty state, the slot table
    (token automata advanced) and the previous tokens (the next step's placeholders read this
    step's tokens from the same buffer)."""
    layout = runner.layout(token_bucket)
    rep = runner._replicated
    joint = jax.ShapeDtypeStruct((layout.int_size + layout.float_size,), jnp.int32, sharding=rep)
    table, prev = runner.slot_table, runner._prev_tokens
    fwd = jax.jit(functools.partial(forward_step, runner.config.model, layout,
                                    StepVariant(token_bucket, False, False), runner.mesh),
                  donate_argnums=(1, 2),
                  out_shardings=(jax.tree.map(lambda a: a.sharding, runner.kv), rep, rep)
                  ).lower(runner.params, runner.kv, table, prev, joint)
    lo = fwd.out_info[2]
    logits = jax.ShapeDtypeStruct(lo.shape, lo.dtype, sharding=rep)
    host = jax.ShapeDtypeStruct((layout.num_rows, runner.logit_state.words), jnp.int32, sharding=rep)
    smp = jax.jit(functools.partial(sample_step, layout, runner._num_out, runner._num_spec),
                  donate_argnums=(1, 2, 3),
                  out_shardings=(rep,) * 7).lower(logits, runner.penalty_state, table, prev, joint,
                                                  runner.step_masks(flush=False), host)
    return fwd, smp


def warm_pair(runner: Any, token_bucket: int) -> None:
    """Run one bucket's compiled pair once on padding rows, its staged input with it (its
    logits die with the call)."""
    layout = runner.layout(token_bucket)
    split = runner.split
    fwd, smp = split.programs(token_bucket)
    joint = split.stage_joint(layout.joint(layout.new_buffers()[0]))
    runner.kv, runner.slot_table, logits = fwd(runner.params, runner.kv, runner.slot_table,
                                               runner._prev_tokens, joint)
    masks = jax.device_put(np.full((layout.num_rows, runner.logit_state.words), -1, np.int32),
                           runner._replicated)
    runner.penalty_state, runner.slot_table, runner._prev_tokens, *_ = smp(
        logits, runner.penalty_state, runner.slot_table, runner._prev_tokens, joint,
        runner.step_masks(flush=False), masks)
