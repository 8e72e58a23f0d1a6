"""AutomatonPool: the device table of token automata that constrained rows step through in-jit.

Where it sits: the runner owns one pool; the engine's ``DeviceGrammars``
(jserve/structured/device_grammars.py) loads a request's automaton into it at ``add_request``
and walks its host mirror as tokens are read; the step programs read the device table
(``StepMasks.automata``, jserve/structured/automaton_step.py)::

    TokenAutomaton (local ids, jserve/structured/automaton.py)
      --acquire--> rows of the table, its states renumbered to those rows (global ids)
      --flush (before a step)--> table int16[A + 1, V] on the device, written in blocks of
                                 ``WRITE_ROWS`` rows by one small program
    step: row r in state q samples under ``table[q] >= 0`` and moves to ``table[q, token]``

Row A is the free row (all zeros: every token allowed), read by rows that have no automaton.
An automaton keeps its rows while requests use it and after (a later request with the same spec
finds it loaded); rows of unused automata are reclaimed, least recently used first, when a new
one does not fit. One that cannot fit even then is refused (``acquire`` -> None): its request
runs on the host path (llguidance).

Size: ``grammar_device_states`` rows (``device_states``); by default as many as
``AUTO_BYTES`` holds, at most ``AUTO_MAX_STATES`` (Qwen2.5's 151,936 tokens: 883 states, 256 MiB;
the bundled model's 8,192: 2,048, 32 MiB). A schema takes more states than its characters
suggest: byte-level tokens that end inside a multi-byte character each need a state of their
own (the structured-outputs benchmark's schema: 484 states, ~320 of them mid-character).
Speculative engines have none: a verify row's mask at each draft position would need the
automaton walked along the drafts (the host path does it).
Nor do jobs of several processes (each would load every automaton in step with process 0) or
disaggregated engines (jserve/disagg/builder.py: two runners, two tables).
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Executor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding

from jserve.compile_pool import compile_each
from jserve.config import EngineConfig
from jserve.structured.automaton import TokenAutomaton
from sharding import host_to_global

AUTO_BYTES = 256 << 20    # the default table's bytes (``device_states``)
AUTO_MAX_STATES = 2048    # the default table's most rows
MAX_STATES = 32767        # int16 state ids
WRITE_ROWS = 64           # rows per write (one compiled program)


def device_states(config: EngineConfig, processes: int = 1) -> int:
    """Rows of the automaton table: the ``grammar_device_states`` option, else as many as
    ``AUTO_BYTES`` holds (at most ``AUTO_MAX_STATES``); 0 with speculative decoding or several
    processes (every process would have to load each automaton in step with process 0)."""
    option, vocab = config.scheduler.grammar_device_states, config.model.vocab_size
    if config.speculative is not None or processes > 1:
        return 0
    if option is not None:
        return min(option, MAX_STATES)
    return min(AUTO_MAX_STATES, AUTO_BYTES // (2 * vocab))


def table_bytes(states: int, vocab_size: int) -> int:
    """Device bytes of a table of ``states`` rows (plus the free row), per device (replicated)."""
    return 0 if states == 0 else (states + 1) * vocab_size * 2


@dataclass
class _Loaded:
    rows: np.ndarray   # int[n]: the table rows of local states 0..n-1
    initial: int       # global id of the start state
    users: int = 0


def _write(table: jax.Array, rows: jax.Array, block: jax.Array) -> jax.Array:
    """Inside jit: table[rows[i]] := block[i] (rows -1: padding, dropped)."""
    return table.at[jnp.where(rows >= 0, rows, table.shape[0])].set(block, mode="drop")


class AutomatonPool:
    """The table's host mirror, its row allocation by spec, and the device copy it feeds."""

    def __init__(self, states: int, vocab_size: int, sharding: Sharding) -> None:
        if not 0 < states <= MAX_STATES:
            raise ValueError(f"grammar_device_states must be in [1, {MAX_STATES}], got {states}")
        self.states, self.vocab_size = states, vocab_size
        self.host = np.zeros((states + 1, vocab_size), np.int16)   # row ``states``: the free row
        self.done = np.zeros(states + 1, bool)   # complete states (only EOS allowed), by global id
        self._sharding = sharding
        self.device = jax.device_put(self.host, sharding)
        self._free = list(range(states - 1, -1, -1))
        self._loaded: OrderedDict[tuple, _Loaded] = OrderedDict()   # by spec key, LRU first
        self._pending: list[np.ndarray] = []   # rows written on the host, not yet on the device
        self._compiled = None

    def acquire(self, key: tuple, automaton: TokenAutomaton) -> int | None:
        """A user of ``key``'s automaton (loaded now if it is not) -> the global id of its start
        state; None when it does not fit beside the automata in use."""
        entry = self._loaded.get(key)
        if entry is None:
            entry = self._load(key, automaton)
            if entry is None:
                return None
        self._loaded.move_to_end(key)
        entry.users += 1
        return entry.initial

    def release(self, key: tuple) -> None:
        """One user of ``key``'s automaton is done (its rows stay loaded until reclaimed)."""
        entry = self._loaded.get(key)
        if entry is not None and entry.users > 0:
            entry.users -= 1

    def _load(self, key: tuple, automaton: TokenAutomaton) -> _Loaded | None:
        n = automaton.num_states
        if n > self.states:
            return None
        for old in [k for k, e in self._loaded.items() if e.users == 0]:
            if len(self._free) >= n:
                break
            self._free.extend(self._loaded.pop(old).rows.tolist())
        if len(self._free) < n:
            return None
        rows = np.array([self._free.pop() for _ in range(n)], np.int64)
        local = automaton.next
        self.host[rows] = np.where(local >= 0, rows[np.maximum(local, 0)], -1).astype(np.int16)
        self.done[rows] = automaton.done
        self._pending.append(rows)
        entry = self._loaded[key] = _Loaded(rows, int(rows[automaton.initial]))
        return entry

    def advance(self, states: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Host walk: global states int[n] after tokens int[n] -> int[n] (-1: not allowed)."""
        return self.host[states, tokens].astype(np.int64)

    def flush(self) -> None:
        """Write the rows loaded since the last flush to the device (before the step that reads
        them; the engine thread, as every dispatch)."""
        if not self._pending:
            return
        rows = np.concatenate(self._pending)
        self._pending = []
        for i in range(0, len(rows), WRITE_ROWS):
            part = rows[i:i + WRITE_ROWS]
            ids = np.full(WRITE_ROWS, -1, np.int32)
            ids[:len(part)] = part
            block = np.zeros((WRITE_ROWS, self.vocab_size), np.int16)
            block[:len(part)] = self.host[part]
            self.device = self._compiled(self.device, *self._args(ids, block))

    def _args(self, ids: np.ndarray, block: np.ndarray) -> tuple:
        if self._sharding.is_fully_addressable:
            return ids, block
        return host_to_global(ids, self._sharding), host_to_global(block, self._sharding)

    def compile(self, pool: Executor | None = None) -> None:
        """Compile the row writer (``pool``: on that executor) and run it once on padding."""
        write = jax.jit(_write, donate_argnums=(0,), out_shardings=self._sharding)
        spec = (jax.ShapeDtypeStruct((WRITE_ROWS,), jnp.int32, sharding=self._sharding),
                jax.ShapeDtypeStruct((WRITE_ROWS, self.vocab_size), jnp.int16, sharding=self._sharding))
        self._compiled = compile_each({0: write.lower(self.device, *spec)}, pool)[0]
        self.device = self._compiled(self.device, *self._args(
            np.full(WRITE_ROWS, -1, np.int32), np.zeros((WRITE_ROWS, self.vocab_size), np.int16)))
