"""Forced text in a token automaton takes the tokenizer's canonical tokenization.

Where it sits: ``AutomatonCompiler._build`` (jserve/structured/automaton.py) calls
``force_canonical`` on a spec's dense table before the engine loads it. Where the grammar forces
text (a property name, the rest of an enum value, ``</tool_call>``), the raw automaton allows
every split of it into tokens, and a model sampling under the mask may walk it a byte at a time:
off the tokenizations it was trained on, and in more tokens (a 512-token test model spelled a
forced 80-byte tool call in over 60 tokens; llguidance, the host path, allows the canonical
split only). Here, in a state whose every continuation starts with the same bytes ``F`` (the
forced run; a state that allows EOS forces nothing), the tokens that end inside ``F`` are cut
to the first token of ``tokenize(F)``; tokens that cover ``F`` and go on stay. States no longer
reachable are dropped::

    F(s) = longest common prefix over allowed t of bytes(t) + F(next(s, t))   (a fixed point,
           at most ``MAX_FORCED`` bytes; "" where EOS is allowed or first bytes differ)
    allowed(s) = {tokenize(F(s))[0]} + {t : len(bytes(t)) > len(F(s))}        where F(s) != ""
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

MAX_FORCED = 256   # bytes of a forced run considered (a token is far shorter)


def _forced_runs(table: np.ndarray, tokens: list[bytes | None], eos: np.ndarray) -> dict[int, bytes]:
    """Forced run F(s) of every state that has one (module docstring)."""
    first = np.array([b[0] if b else -1 for b in tokens[:table.shape[1]]], np.int64)
    cand = {}
    for s in range(table.shape[0]):
        row = table[s]
        if (row[eos] >= 0).any():
            continue
        allowed = np.flatnonzero(row >= 0)
        if len(allowed) and (first[allowed] == first[allowed[0]]).all():
            cand[s] = [(int(t), int(row[t])) for t in allowed]
    forced = dict.fromkeys(cand, b"")
    for _ in range(MAX_FORCED):   # each round can only lengthen a run; stop when none moves
        moved = False
        for s, arcs in cand.items():
            run = os.path.commonprefix([tokens[t] + forced.get(nxt, b"") for t, nxt in arcs])[:MAX_FORCED]
            if run != forced[s]:
                forced[s], moved = run, True
        if not moved:
            break
    return {s: run for s, run in forced.items() if run}


def force_canonical(table: np.ndarray, initial: int, done: np.ndarray, tokens: list[bytes | None],
                    eos: np.ndarray, tokenize: Callable[[bytes], list[int]]
                    ) -> tuple[np.ndarray, int, np.ndarray]:
    """(table int16[n, V], initial, done bool[n]) with forced runs cut to their canonical first
    token and unreachable states dropped -> the same three for the smaller automaton."""
    table = table.copy()
    lengths = np.array([len(b) if b else 0 for b in tokens[:table.shape[1]]], np.int64)
    for s, run in _forced_runs(table, tokens, eos).items():
        ids = tokenize(run)
        canon = ids[0] if ids else -1
        if not 0 <= canon < table.shape[1] or table[s, canon] < 0:
            continue   # (the tokenizer's split is not one the automaton allows: leave the state)
        cut = (table[s] >= 0) & (lengths <= len(run))
        cut[canon] = False
        table[s, cut] = -1
    seen, todo = {initial}, [initial]
    while todo:   # forward reachability from the start state
        row = table[todo.pop()]
        for nxt in np.unique(row[row >= 0]).tolist():
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    keep = np.array(sorted(seen), np.int64)
    remap = np.full(table.shape[0], -1, np.int64)
    remap[keep] = np.arange(len(keep))
    small = table[keep]
    small = np.where(small >= 0, remap[np.maximum(small, 0)], -1).astype(np.int16)
    return small, int(remap[initial]), done[keep]
