"""Compiling start-up's programs on threads.

Where it sits: start-up. Programs are lowered in turn on the calling thread (tracing holds the
GIL) and compiled on a thread pool (XLA's compile releases it)::

    compile_in_order   the step programs (``Runner.compile_programs``: step variants,
                       speculative variants, the activation probe's). On GPU, XLA's autotuner
                       times candidate kernels on the device while it compiles, and concurrent
                       compiles spoil each other's timings (an H200: 8 threads took 106 s for 6
                       Qwen-0.5B variants, with "Delay kernel timed out" warnings), so the first
                       program of each autotuned Triton-GEMM token bucket compiles alone
                       (that bucket's matmuls, the same shapes in all its programs, are tuned
                       there) and the rest on threads, their kernels found in XLA's per-fusion
                       autotune cache. The split step's pairs come after the step variants.
                       At most ``COMPILE_THREADS`` at once: an H200 host (16 cores) compiled
                       the Llama-3.1-8B's 26 cold step programs in 58.9 s on 4 threads and in
                       42.6 s on 8 (session 18; XLA's compiles use threads of their own too).
    compile_each       all on threads: warm-up's small programs (slot writers, penalty inits,
                       logit state writers: no matmul for the autotuner) and the split step's
                       pairs when compiled on their own (``Runner.compile_split``).

GEMMs per token bucket on GPU (``compiler_options``): buckets of ``CUBLAS_MIN_TOKENS`` tokens
and more run their matmuls through cuBLAS instead of XLA's Triton GEMMs. Measured on an H200
(benchmarks/RESULTS.md, session 13, Qwen2.5-0.5B's greedy step, fresh compiles): at 2048, 256
and 128 tokens cuBLAS compiled in 3.9 / 3.6 / 2.7 s against 46.4 / 37.6 / 28.9 s (the autotuner
compiles and times many Triton candidates per GEMM shape) and ran the step 6-11% faster; at 64
tokens it ran 3% slower (20.5 s of compile against 2.9) and at 16 (a decode step) 13% slower,
so small buckets keep the autotuned Triton GEMMs. XLA's autotune level 0 (no autotuning, Triton
kept) ran 6.5-21x slower: not an option.

Wide models (``WIDE_HIDDEN`` and more, ``cublas_min_tokens``) take cuBLAS from
``WIDE_CUBLAS_MIN_TOKENS`` (32) tokens: only the decode bucket (16 tokens) keeps the autotuned
Triton GEMMs. On an H200 (Llama-3.1-8B, fresh compiles) cuBLAS ran the greedy step's 32 /
64-token buckets at 1.011x / 0.994x the autotuned Triton GEMMs' time and compiled them in 4.1 /
3.4 s against 38.2 / 32.7 s (session 17: those two buckets were 85 s of a 244 s cold start), and
the 16-token decode step at 1.044x (4.781 ms against 4.580; compiled in 3.3 s against 35.2 s
alone). XLA's untuned Triton GEMMs (autotune level 0), which session 17 took for the 16-token
bucket from an A/B where the level-0 compile followed an autotuned compile of the same step in
the process (XLA keeps autotuning results per process, and the level-0 compile apparently found
them), ran that step in 24.4 ms (5.3x; session 18, `compile_ab.py` with level 0 first, and the
engine's batch-1 decode at 41 tok/s) until it went. The 16-token bucket then took cuBLAS too
(sessions 18-36), for its ~32 s of compile: three same-process A/Bs since put the 8B's bf16
decode step 4-7% faster with the autotuned GEMMs (4.58 / 4.78 ms, session 18; 4.48 / 4.72,
session 33; 4.544 / 4.876, session 37), and decode is what a user waits on token by token, while
the executable cache keeps the compile out of every later start-up: the decode bucket is
autotuned again. On Qwen2.5-0.5B (hidden 896) cuBLAS ran the 16-token step 13% slower, so narrow
models keep the autotuner below ``CUBLAS_MIN_TOKENS``. Only autotuned buckets' first programs
compile alone.

XLA's rematerialization pass is off for every step program on GPU. Its memory limit is the
device's, and it counts the arguments: with the KV pool filling the share, every real-size step
"exceeds" it ("Can't reduce memory use below 69.85GiB ... only reduced to 86.70GiB", an H200 at
share 0.5), so the pass ran on each compile for nothing it could save (seconds per program) and
rewrote programs that the start-up probe had measured without it (its 2-page pool never
triggers the pass: the activation peak is the unrematerialized programs'). Session 16's burst
loop came back with its layers' weight slices rematerialized ("remat2" copies). Measured (H200,
same call, Qwen2.5-0.5B at share 0.5): the engine built in 99 s against 150 s with the pass, its
steps as fast (batch-1 decode 771 / 745 tok/s, bursts 1005 / 983).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jserve.executable_cache import ExecutableCache

CUBLAS_MIN_TOKENS = 128   # GPU token buckets from this size on: cuBLAS GEMMs (module docstring)
COMPILE_THREADS = 8       # programs compiled at once, at most (``Runner.compile_threads``)
WIDE_HIDDEN = 4096        # models this wide: cuBLAS from WIDE_CUBLAS_MIN_TOKENS
WIDE_CUBLAS_MIN_TOKENS = 32   # wide models' buckets from this size on: cuBLAS (decode's: Triton)


def cublas_min_tokens(hidden_size: int) -> int:
    """The smallest GPU token bucket whose matmuls go to cuBLAS for a model of ``hidden_size``
    (module docstring): ``WIDE_CUBLAS_MIN_TOKENS`` for wide models, ``CUBLAS_MIN_TOKENS`` for
    narrow ones (XLA's autotuned Triton GEMMs below)."""
    return WIDE_CUBLAS_MIN_TOKENS if hidden_size >= WIDE_HIDDEN else CUBLAS_MIN_TOKENS


def compiler_options(tokens: int, gpu: bool, cublas_from: int = CUBLAS_MIN_TOKENS) -> dict[str, Any]:
    """XLA options for compiling a program of a ``tokens`` bucket (module docstring)."""
    if not gpu:
        return {}
    options: dict[str, Any] = {"xla_disable_hlo_passes": "rematerialization"}
    if tokens >= cublas_from:
        options["xla_gpu_enable_triton_gemm"] = False
    return options


def compile_in_order(programs: list[tuple[int, Callable[[], Any]]], threads: int, gpu: bool,
                     done: Callable[[int, Any, int], None] | None = None,
                     timings: dict[str, float] | None = None,
                     cublas_from: int = CUBLAS_MIN_TOKENS, stored: ExecutableCache | None = None,
                     names: list[str] | None = None) -> list[Any]:
    """Compile ``(token bucket, lower)`` pairs -> their executables, in order; ``done(i,
    executable, how many have finished)`` as each finishes. ``gpu``: each autotuned bucket's
    first program alone first (module docstring). ``timings["lower_s"]`` accumulates the
    seconds spent tracing and lowering (on the calling thread: with warm caches most of a
    start-up's compile phase). ``stored`` with ``names`` (one per program): executables kept
    there are loaded instead (no tracing, no lowering) and the others kept there once compiled
    (jserve/executable_cache.py)."""
    def lower(i: int) -> Any:
        t = time.perf_counter()
        try:
            return programs[i][1]()
        finally:
            if timings is not None:
                timings["lower_s"] = timings.get("lower_s", 0.0) + time.perf_counter() - t

    options = [compiler_options(tokens, gpu, cublas_from) for tokens, _ in programs]
    keep = stored is not None and names is not None
    out: list[Any] = [None] * len(programs)
    finished = 0

    def finish(i: int, compiled: Any, fresh: bool = True) -> None:
        nonlocal finished
        out[i], finished = compiled, finished + 1
        if fresh and keep:   # serialized and written beside the compiles (joined at the end)
            pool.submit(stored.store, names[i], options[i], compiled)
        if done is not None:
            done(i, compiled, finished)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        if keep:
            loads = [pool.submit(stored.load, names[i], options[i]) for i in range(len(programs))]
            for i, fut in enumerate(loads):
                if (exe := fut.result()) is not None:
                    finish(i, exe, fresh=False)
        alone: dict[int, int] = {}
        if gpu:
            for i, (tokens, _) in enumerate(programs):
                if tokens < cublas_from and out[i] is None:
                    alone.setdefault(tokens, i)
        for i in alone.values():
            finish(i, lower(i).compile(options[i]))
        futures = [(i, pool.submit(lower(i).compile, options[i])) for i in range(len(programs))
                   if out[i] is None and i not in alone.values()]
        for i, fut in futures:
            finish(i, fut.result())
    return out


def compiled_extra_bytes(compiled: Any) -> int:
    """Bytes a compiled program allocates while it runs, beyond its arguments: temporaries plus
    the outputs that do not reuse a donated input's buffer."""
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes) + max(0, int(m.output_size_in_bytes) - int(m.alias_size_in_bytes))


