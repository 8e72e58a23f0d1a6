"""The kernel benchmarks' clocks: the device's own kernel durations from a profiler trace, and
the wall-clock chains before them.

Where it sits: used by ``decode_stream.py`` and ``quant_matmul.py`` (``KernelClock``,
``add_clock_arguments``). The wall clock (``timed``: a chain of calls in one jit, one reading per
chain, sessions 13-30, or the difference of two chain lengths, session 31) carried +-20-30%
between rounds for kernels of 5-50 us, and the differential went wrong both ways (session 32,
call 1: reads of 117 MB "faster" than HBM at one config, a 2 GiB sum at 60% of another reading).
The device clock (the default since session 32) runs each measurement's chained jit inside a
named ``TraceAnnotation`` of a ``jax.profiler`` trace and attributes every GPU kernel that ran
inside that window to it, so a figure is the device's own duration of the kernels, whatever the
host did::

    clock = DeviceClock("/tmp/trace")
    label = clock.run("kernel M=16", chained_fn, *args, reps=5)   # warm-up now, timed at flush
    ...
    stats = clock.flush()       # {label: Stats(kernel, median_us, count, all_us)}

Nothing compiles inside the trace (``run`` calls the function once before queueing it), and
``flush`` may be called after each section so that a run cut short keeps what it measured.

``Stats.median_us``: the median duration of the label's heaviest kernel (the name with the most
total time in the window: the matmul, not the chain's glue); ``all_us``: every kernel's time in
the window divided by the heaviest kernel's count (the matmul plus its epilogue and the glue).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.quant_matmul import reference


@dataclasses.dataclass(frozen=True)
class Stats:
    kernel: str        # the heaviest kernel's name in the window
    median_us: float   # its median duration
    count: int         # how many times it ran in the window
    all_us: float      # every kernel's total in the window / count


class DeviceClock:
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.labels: list[str] = []
        self.lanes: list[str] = []   # the device lanes the last trace had (a check)
        self.stats: dict[str, Stats] = {}
        self._queued: list[tuple[str, Callable, tuple, int]] = []

    def run(self, label: str, fn: Callable, *args, reps: int = 5) -> str:
        """Call ``fn(*args)`` once now, untraced (compile, first launch), and queue ``reps``
        timed calls under the annotation ``label`` (unique) for the next ``flush``."""
        if label in self.labels:
            raise ValueError(f"label {label!r} used twice")
        jax.block_until_ready(fn(*args))
        self.labels.append(label)
        self._queued.append((label, fn, args, reps))
        return label

    def flush(self) -> dict[str, Stats]:
        """Run the queued measurements inside one profiler trace (nothing compiles in it) and
        attribute its GPU kernels to their windows; -> every label's stats so far."""
        if not self._queued:
            return self.stats
        out_dir = os.path.join(self.out_dir, f"part{len(self.stats)}")
        jax.profiler.start_trace(out_dir, create_perfetto_trace=True)
        try:
            for label, fn, args, reps in self._queued:
                with jax.profiler.TraceAnnotation(label):
                    for _ in range(reps):
                        jax.block_until_ready(fn(*args))
        finally:
            jax.profiler.stop_trace()
        trace = read_trace(out_dir)
        self.lanes = trace.lanes
        for label, *_ in self._queued:
            lo, hi = trace.host_spans.get(label, (0.0, -1.0))
            by_name: dict[str, list[float]] = defaultdict(list)
            for ts, dur, name in trace.kernels:
                if lo <= ts <= hi:
                    by_name[name].append(dur)
            if not by_name:
                self.stats[label] = Stats("-", float("nan"), 0, float("nan"))
                continue
            name, durs = max(by_name.items(), key=lambda kv: sum(kv[1]))
            total = sum(sum(v) for v in by_name.values())
            self.stats[label] = Stats(name[:60], statistics.median(durs), len(durs), total / len(durs))
        self._queued = []
        return self.stats


