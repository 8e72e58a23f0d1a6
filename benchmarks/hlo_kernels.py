"""Which kernels one optimized step program launches that another does not: a census by kind.

Where it sits: offline analysis of ``step_floor.py --dump`` output (issue 13: the 8B's int8 decode
step launches 527 kernels against bf16's 399, 4 more per layer, and runs at 76% of the HBM
floor). Reads two optimized HLO texts and counts the instructions that launch device work in the
ENTRY computation and in the command-buffer computations it calls, by kind: a fusion's name with
its numbering dropped (XLA names fusions after their root ops: ``loop_multiply_fusion``,
``input_reduce_fusion``), a custom call's target, or the opcode. Prints the kinds whose counts
differ, largest difference first::

    PYTHONPATH=. python3 benchmarks/hlo_kernels.py A.hlo.txt B.hlo.txt [--all]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

NOT_KERNELS = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
               "partition-id", "replica-id")
INSTR = re.compile(r"\s*(?:ROOT\s+)?%?([\w.\-]+) = [^=]*? ([\w\-]+)\((.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def computations(text: str) -> tuple[str, dict[str, list[str]]]:
    """-> (the ENTRY computation's name, name -> body lines) of an HLO module's text."""
    bodies: dict[str, list[str]] = {}
    entry, name = "", None
    for line in text.splitlines():
        if name is None:
            m = _HEADER.match(line)
            if m:
                name = m.group(2)
                bodies[name] = []
                entry = name if m.group(1) else entry
        elif line.startswith("}"):
            name = None
        else:
            bodies[name].append(line)
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return entry, bodies


def census(text: str) -> Counter:
    """Kernel-launching instructions of the ENTRY computation and of the command buffers it
    calls, counted by kind (module docstring)."""
    entry, bodies = computations(text)
    out: Counter = Counter()
    todo = [entry]
    while todo:
        for line in bodies.get(todo.pop(), []):
            m = INSTR.match(line)
            if not m:
                continue
            name, op, rest = m.groups()
            if op == "call":
                callee = re.search(r"to_apply=%?([\w.\-]+)", rest)
                if callee and callee.group(1).startswith("command_buffer"):
                    todo.append(callee.group(1))
                continue
            if op in NOT_KERNELS:
                continue
            if op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', rest)
                out[f"custom-call {target.group(1) if target else '?'}"] += 1
            elif op == "fusion":
                out[re.sub(r"[.\d]+$", "", name)] += 1
            else:
                out[op] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--all", action="store_true", help="also the kinds whose counts are equal")
    ns = ap.parse_args()
    ca, cb = census(ns.a.read_text()), census(ns.b.read_text())
    print(f"## kernels per step: {ns.a.name} {sum(ca.values())}, {ns.b.name} {sum(cb.values())}")
    print(f"| kind | {ns.a.name} | {ns.b.name} | difference |")
    print("|---|---|---|---|")
    for kind in sorted(set(ca) | set(cb), key=lambda k: (-abs(ca[k] - cb[k]), k)):
        if ns.all or ca[kind] != cb[kind]:
            print(f"| {kind} | {ca[kind]} | {cb[kind]} | {ca[kind] - cb[kind]:+d} |")


if __name__ == "__main__":
    main()
