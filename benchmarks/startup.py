"""Cold and warm start-up of one engine shape, phase by phase (issue 11's start-up target).

Each run builds the engine in a fresh process (random weights) and reads the builder's log: the
first run over an empty compilation cache (cold: every step variant compiles, XLA's autotuner
times its kernels), then runs over the cache the first one filled (warm: JAX's persistent
cache serves the executables; tracing and lowering still run). Prints one table::

    PYTHONPATH=. python3 benchmarks/startup.py --model llama3.1-8b [--runs cold,warm]

Phases, from the log's timestamps: weights (process start to the activation probe's start,
random weights made on the device), the activation probe (``jserve/activation_peak.py``), the
step variants' compile (lowering included), warm-up (each program run once, the small programs
compiled), and the engine's own ``startup_seconds``; beside them the activation peak the probe
measured (its programs compiled without code optimizations) and the compiled steps' own, and
the pool's pages.
``--cache-dir`` keeps the cache (default: a new temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

_PHASES = (("probe", r"activation peak: .*measured in ([\d.]+) s"),
           ("compile", r"compiled \d+ step variants .* in ([\d.]+) s"),
           ("lower", r"tracing and lowering ([\d.]+) s"),
           ("warm", r"ran each step variant once .* in ([\d.]+) s"),
           ("ready", r"engine ready in ([\d.]+) s"),
           ("probe_mib", r"^activation peak: ([\d.]+) MiB"),   # the probe's figure, or the kept one
           ("steps_mib", r"compiled step programs' activation peak: ([\d.]+) MiB"),
           ("pages", r"KV pool: (\d+) pages"))


def child(ns: argparse.Namespace) -> None:
    """Build one engine in this process, printing each phase as it ends ("PHASE name seconds",
    and "STEP k/N at s" per compiled step variant), then "DONE" with the totals as JSON."""
    import logging

    t0 = time.perf_counter()

    class Phases(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            for name, pattern in _PHASES:
                if m := re.search(pattern, msg):
                    print(f"PHASE {name} {m.group(1)} {time.perf_counter() - t0:.1f}", flush=True)
            if m := re.search(r"compiled step (\d+/\d+) \(tokens (\d+),.* at ([\d.]+) s", msg):
                print(f"STEP {m.group(1)} t{m.group(2)} {m.group(3)}", flush=True)

    logging.basicConfig(level=logging.INFO)
    logging.getLogger().addHandler(Phases())
    from jserve.builder import EngineArgs, build_engine
    if ns.compile_threads is not None:
        from jserve.runner import Runner

        Runner.compile_threads = lambda self: ns.compile_threads  # benchmark A/B only
    if ns.twin_max_tokens is not None:
        from jserve import host_outputs

        host_outputs.TWIN_MAX_TOKENS = ns.twin_max_tokens  # benchmark A/B only
    engine = build_engine(EngineArgs(
        model=ns.model, random_weights=True, dtype="bfloat16", max_num_seqs=ns.max_num_seqs,
        max_num_batched_tokens=ns.max_num_batched_tokens, max_model_len=ns.max_model_len,
        compilation_cache_dir=ns.cache_dir))
    process_s = time.perf_counter() - t0
    from jserve.sampling_params import SamplingParams  # the engine then decodes: same tokens?

    engine.add_request("check", list(range(100, 132)), SamplingParams(temperature=0.0, max_tokens=16,
                                                                      ignore_eos=True))
    tokens: list[int] = []
    while engine.has_unfinished_requests():
        tokens = next((o.outputs[0].token_ids for o in engine.step() if o.finished), tokens)
    stored = engine.runner.executables
    print("DONE " + json.dumps({"process_s": process_s, "variants": len(engine.runner.variants()),
                                "tokens": hashlib.sha256(str(tokens).encode()).hexdigest()[:12],
                                "loaded": stored.loaded if stored else "-"}), flush=True)


def run_child(cmd: list[str], timeout: float) -> tuple[dict, str]:
    """Run one child -> (phase seconds by name, plus process_s / variants when it finished; the
    last compiled-step line, for a run that timed out)."""
    out: dict = {}
    last = ""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ))
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            kind, _, rest = line.strip().partition(" ")
            if kind == "PHASE":
                name, seconds, _ = rest.split()
                out[name] = float(seconds)
            elif kind == "STEP":
                last = rest
                out.setdefault("steps", []).append(rest)
            elif kind == "DONE":
                out.update(json.loads(rest))
    finally:
        timer.cancel()
        proc.wait()
    return out, last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--runs", default="cold,warm")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--timeout", type=float, default=400, help="seconds per run")
    ap.add_argument("--compile-threads", type=int, default=None,
                    help="programs compiled at once after each bucket's first (default: the runner's)")
    ap.add_argument("--twin-max-tokens", type=int, default=None,
                    help="twin executables up to this token bucket (jserve/host_outputs.py)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        return child(ns)
    cache = ns.cache_dir or tempfile.mkdtemp(prefix="jserve_startup_")
    print(f"\n## start-up of {ns.model} (max_num_seqs {ns.max_num_seqs}, budget "
          f"{ns.max_num_batched_tokens} tokens, max_model_len {ns.max_model_len}, compile threads "
          f"{ns.compile_threads or 'default'}, twins up to "
          f"{'default' if ns.twin_max_tokens is None else ns.twin_max_tokens} tokens)")
    print("| run | process s | engine startup_s | of it: activation probe | step variants compile "
          "| of it: tracing and lowering | warm-up | variants | stored executables loaded "
          "| greedy tokens (digest) | activation peak MiB: probe / compiled steps | KV pages |"
          "\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    try:
        for run in ns.runs.split(","):
            cmd = [sys.executable, __file__, "--child", "--model", ns.model, "--max-num-seqs",
                   str(ns.max_num_seqs), "--max-num-batched-tokens", str(ns.max_num_batched_tokens),
                   "--max-model-len", str(ns.max_model_len), "--cache-dir", cache,
                   *(["--compile-threads", str(ns.compile_threads)] if ns.compile_threads else []),
                   *([] if ns.twin_max_tokens is None else ["--twin-max-tokens", str(ns.twin_max_tokens)])]
            r, last = run_child(cmd, ns.timeout)
            f = {k: ("-" if r.get(k) is None else f"{r[k]:.1f}")
                 for k in ("process_s", "ready", "probe", "compile", "lower", "warm", "probe_mib",
                           "steps_mib")}
            total = (f["process_s"] if "process_s" in r
                     else f"> {ns.timeout:.0f} (stopped; last step {last or '-'})")
            print(f"| {run} | {total} | {f['ready']} | {f['probe']} | {f['compile']} | {f['lower']} "
                  f"| {f['warm']} | {r.get('variants', '-')} | {r.get('loaded', '-')} "
                  f"| {r.get('tokens', '-')} | {f['probe_mib']} / {f['steps_mib']} "
                  f"| {r.get('pages', 0):.0f} |", flush=True)
            if r.get("steps"):   # when each step variant finished (the compile's critical path)
                print(f"| {run}: step k/N, bucket, at s | {'; '.join(r['steps'])} |", flush=True)
            if "process_s" not in r:
                break
    finally:
        if ns.cache_dir is None:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
