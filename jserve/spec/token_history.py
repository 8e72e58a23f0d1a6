"""N-gram drafts on the device: each slot's tokens, kept by the step, and prompt lookup over them.

Where it sits: with ``{"method": "ngram"}`` every step while speculation is on runs the
speculative executable (``verify_step.spec_step``), which records the tokens it computes and
emits into a per-slot token history and proposes each sampling row's next drafts from it, so
the next step, planned while this one is in flight, verifies them (chained rows,
``jserve/spec/chain.py``), as with a draft model. The host proposer (``ngram.NgramProposer``,
the same rule) serves rows planned after a read (nothing in flight: host-masked requests, the
synchronous loop)::

    hist int32[S + 1, L]   L = max_model_len; row S: the null row (rows without a slot)
        a request takes a slot, or speculation resumes after steps without it
        (ScheduledChunk.new.history / .history: prompt + outputs, all on the host)
            HistoryWriter: int32[3, B] = (slot, position, id) for every such id of the step
            -> hist[slot, position] := id     (one call per B <= L ids; a program per bucket)
        step: hist[slot of t, position of t] := token t   for every token t of the step
              hist[slot, p_r] := emitted token of row r     (p_r: its position)
              drafts[r] = lookup(hist[slot_r, :p_r + 1])   (rows that sample)

Lookup (``propose``; ``NgramProposer.propose`` on the host is the reference): for n from
``prompt_lookup_max`` down to ``prompt_lookup_min``, the most recent earlier occurrence of the
last n tokens; the tokens after it, at most K and only known ones. Missing drafts (no match, or
fewer than K known) are -1: the verify step does not count them (``verified_drafts``) and feeds
token 0 in their places, whose K/V lies past the accepted tokens and is written again later.
Positions past a sequence's length hold stale tokens (rejected drafts, an earlier request of
the slot): every read is bounded by the length.
"""

from __future__ import annotations

from concurrent.futures import Executor

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding

from jserve.compile_pool import compile_each
from jserve.penalty_state import init_buckets
from sharding import host_to_global


def record(hist: jax.Array, token_slot: jax.Array, positions: jax.Array, token_ids: jax.Array
           ) -> jax.Array:
    """Inside jit: hist[token_slot[t], positions[t]] := token_ids[t] (int32[T] each; slots out
    of range or negative are dropped)."""
    s = jnp.where(token_slot >= 0, token_slot, hist.shape[0])
    return hist.at[s, positions].set(token_ids, mode="drop")


