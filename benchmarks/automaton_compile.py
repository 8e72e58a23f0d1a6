"""A new spec's token-automaton compile at a real vocabulary width: its wall time and the longest
stall it causes the engine process's other threads (the interpreter lock).

Where it sits: beside benchmarks/structured_outputs.py. Front-end threads compile a new spec's
automaton (``LLMEngine.compile_grammar`` -> jserve/structured/automaton.py) while the engine
thread plans and launches steps, which needs the interpreter every millisecond or so. A ticker
thread stands for it here: it sleeps 1 ms at a time, and the longest gap between its wakeups
(less the 1 ms) is the longest the compile stopped it. Arms: ``in-process`` (outlines' index and
its transition dict in this process) and ``worker`` (jserve/structured/automaton_worker.py: in a
child process, only the table's bytes come back). The worker arm's first round includes the
child's start (imports and outlines' vocabulary).

Vocabularies: the bundled tokenizer's 8,192 ids, and 151,936 (Qwen2.5's width) made of copies of
them with one suffix byte per copy (no hub tokenizer here); the benchmark schema of
benchmarks/structured_outputs.py, a fresh cache each round.

    PYTHONPATH=. python3 benchmarks/automaton_compile.py [--vocab 8192,151936] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from benchmarks.structured_outputs import SCHEMA
from jserve.builder import default_model_path
from jserve.structured.automaton import AutomatonCompiler, token_bytes
from jserve.structured.grammar import StructuredOutputsParams, make_ll_tokenizer

EOS = (1,)


def _vocabulary(size: int) -> tuple[list[bytes | None], object]:
    """(bytes of ``size`` ids, the bundled llguidance tokenizer) as the module docstring says."""
    text = (default_model_path() / "tokenizer.json").read_text()
    ll = make_ll_tokenizer(text, 8192, EOS)
    base = token_bytes(ll, 8192)
    tokens = [None if (b := base[i % 8192]) is None else b + (bytes([0x60 + i // 8192]) if i >= 8192 else b"")
              for i in range(size)]
    tokens[EOS[0]] = None
    return tokens, ll


def _stalls(fn, *args) -> tuple[float, float, object]:
    """(wall s, longest ticker stall ms, fn's result) of ``fn(*args)`` run beside a 1 ms ticker."""
    gaps, stop = [], threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last - 0.001)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    time.sleep(0.05)
    t = time.perf_counter()
    out = fn(*args)
    wall = time.perf_counter() - t
    stop.set()
    ticker.join()
    return wall, 1e3 * max(gaps), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", default="8192,151936", help="comma-separated vocabulary sizes")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    key = StructuredOutputsParams(json=json.dumps(SCHEMA)).key
    print("| vocabulary | arm | round | compile s | longest stall of the ticker, ms | states |")
    print("|---|---|---|---|---|---|")
    for size in map(int, args.vocab.split(",")):
        tokens, ll = _vocabulary(size)
        for arm in ("in-process", "worker"):
            comp = AutomatonCompiler(tokens, EOS, size, 2000, tokenize=ll.tokenize_bytes,
                                     worker=arm == "worker")
            for r in range(args.rounds):
                comp._cache.clear()
                wall, stall, a = _stalls(comp.compile, key)
                print(f"| {size:,} | {arm} | {r + 1} | {wall:.2f} | {stall:.0f} | "
                      f"{a.num_states if a is not None else '-'} |", flush=True)
            comp.close()


if __name__ == "__main__":
    main()
