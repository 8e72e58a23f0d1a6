"""The grammar engine's host cost alone: llguidance's parallel mask fill and token advance for B
sequences under the structured-outputs benchmark's JSON schema, by executor threads, with the
interpreter idle and beside a busy Python thread (the engine thread planning and launching).

Where it sits: beside benchmarks/structured_outputs.py, which times the whole engine; this
isolates the part of a constrained step that ``ConstraintTracker.masks`` / ``advance_all``
(jserve/structured/constraints.py) spend in llguidance, so the engine's figures (session 30,
H200 host: fill 0.82-0.85 ms, advance 0.84-0.94 ms for 64 rows) can be read against what the
library needs on that machine's cores.

Each step fills every sequence's next-token mask (the model's 151,936-token width over the
bundled tokenizer's ids, as the H200 benchmark runs it), picks an allowed token per row with a
fixed seed, and advances every matcher by it; the medians are over the steps of one document.

    PYTHONPATH=. python3 benchmarks/grammar_host.py [--rows 16,64] [--threads 1,2,4,8,0]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

import llguidance
import llguidance.numpy as llnp
import numpy as np

from benchmarks.structured_outputs import SCHEMA
from jserve.builder import default_model_path

VOCAB = 151936   # Qwen2.5's model width (the mask's), as in the H200 benchmark


def _busy(stop: threading.Event) -> None:
    """A Python thread that holds the interpreter in short stretches, as the engine thread does."""
    a = np.zeros(64, np.int32)
    while not stop.is_set():
        for i in range(200):
            a[i % 64] += i


def run(tok: llguidance.LLTokenizer, grammar: str, rows: int, threads: int, busy: bool,
        steps: int) -> tuple[float, float]:
    """-> (median fill ms, median advance ms) over up to ``steps`` steps of ``rows`` sequences."""
    ex = llguidance.LLExecutor(threads or None)
    ms = [llguidance.LLMatcher(tok, grammar, log_level=0) for _ in range(rows)]
    out = np.full((rows, (VOCAB + 31) // 32), -1, np.int32)
    rng = np.random.default_rng(0)
    stop = threading.Event()
    other = threading.Thread(target=_busy, args=(stop,), daemon=True) if busy else None
    if other:
        other.start()
    fills, advances = [], []
    try:
        for _ in range(steps):
            t = time.perf_counter()
            llnp.fill_next_token_bitmask_par(ex, [(m, i) for i, m in enumerate(ms)], out)
            fills.append(time.perf_counter() - t)
            bits = np.unpackbits(out.view(np.uint8), axis=1, bitorder="little")[:, :VOCAB]
            toks = [int(rng.choice(np.flatnonzero(b))) for b in bits]
            t = time.perf_counter()
            ex.consume_token_par(list(zip(ms, toks, strict=True)))
            advances.append(time.perf_counter() - t)
            if any(m.is_stopped() for m in ms):
                break
    finally:
        stop.set()
        if other:
            other.join()
    return 1e3 * statistics.median(fills), 1e3 * statistics.median(advances)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="16,64")
    ap.add_argument("--threads", default="1,2,4,8,0", help="executor threads (0: llguidance's default, "
                                                         "80%% of the cores)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--switch", type=float, default=None,
                    help="sys.setswitchinterval seconds (Python's default 0.005: how long a thread "
                         "back from llguidance may wait for the busy thread's interpreter lock)")
    ns = ap.parse_args()
    if ns.switch:
        sys.setswitchinterval(ns.switch)
    tj = open(os.path.join(default_model_path(), "tokenizer.json")).read()
    tok = llguidance.LLTokenizer(tj, n_vocab=VOCAB)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA),
                                                            overrides={"whitespace_flexible": False})
    print(f"cores: {os.cpu_count()}, llguidance {getattr(llguidance, '__version__', '?')}, "
          f"switch interval {sys.getswitchinterval()} s")
    print("| rows | executor threads | fill ms (idle) | advance ms (idle) | fill ms (busy thread) "
          "| advance ms (busy thread) |")
    print("|---|---|---|---|---|---|")
    for rows in (int(v) for v in ns.rows.split(",")):
        for threads in (int(v) for v in ns.threads.split(",")):
            idle = run(tok, grammar, rows, threads, False, ns.steps)
            busy = run(tok, grammar, rows, threads, True, ns.steps)
            print(f"| {rows} | {threads or 'default'} | {idle[0]:.3f} | {idle[1]:.3f} | {busy[0]:.3f} "
                  f"| {busy[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