def _memory_stats(device: Any) -> dict:
    """The allocator's statistics of ``device`` ({} where the backend keeps none)."""
    return (device.memory_stats() if hasattr(device, "memory_stats") else None) or {}


def out_of_memory_note(what: str, compiled: Any, device: Any) -> str:
    """A warm-up out-of-memory error's context: the program, what its compile measured and
    what the device's allocator held (the activation budget is the fix's lever)."""
    try:
        m = compiled.memory_analysis()
        measured = (f"its compile measured {m.temp_size_in_bytes / 2**20:.1f} MiB of temporaries, "
                    f"{m.output_size_in_bytes / 2**20:.1f} MiB of outputs "
                    f"({m.alias_size_in_bytes / 2**20:.1f} MiB aliased to donated inputs)")
    except (AttributeError, RuntimeError, TypeError):   # a loaded executable may keep no analysis
        measured = "its compile's memory analysis is not available"
    stats = _memory_stats(device)
    return (f"{what} ran out of device memory in its first run: {measured}; the device held "
            f"{stats.get('bytes_in_use', 0) / 2**30:.2f} GiB of {stats.get('bytes_limit', 0) / 2**30:.2f} "
            "GiB. Lower gpu_memory_utilization or raise activation_memory_bytes")


def buffer_addresses(tree: Any) -> list[int]:
    """Device addresses of every local shard of the arrays in ``tree`` (sharded pools too)."""
    import jax

    return [s.data.unsafe_buffer_pointer() for a in jax.tree.leaves(tree) for s in a.addressable_shards]


