"""Multi-process serving: process 0 schedules, every process runs the same jitted steps.

Where it sits: between ``Scheduler.schedule()`` and ``Runner.dispatch`` when the mesh spans
several processes (``num_processes > 1``). Every process builds the same engine (params,
pool, compiled steps) over one mesh; only process 0 (the *leader*) schedules, serves the API
and reads results. The ``SchedulerOutput`` is a plain value (jserve/scheduler_output.py), so
the leader sends it to the others (the *followers*) before dispatching it, and each follower
dispatches the same plan on its own devices: the collectives inside the step line up::

    process 0:  schedule -> StepChannel.publish(plan i) -> Runner.dispatch(plan i) -> result
    process k:              StepChannel.receive() i     -> Runner.dispatch(plan i)    (no result)

The channel is the key-value store of JAX's distributed runtime (the coordinator that
``jax.distributed.initialize`` started in process 0): plan i is the pickled value under key
``jserve/step/<i // 256>/i``; followers long-poll it. No extra port, no extra service.

Failure: nothing hangs forever.
  - a follower dies: the leader's wait for a step's tokens fails (CPU collectives) or stalls
    (GPU); the ``Watchdog`` ends the leader with ``PeerError`` after ``distributed_timeout_s``;
    JAX's heartbeat (same timeout) stops every process too.
  - the leader dies: its coordinator goes with it; a follower's poll fails -> ``PeerError``.
  - the leader stops normally (end of ``jserve generate``, server shutdown, interpreter exit):
    it publishes ``STOP`` and the followers' ``build_engine`` exits the process with status 0.
"""

from __future__ import annotations

import atexit
import copy
import logging
import os
import pickle
import sys
import threading
import time
from typing import Any

import jax

from jserve.runner import Runner, StepHandle
from jserve.scheduler_output import RunnerOutput, SchedulerOutput
from jserve.spec.verify_step import SpecStepHandle

log = logging.getLogger(__name__)

STOP = "stop"
_PREFIX = "jserve/step/"
_KEEP = 256          # plans per block of keys; followers trail the leader by a few steps at most
_POLL_MS = 1000


def _key(step: int) -> str:
    """Plans live in blocks of ``_KEEP`` (``jserve/step/<block>/<step>``) so the leader drops a
    whole old block with one call."""
    return f"{_PREFIX}{step // _KEEP}/{step}"


class PeerError(RuntimeError):
    """Another process of the job died, hung or stopped answering."""


def _client() -> Any:
    from jax._src import distributed  # the runtime client jax.distributed.initialize created

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("multi-process serving needs jax.distributed to be initialized first")
    return client


class StepChannel:
    """Leader -> followers plans, in order, over JAX's distributed key-value store."""

    def __init__(self, timeout_s: float) -> None:
        self._client = _client()
        self.timeout_s = timeout_s
        self._next = 0
        self.is_leader = jax.process_index() == 0
        self._closed = False

    def publish(self, message: SchedulerOutput | str) -> None:
        """Leader: send the next plan (or ``STOP``)."""
        i = self._next
        self._next += 1
        self._client.key_value_set_bytes(_key(i), pickle.dumps(message, pickle.HIGHEST_PROTOCOL))
        block = i // _KEEP
        if i % _KEEP == 0 and block >= 2:   # one delete per block: the block before the last
            self._client.key_value_delete(f"{_PREFIX}{block - 2}/")

    def receive(self) -> SchedulerOutput | str:
        """Follower: the next plan, waiting as long as the leader is idle; ``PeerError`` when
        the leader (and its coordinator) is gone."""
        key = _key(self._next)
        while True:
            try:
                data = self._client.blocking_key_value_get_bytes(key, _POLL_MS)
                break
            except Exception as e:   # the runtime raises one error type for every RPC failure
                if "DEADLINE_EXCEEDED" in str(e) or "deadline" in str(e).lower():
                    continue            # the leader is idle: poll again
                raise PeerError(f"process {jax.process_index()}: lost process 0 (the scheduler and "
                                f"coordinator) while waiting for step {self._next}: {e}") from e
        self._next += 1
        return pickle.loads(data)

    def close(self) -> None:
        """Leader: tell the followers to stop (once)."""
        if self.is_leader and not self._closed:
            self._closed = True
            try:
                self.publish(STOP)
            except Exception as e:   # the job is going down anyway: say so, do not mask the cause
                log.warning("could not tell the other processes to stop: %s", e)

    def agree_min(self, name: str, value: int) -> int:
        """Every process passes its ``value``; -> the smallest (e.g. the pool's page budget,
        so every process allocates the same pool)."""
        me, n = jax.process_index(), jax.process_count()
        self._client.key_value_set(f"jserve/agree/{name}/{me}", str(int(value)))
        values = [int(self._client.blocking_key_value_get(f"jserve/agree/{name}/{k}",
                                                          int(self.timeout_s * 1000))) for k in range(n)]
        return min(values)


