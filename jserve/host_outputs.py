"""HostOutputStep: a plain step variant whose host-facing outputs land in donated buffers of fixed
address, called through one or two loaded copies of its executable.

Where it sits: ``Runner.compile`` wraps each non-burst step variant's executable in one; the
runner's dispatch and warm-up (and the benchmarks) call it as they call the executable, with
the step's seven arguments. Each call passes the buffers of one of two slots, donated, so the
step writes its tokens (and logprobs, top ids, top logprobs) in place, and the arrays it returns
become that slot's buffers for the call after next::

    call N: slot N % 2's buffers [donated] -> executable (N % 2 if twinned, else the one)
            -> outputs in those buffers -> StepHandle N (read by the host after call N + 1)
    call N + 2: slot N % 2 again: StepHandle N's arrays are fetched to host arrays first
            (``own``; the overlapped loop has read them by then, so this does not wait)

Why: XLA runs a step as a recorded CUDA graph (command buffer) and re-records the nodes whose
buffers moved since its last call. A fresh host-facing output is allocated while the previous
step's is still held (the loop reads step N after dispatching N + 1), so it never takes the
block the previous one had: on an H100 (session 58, ``benchmarks/cmdbuf_probe.py``, Qwen2.5-0.5B)
the output moved on every call and the graph was updated on 35 of 35 calls (0.78-0.95 host ms
per call against 0.45-0.50 without). Donated buffers keep their address, but two must alternate
(step N's is still unread when N + 1 runs), and one executable would see the address change on
every call: each slot gets an executable of its own (a twin: the same program loaded twice,
``executable_cache.load_again``), which then sees one address on every call. Twins cost a load
and a warm-up call each, and can only pay where the host's call time matters next to the
device's: GPU buckets of up to ``TWIN_MAX_TOKENS`` tokens. Elsewhere one executable serves both
slots, whose graph then sees the address alternate (as a fresh output moved: no worse).

Twins are off (``TWIN_MAX_TOKENS`` 0) until the start-up they add is timed (owed case ut).
Session 8's twins of the program with fresh outputs made the loop slower; session 60's case
ho (``step_floor.py --host-outputs``, H100) found these faster: Qwen2.5-0.5B's batch-1 loop
4-9% under one executable in three runs (26-36% under fresh outputs), code-small even.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jserve.executable_cache import load_again
from jserve.step_program import TOP_N

TWIN_MAX_TOKENS = 0   # largest token bucket whose GPU step variants get a twin (A/B: 256 in case ut)


class HostOutputStep:
    """One step variant: ``executables`` (one, or two twins called in turn) and the two slots of
    host-output buffers they write in place (``buffers()`` makes a slot's first set)."""

    def __init__(self, executables: tuple[Any, ...], buffers: Callable[[], tuple]) -> None:
        self.executables = executables
        self._slots: list[list] = [[buffers(), None] for _ in range(2)]   # [buffers, owner]
        self._next = 0
        self._last = 0

    def __call__(self, params: Any, kv: Any, pen: Any, table: Any, prev_tokens: Any, joint: Any,
                 masks: Any = None) -> tuple:
        """The step (the executable's arguments less the host buffers) -> its eight outputs
        (kv, pen, table, prev_tokens', tokens, logprobs, top_ids, top_logprobs)."""
        i, self._next = self._next, self._next ^ 1
        slot = self._slots[i]
        if slot[1] is not None:   # the handle that still reads these buffers: to host arrays
            slot[1].fetch()
            slot[1] = None
        out = self.executables[i % len(self.executables)](params, kv, pen, table, prev_tokens, joint,
                                                         masks, slot[0])
        slot[0] = tuple(a for a in out[4:] if a is not None)
        self._last = i
        return out

    def own(self, handle: Any) -> None:
        """``handle`` (a ``StepHandle``) reads the last call's outputs: before they are donated
        again it gets them as host arrays (``handle.fetch()``)."""
        self._slots[self._last][1] = handle

    def __getattr__(self, name: str) -> Any:
        """The executable's own attributes (``as_text``, ``memory_analysis``, ...)."""
        return getattr(self.executables[0], name)


def host_buffers(tokens_shape: tuple[int, ...], rows: int, greedy: bool,
                 sharding: Any) -> tuple[jax.Array, ...]:
    """Zeros shaped as a plain variant's host-facing outputs, placed as ``sharding``: tokens
    int32[``tokens_shape``] (the previous tokens' shape) and, unless ``greedy``, logprobs
    f32[rows], top ids int32[rows, TOP_N], top logprobs f32[rows, TOP_N]."""
    shapes = [(tokens_shape, np.int32)] + ([] if greedy else [
        ((rows,), np.float32), ((rows, TOP_N), np.int32), ((rows, TOP_N), np.float32)])
    # A copy the device owns: on a CPU device_put may alias the numpy array (when its memory
    # happens to be aligned), and XLA then copies a donated buffer instead of writing in place.
    return tuple(jax.device_put(np.zeros(s, t), sharding, may_alias=False) for s, t in shapes)


def wrap_step(compiled: Any, tokens: int, platform: str, buffers: Callable[[], tuple]) -> HostOutputStep:
    """A compiled plain step variant of token bucket ``tokens`` -> its ``HostOutputStep``, with
    a twin on a GPU for buckets of up to ``TWIN_MAX_TOKENS`` tokens."""
    twin = platform == "gpu" and tokens <= TWIN_MAX_TOKENS
    return HostOutputStep((compiled, load_again(compiled)) if twin else (compiled,), buffers)