@contextlib.contextmanager
def out_of_memory_named(what: str, compiled: Any, device: Any) -> Iterator[None]:
    """Around a program's first run: a device out-of-memory error becomes a MemoryError with
    ``out_of_memory_note``'s context; other errors pass unchanged."""
    import jax

    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise MemoryError(out_of_memory_note(what, compiled, device)) from e


def warm_memory_line(pool_before: list[int] | None, pool: Any, device: Any) -> str:
    """A warm-up step's debug line: the pool shards the step did not update in place (a donated
    array copied: a pool array's bytes the activation budget does not hold) and the device's
    use, peak so far and largest free block. ``pool_before``: ``buffer_addresses`` of the pool
    before the step (None: the line before the first step, no count)."""
    stats = _memory_stats(device)
    line = (f"device in use {stats.get('bytes_in_use', 0) / 2**30:.2f} GiB, "
            f"peak {stats.get('peak_bytes_in_use', 0) / 2**30:.2f}, "
            f"largest free block {stats.get('largest_free_block_bytes', 0) / 2**30:.2f}")
    if pool_before is None:
        return line
    after = buffer_addresses(pool)
    moved = sum(a != b for a, b in zip(pool_before, after, strict=True))
    return f"{moved} of {len(after)} pool buffers moved; {line}"


def split_peak_bytes(forward: Any, sampler: Any) -> int:
    """The split step's peak (jserve/split_step.py) from its compiled pair: the forward's, or
    its logits kept for the sampler plus the sampler's."""
    m = forward.memory_analysis()
    kept = int(m.output_size_in_bytes) - int(m.alias_size_in_bytes)   # the logits: the rest is donated
    return max(compiled_extra_bytes(forward), kept + compiled_extra_bytes(sampler))


def steps_peak_bytes(steps: list[Any], pairs: list[tuple[Any, Any]]) -> int:
    """The activation peak of compiled step programs and split pairs (the activation probe's
    figure, measured again on the real pool's programs)."""
    return max([compiled_extra_bytes(c) for c in steps] + [split_peak_bytes(*p) for p in pairs], default=0)


def compile_each(lowered: dict[Hashable, Any], pool: Executor | None = None,
                 options: Callable[[Hashable], dict[str, Any]] | None = None) -> dict[Hashable, Any]:
    """``{key: jax.stages.Lowered}`` -> ``{key: jax.stages.Compiled}``, on ``pool`` when given;
    ``options(key)``: that program's XLA options (``compiler_options``)."""
    def opts(k: Hashable) -> dict[str, Any]:
        return {} if options is None else options(k)

    if pool is None:
        return {k: low.compile(opts(k)) for k, low in lowered.items()}
    futures = {k: pool.submit(low.compile, opts(k)) for k, low in lowered.items()}
    return {k: f.result() for k, f in futures.items()}