class Watchdog:
    """Ends the process with a clear message when a step's results take longer than
    ``timeout_s`` (a dead or hung peer stalls the collectives inside the step)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._deadline: float | None = None
        self._what = ""
        threading.Thread(target=self._watch, name="jserve-peer-watchdog", daemon=True).start()

    def arm(self, what: str) -> None:
        self._what = what
        self._deadline = time.monotonic() + self.timeout_s

    def disarm(self) -> None:
        self._deadline = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                print(f"jserve: error: process {jax.process_index()}: {self._what} did not finish within "
                      f"distributed_timeout_s={self.timeout_s:g} s: another process of the job died or "
                      f"hung; exiting", file=sys.stderr, flush=True)
                os._exit(3)


class _Watched:
    """A step handle (either kind, below) whose result wait is bounded by the watchdog."""

    watchdog: Watchdog

    def result(self) -> RunnerOutput:
        self.watchdog.arm(f"step with {self.sched_out.num_seqs} rows")
        try:
            return super().result()
        except Exception as e:
            raise PeerError(f"process 0: a step failed in a collective ({e}); another process of the "
                            f"job probably died") from e
        finally:
            self.watchdog.disarm()


class _WatchedStep(_Watched, StepHandle):
    pass


class _WatchedSpec(_Watched, SpecStepHandle):
    pass


def watched(handle: StepHandle | SpecStepHandle, watchdog: Watchdog) -> StepHandle | SpecStepHandle:
    """The same handle (a copy) with its result wait bounded by ``watchdog``."""
    out = copy.copy(handle)
    out.__class__ = _WatchedSpec if isinstance(handle, SpecStepHandle) else _WatchedStep
    out.watchdog = watchdog
    return out


class LeaderRunner:
    """Process 0's runner: publishes each plan to the followers, then dispatches it. Reads and
    attributes other than ``dispatch`` go to the wrapped ``Runner``."""

    def __init__(self, runner: Runner, channel: StepChannel) -> None:
        self._runner = runner
        self._channel = channel
        self._watchdog = Watchdog(channel.timeout_s)
        atexit.register(channel.close)

    def dispatch(self, out: SchedulerOutput) -> StepHandle | SpecStepHandle | None:
        self._channel.publish(out)
        handle = self._runner.dispatch(out)
        if handle is None:
            return None
        return watched(handle, self._watchdog)

    def can_split(self, out: SchedulerOutput) -> bool:
        """No split step in a multi-process job: the followers replay whole plans (masks
        included), so the leader reads the step in flight first (jserve/split_step.py)."""
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)


def follow(runner: Runner, channel: StepChannel) -> int:
    """Follower: dispatch every plan the leader publishes until ``STOP``; -> steps run."""
    steps = 0
    log.info("process %d: following process 0's steps", jax.process_index())
    while True:
        message = channel.receive()
        if isinstance(message, str):
            if message == STOP:
                log.info("process %d: process 0 stopped after %d steps", jax.process_index(), steps)
                return steps
            raise PeerError(f"unexpected message {message!r} from process 0")
        runner.dispatch(message)
        steps += 1