@dataclasses.dataclass
class Trace:
    kernels: list[tuple[float, float, str]]        # (start us, duration us, name), by start
    host_spans: dict[str, tuple[float, float]]     # host event name -> (start, end) of its last
    lanes: list[str]                               # the device lanes the trace had (a check)


def read_trace(out_dir: str) -> Trace:
    """The newest perfetto trace under ``out_dir`` -> its GPU kernels and host spans."""
    paths = sorted(glob.glob(os.path.join(out_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise RuntimeError(f"no perfetto trace under {out_dir}")
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e["args"].get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in procs.items() if "GPU" in name or "gpu" in name}
    # the device's stream lanes hold the kernels; its "XLA Modules" / "XLA Ops" lanes repeat
    # them as programs and HLO ops (counted once: the streams only, when the trace has them)
    lanes = {(e["pid"], e.get("tid")): e["args"].get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name" and e["pid"] in gpu}
    streams = {key for key, name in lanes.items() if "Stream" in name}
    kernels = sorted((e["ts"], e.get("dur", 0.0), e["name"]) for e in events
                     if e.get("ph") == "X" and e["pid"] in gpu and e.get("dur", 0.0) > 0
                     and (not streams or (e["pid"], e.get("tid")) in streams))
    spans = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in events
             if e.get("ph") == "X" and e["pid"] not in gpu and "dur" in e}
    return Trace(kernels, spans, sorted(set(lanes.values())))


def read_ceiling(clock: DeviceClock, reps: int = 5) -> float:
    """GB/s of a 2 GiB int8 read (row sums of [2^19, 4096]) on the device clock: the HBM read
    ceiling the kernel benchmarks quote (session 32, H200: 4.61 TB/s)."""
    big = jnp.ones((2**19, 4096), jnp.int8)
    label = clock.run(f"ceiling{len(clock.labels)}", jax.jit(lambda a: jnp.sum(a.astype(jnp.int32), axis=1)),
                      big, reps=reps)
    us = clock.flush()[label].median_us
    return 2**31 / us / 1e3


def chained(fn, n: int):
    """A jit of ``n`` calls ``fn(x, *weights[i % len(weights)])`` in a chain: each call's x
    depends on the previous output, so nothing is hoisted or merged."""
    def loop(x, weights):
        acc = jnp.zeros((), jnp.float32)
        for i in range(n):
            y = fn(x, *weights[i % len(weights)])
            x = x + (y[:, :1] * 1e-6).astype(x.dtype)    # depend on the previous call
            acc = acc + y[0, 0].astype(jnp.float32)
        return acc
    return jax.jit(loop)


def timed(fn, x, weights, iters: int, reps: int, differential: bool = True) -> float:
    """Median per-call microseconds of ``fn(x, *w)`` chained ``iters`` times in one jit.

    ``differential`` (the default since session 31): the chain is also run ``2 * iters`` long,
    the two lengths in turn, and a call's time is the difference of the medians over ``iters``:
    what one wall-clock reading carries besides the calls (the jit's dispatch, the first
    launch, the host's wait for the device: tens of us, 5-15% of a 20-call chain of 30-50 us
    kernels) cancels; noise larger than ``iters`` calls can leave it <= 0 (a loaded CPU: raise
    ``iters`` and ``reps``). Else the plain quotient of one reading (sessions 13-31's figures)."""
    def chain(n):
        f = chained(fn, n)
        jax.block_until_ready(f(x, weights))
        return f

    lengths = (iters, 2 * iters) if differential else (iters,)
    fs = [chain(n) for n in lengths]
    times: list[list[float]] = [[] for _ in lengths]
    for _ in range(reps):
        for f, out in zip(fs, times, strict=True):
            t = time.perf_counter()
            jax.block_until_ready(f(x, weights))
            out.append(time.perf_counter() - t)
    if differential:
        return (statistics.median(times[1]) - statistics.median(times[0])) / iters * 1e6
    return statistics.median(times[0]) / iters * 1e6


def add_clock_arguments(parser: argparse.ArgumentParser, trace_dir: str) -> None:
    """``--clock device|chain|wall``, ``--trace-dir``, ``--iters`` and ``--reps`` (``KernelClock``'s
    arguments and what each measurement passes it)."""
    parser.add_argument("--clock", choices=("device", "chain", "wall"), default="device",
                        help="device: each kernel's own duration from a profiler trace (session 32 "
                             "on); chain: the difference of two chain lengths' wall clock (session "
                             "31); wall: one chain's wall clock over its length (sessions 13-30)")
    parser.add_argument("--trace-dir", default=trace_dir, help="where the device clock's traces go")
    parser.add_argument("--iters", type=int, default=20, help="calls chained in one measurement")
    parser.add_argument("--reps", type=int, default=5, help="measurements; the median is reported")


class KernelClock:
    """Microseconds per call of ``fn(x, *weights[i])`` chained ``iters`` times, on the chosen
    clock: ``now`` returns it at once; ``later`` (device clock) returns a label that the next
    ``DeviceClock.flush`` resolves, so a section's measurements share one trace."""

    def __init__(self, kind: str, trace_dir: str) -> None:
        self.kind = kind
        self.device = DeviceClock(trace_dir) if kind == "device" else None

    def later(self, fn: Callable, x, weights, iters: int, reps: int) -> float | str:
        if self.device is None:
            return timed(fn, x, weights, iters, reps, differential=self.kind == "chain")
        return self.device.run(f"m{len(self.device.labels)}", chained(fn, iters), x, weights, reps=reps)

    def now(self, fn: Callable, x, weights, iters: int, reps: int) -> float:
        got = self.later(fn, x, weights, iters, reps)
        return self.device.flush()[got].median_us if isinstance(got, str) else got


def clock_and_ceiling(ns: argparse.Namespace) -> tuple[KernelClock, float]:
    """``add_clock_arguments``' clock and, on the device clock, the 2 GiB read ceiling in GB/s
    (``read_ceiling``; NaN on the others). ``ns`` also needs ``reps``."""
    kclock = KernelClock(ns.clock, ns.trace_dir)
    return kclock, read_ceiling(kclock.device, ns.reps) if kclock.device else float("nan")


def weight_copies(n: int, k: int, quantized: bool) -> list[tuple]:
    """Random int8 [n, k] weights, enough copies to pass 150 MB (at least 2; read in turn, none
    is served from the L2): ``quantized``, (q, per-channel scale) of normal weights
    (``reference.quantize_weight``); else (w,) of uniform bytes."""
    def make(key):
        if quantized:
            return reference.quantize_weight(jax.random.normal(key, (n, k)) * 0.02, jnp.int8)
        return (jax.random.randint(key, (n, k), -127, 128, jnp.int32).astype(jnp.int8),)
    return [make(jax.random.key(c)) for c in range(max(2, -(-150_000_000 // (n * k))))]


def print_reads(title: str, rows: list[tuple[str, float | str]], kclock: KernelClock, nbytes: int,
                ceiling: float) -> None:
    """A markdown table of (what, us or a ``KernelClock.later`` label) rows read as ``nbytes``
    each: us, GB/s, the share of ``ceiling`` and, on the device clock, the heaviest kernel, its
    runs and every kernel's us per run (the labels resolved by one flush)."""
    stats = kclock.device.flush() if kclock.device else {}
    print(f"{title}\n\n| what | us | weight GB/s | of the ceiling | device: kernel, runs, all kernels us "
          "per run |\n|---|---|---|---|---|")
    for what, got in rows:
        st = stats.get(got) if isinstance(got, str) else None
        us = st.median_us if st else got
        gbs = nbytes / us / 1e3
        extra = f"{st.kernel}, {st.count}, {st.all_us:.2f}" if st else ""
        print(f"| {what} | {us:.2f} | {gbs:.0f} | {gbs / ceiling:.0%} | {extra} |")
