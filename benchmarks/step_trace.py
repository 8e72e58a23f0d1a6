"""Where an engine step's host time goes: a phase timer for benchmarks (not used by jserve).

``StepTrace.attach(engine)`` wraps the engine loop's phases (schedule, the dispatches and
inside them the runner's host work, the mask upload and the compiled calls, the host's wait for
a step's tokens, the scheduler's update, the grammar's advance and masks, the outputs) with
wall-clock timers (the compiled calls stay wrapped: attach once per engine). ``table()``
prints seconds per phase and per step. The wait row is the time the host blocked on the
device: when it is near zero, the host is the bottleneck and the other rows are what the device
waited for. ``launch_on_idle`` counts the compiled calls made after the device had finished
all earlier work (it then waited for that launch). Phases on the engine's grammar thread
(advance, masks, upload_masks inside ``beside_grammar``; ``ahead`` with its advance, masks and
``put_masks``) overlap the main thread's.

    trace = StepTrace.attach(engine)
    ... run ...
    print(trace.table("constrained")); trace.reset()
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax

from jserve.runner import StepHandle
from jserve.spec.verify_step import SpecStepHandle

PHASES = ("step", "read_first", "schedule", "dispatch", "dispatch_forward", "beside_grammar", "ahead",
          "put_masks", "dispatch_sample", "prepare_forward", "prepare", "pack",
          "upload_masks", "flush", "launch", "launch_on_idle", "wait", "result", "update", "advance",
          "masks", "outputs")


class StepTrace:
    """Per-phase wall time of ``LLMEngine.step`` (nested phases are counted in their parent too:
    ``update`` holds nothing else; ``step`` holds everything)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo: list[Callable[[], None]] = []

    @classmethod
    def attach(cls, engine: Any) -> StepTrace:
        tr = cls()
        tr._wrap(engine, "step", "step")
        tr._wrap(engine, "_outputs", "outputs")
        tr._wrap(engine, "_read_first", "read_first")   # (with its wait for a step in flight)
        tr._wrap(engine.grammar, "forward_beside", "beside_grammar")
        tr._wrap(engine.grammar, "_advance_and_put", "ahead")   # (on the grammar thread)
        tr._wrap(engine.scheduler, "schedule", "schedule")
        tr._wrap(engine.scheduler, "update", "update")
        for name in ("dispatch", "dispatch_forward", "dispatch_sample"):
            tr._wrap(engine.runner, name, name)
        tr._wrap(engine.constraints, "advance_all", "advance")
        tr._wrap(engine.constraints, "masks", "masks")
        runner = engine.runner   # inside the dispatches: host work, mask upload, the calls
        tr._wrap(runner, "_prepare", "prepare")
        tr._wrap(runner, "pack", "pack")
        for name in ("prepare_forward", "upload_masks", "put_masks"):   # (the split step's)
            if hasattr(runner, name):
                tr._wrap(runner, name, name)
        tr._wrap(runner.logit_state, "flush", "flush")
        for key, fn in list(runner._compiled.items()):
            runner._compiled[key] = tr._launch(runner, fn)
        split = runner.split._compiled
        for key, (fwd, smp) in list(split.items()):
            split[key] = (tr._launch(runner, fwd), tr._launch(runner, smp))
        spec = runner.spec_steps   # a speculating engine's verify programs and their handles
        if spec is not None:
            for key, fn in list(spec._compiled.items()):
                spec._compiled[key] = tr._launch(runner, fn)
        tr._wait(StepHandle, "tokens")
        tr._wait(SpecStepHandle, "host")
        return tr

    def _wait(self, handle_cls: type, attr: str) -> None:
        """Split ``handle_cls.result`` into the host's wait for the device array ``attr`` and
        the rest (class-level: undone by ``detach``)."""
        orig = handle_cls.result

        def result(handle: Any) -> Any:
            t0 = time.perf_counter()
            jax.block_until_ready(getattr(handle, attr))   # numpy once landed
            t1 = time.perf_counter()
            out = orig(handle)
            self._add("wait", t1 - t0)
            self._add("result", time.perf_counter() - t1)
            return out

        handle_cls.result = result
        self._undo.append(lambda: setattr(handle_cls, "result", orig))

    def _add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds
        self.calls[phase] += 1

    def _timed(self, fn: Callable, phase: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(phase, time.perf_counter() - t0)

        return timed

    def _launch(self, runner: Any, fn: Callable) -> Callable:
        """A compiled call, timed as ``launch``; also as ``launch_on_idle`` when the device had
        finished everything before it (the previous sampler's tokens were ready): those are the
        launches the device waited for."""
        def timed(*args: Any, **kwargs: Any) -> Any:
            idle = runner._prev_tokens.is_ready()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self._add("launch", dt)
                if idle:
                    self._add("launch_on_idle", dt)

        return timed

    def _wrap(self, obj: Any, attr: str, phase: str) -> None:
        setattr(obj, attr, self._timed(getattr(obj, attr), phase))
        self._undo.append(lambda: delattr(obj, attr) if attr in vars(obj) else None)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def detach(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def table(self, label: str) -> str:
        """A markdown table: phase | calls | total ms | ms per step."""
        steps = max(self.calls.get("step", 0), 1)
        lines = [f"\n### step trace: {label} ({steps} engine steps)",
                 "| phase | calls | total ms | ms per step |", "|---|---|---|---|"]
        for p in PHASES:
            if self.calls.get(p):
                s = self.seconds[p]
                lines.append(f"| {p} | {self.calls[p]} | {1e3 * s:.1f} | {1e3 * s / steps:.3f} |")
        return "\n".join(lines)