def token_slots(row_slot: jax.Array, query_start_loc: jax.Array, num_tokens: int) -> jax.Array:
    """Inside jit: the slot of each of the step's ``num_tokens`` tokens (-1: padding) from the
    rows' slots int32[R] and query_start_loc int32[R + 1]."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    # (compare_all: no loop. The default scan method is a while loop, whose predicate XLA's GPU
    # runtime may read on the host, holding the launching thread until the device gets there.)
    row = jnp.searchsorted(query_start_loc[1:], t, side="right", method="compare_all")
    r = row_slot.shape[0]
    return jnp.where(row < r, row_slot[jnp.minimum(row, r - 1)], -1)


def propose(rows: jax.Array, lengths: jax.Array, k: int, min_n: int, max_n: int) -> jax.Array:
    """Inside jit: prompt-lookup drafts of each row (module docstring).

    rows: int32[R, L] token histories; lengths: int32[R] (tokens known, >= 1; 0: no row)
    -> int32[R, k] drafts, -1 past the ones found."""
    r, width = rows.shape
    x = jnp.arange(width, dtype=jnp.int32)[None, :]                 # candidate end of a match
    lengths = lengths[:, None]
    match = jnp.ones((r, width), bool)
    best_end = jnp.full((r,), -1, jnp.int32)
    best_n = jnp.zeros((r,), jnp.int32)
    for j in range(max_n):   # match[x]: tokens x - j .. x equal the sequence's last j + 1
        tail = jnp.take_along_axis(rows, jnp.clip(lengths - 1 - j, 0, width - 1), axis=1)
        shifted = jnp.pad(rows, ((0, 0), (j, 0)), constant_values=-1)[:, :width]
        match = match & (shifted == tail)
        n = j + 1
        if n < min_n:
            continue
        ok = match & (x >= n - 1) & (x <= lengths - 2) & (lengths - 1 >= n)
        end = jnp.max(jnp.where(ok, x, -1), axis=1)
        found = end >= 0
        best_end = jnp.where(found, end, best_end)   # a longer n found later wins
        best_n = jnp.where(found, n, best_n)
    start = best_end + 1                                              # [R]
    cols = start[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :]
    known = (best_n[:, None] > 0) & (cols < lengths)
    drafts = jnp.take_along_axis(rows, jnp.clip(cols, 0, width - 1), axis=1)
    return jnp.where(known, drafts, -1)


def step_drafts(hist: jax.Array, row_slot: jax.Array, samples: jax.Array, last_pos: jax.Array,
                last_tok: jax.Array, k: int, min_n: int, max_n: int) -> tuple[jax.Array, jax.Array]:
    """Inside jit, after verification: record each sampling row's emitted token at its
    position, then propose its next drafts -> (hist, drafts int32[R, k], -1 where none).
    row_slot, samples, last_pos (the emitted token's position), last_tok: int32[R]."""
    on = (samples > 0) & (row_slot >= 0)
    slot = jnp.where(on, row_slot, -1)
    hist = record(hist, slot, last_pos, last_tok)
    rows = hist[jnp.where(on, row_slot, hist.shape[0] - 1)]
    drafts = propose(rows, jnp.where(on, last_pos + 1, 0), k, min_n, max_n)
    return hist, jnp.where(on[:, None], drafts, -1)


def _write(hist: jax.Array, buf: jax.Array) -> jax.Array:
    """hist int32[S + 1, L] (donated), buf int32[3, B] = (slot, position, token) per id, slot
    -1 padding -> hist with those ids written."""
    return record(hist, buf[0], buf[1], buf[2])


class HistoryWriter:
    """Writes the histories of the slots requests take (prompt + outputs, from the host): a
    step's rows packed into as few calls as fit the largest bucket (one full history; nearly
    always one call), compiled at warm-up per id bucket (``penalty_state.init_buckets``)."""

    def __init__(self, num_slots: int, max_model_len: int, sharding: Sharding) -> None:
        self.num_slots, self.max_model_len = num_slots, max_model_len
        self.buckets = init_buckets(max_model_len)
        self._sharding = sharding
        self._compiled: dict[int, jax.stages.Compiled] = {}

    def zeros(self) -> jax.Array:
        """A fresh history: int32[S + 1, L] zeros."""
        return jax.device_put(np.zeros((self.num_slots + 1, self.max_model_len), np.int32),
                              self._sharding)

    def compile(self, hist: jax.Array, pool: Executor | None = None) -> None:
        """One program per token-count bucket (compiled on ``pool`` when given)."""
        write = jax.jit(_write, donate_argnums=(0,), out_shardings=self._sharding)
        self._compiled.update(compile_each({b: write.lower(hist, jax.ShapeDtypeStruct(
            (3, b), jnp.int32, sharding=self._sharding)) for b in self.buckets}, pool))

    def __call__(self, hist: jax.Array, rows: list[tuple[int, tuple[int, ...] | list[int]]]
                 ) -> jax.Array:
        """-> hist with each (slot, ids) row's first len(ids) tokens written (``hist`` is
        donated); a slot appears at most once, each row holds at most max_model_len ids."""
        top = self.buckets[-1]
        batch: list[tuple[int, tuple[int, ...] | list[int]]] = []
        n = 0
        for slot, ids in rows:
            if len(ids) > top:
                raise ValueError(f"{len(ids)} history ids exceed max_model_len ({top})")
            if n + len(ids) > top:
                hist, batch, n = self._write(hist, batch, n), [], 0
            batch.append((slot, ids))
            n += len(ids)
        return self._write(hist, batch, n) if batch else hist

    def _write(self, hist: jax.Array, rows: list[tuple[int, tuple[int, ...] | list[int]]],
               n: int) -> jax.Array:
        b = next(b for b in self.buckets if n <= b)
        buf = np.full((3, b), -1, np.int32)
        at = 0
        for slot, ids in rows:
            k = len(ids)
            buf[0, at:at + k] = slot
            buf[1, at:at + k] = np.arange(k, dtype=np.int32)
            buf[2, at:at + k] = ids
            at += k
        return self._compiled[b](hist, host_to_global(buf, self._sharding))
