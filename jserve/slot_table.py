"""Slot table: every slot's page-table row and sampling parameters, on the device.

Where it sits: the ``Runner`` owns one int32 array with a row per ``RequestRows`` slot plus a
null row, laid out exactly like the host mirror ``RequestRows.table``. Every step variant takes
it donated, applies the step's page-table diff, gathers its rows' page tables and sampling
fields by slot and returns it; the host sends per step only the rows' slots and the diff::

    table int32[S + 1, W]   W = P + NUM_FIELDS       row S: the null row (all 0, never written)
        [0, P)      page table (page 0: the null page)
        P + TOP_K   top_k          P + SEED  seed (2 x uint32 bits)     P + WANT_LP  0/1
        P + TEMP / TOP_P / MIN_P   float32 bits
        P + FSM     the row's token-automaton state + 1 (0: none; the step advances it,
                    jserve/structured/automaton_step.py)

    a request takes a slot (ScheduledChunk.new: admission, resumption, prefix-cache hit), or
    a row's page diff does not fit the step's diff list
        SlotWriter: int32[k, 1 + W] = [slot, row...] x k, slot -1 padding
        -> table[slot] := row                   (own small executable per row bucket k)
    step (ibuf: row_slot int32[R], samples int32[R], pt_diff int32[D, 3])
        table[slot, index] := page   for (slot, index, page) in pt_diff   (-1 rows dropped)
        page_table[r] = table[row_slot[r], :P]   (row_slot -1: the null row)
        temperature[r], ... = table[row_slot[r], P + ...]  where samples[r], else neutral

The diff list has ``D = ceil(T / page_size) + 2R`` entries per bucket (a chunk's appends and
copy-on-write pages within its write range fit); a row whose entries would overflow it is
written whole by the ``SlotWriter`` before the step instead (never truncated, never compiled).
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import Executor

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding

from jserve.compile_pool import compile_each
from sharding import host_to_global

# Columns after the P page-table columns.
TOP_K, SEED, WANT_LP, TEMP, TOP_P, MIN_P, FSM = 0, 1, 3, 4, 5, 6, 7
NUM_FIELDS = 8
# Row-count buckets of SlotWriter: 1, 4, 16, ... up to the slot count.
WRITE_GROWTH = 4


def diff_capacity(num_tokens: int, num_rows: int, page_size: int) -> int:
    """Page-table entries a step of this bucket carries: appends and copy-on-write pages."""
    return math.ceil(num_tokens / page_size) + 2 * num_rows


def write_buckets(num_slots: int) -> tuple[int, ...]:
    out, b = [], 1
    while b < num_slots:
        out.append(b)
        b *= WRITE_GROWTH
    return (*out, num_slots)


def apply_diffs(table: jax.Array, diffs: jax.Array) -> jax.Array:
    """Inside jit. table int32[S + 1, W]; diffs int32[D, 3] (slot, index, page); slot -1:
    padding (sent out of range, dropped)."""
    slot = jnp.where(diffs[:, 0] >= 0, diffs[:, 0], table.shape[0])
    return table.at[slot, diffs[:, 1]].set(diffs[:, 2], mode="drop")


def gather_rows(table: jax.Array, row_slot: jax.Array, samples: jax.Array, pages_per_seq: int
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Inside jit -> (page_table int32[R, P], sampling fields per row: neutral where the row
    does not sample)."""
    rows = table[jnp.where(row_slot >= 0, row_slot, table.shape[0] - 1)]
    p, on = pages_per_seq, samples > 0

    def f32(col: int, neutral: float) -> jax.Array:
        return jnp.where(on, jax.lax.bitcast_convert_type(rows[:, p + col], jnp.float32), neutral)

    fields = {
        "top_k": jnp.where(on, rows[:, p + TOP_K], 0),
        "seed": jnp.where(on[:, None], rows[:, p + SEED:p + SEED + 2], 0),
        "want_logprobs": jnp.where(on, rows[:, p + WANT_LP], 0),
        "temperature": f32(TEMP, 0.0), "top_p": f32(TOP_P, 1.0), "min_p": f32(MIN_P, 0.0),
    }
    return rows[:, :p], fields


def fill_page_diffs(chunks: list, slots: np.ndarray, diff: np.ndarray) -> np.ndarray:
    """Host side of a step (``Runner.pack``): fill the step's page-table diff list (int32[D, 3],
    padding -1) with the changed entries of rows that already hold their slot -> slots to write
    whole instead: rows taking their slot, and rows whose entries no longer fit the list."""
    writes, k, cap = [], 0, diff.shape[0]
    for c, s in zip(chunks, slots, strict=True):
        if c.new is not None:
            writes.append(s)
        elif c.page_ids:
            m = len(c.page_ids)
            if k + m > cap:
                writes.append(s)
                continue
            diff[k:k + m, 0] = s
            diff[k:k + m, 1] = np.arange(c.page_start, c.page_start + m)
            diff[k:k + m, 2] = c.page_ids
            k += m
    return np.asarray(writes, np.int64)


def _write_rows(table: jax.Array, buf: jax.Array, keep: int | None = None) -> jax.Array:
    """Inside jit: table[buf[i, 0]] := buf[i, 1:] (slot -1: padding, dropped); column ``keep``
    keeps the table's value where the row's is negative."""
    slot = jnp.where(buf[:, 0] >= 0, buf[:, 0], table.shape[0])
    rows = buf[:, 1:]
    if keep is not None:
        now = table[jnp.minimum(slot, table.shape[0] - 1), keep]
        rows = rows.at[:, keep].set(jnp.where(rows[:, keep] < 0, now, rows[:, keep]))
    return table.at[slot].set(rows, mode="drop")


class SlotWriter:
    """Writes whole slot rows (compiled at warm-up, one executable per row bucket; called once
    per step that admits requests or overflows its diff list). ``keep``: a column written only
    where the row's value is >= 0 (the slot table's ``FSM``: the step advances it on the device,
    and a row written again for its pages must not reset it)."""

    def __init__(self, num_slots: int, width: int, sharding: Sharding, keep: int | None = None) -> None:
        self.num_slots, self.width, self._keep = num_slots, width, keep
        self.buckets = write_buckets(num_slots)
        self._sharding = sharding
        self._compiled: dict[int, jax.stages.Compiled] = {}

    def zeros(self) -> jax.Array:
        """A fresh table: int32[S + 1, W] zeros (the last row is the null row)."""
        return jax.device_put(np.zeros((self.num_slots + 1, self.width), np.int32), self._sharding)

    def compile(self, table: jax.Array, pool: Executor | None = None) -> None:
        """One program per row bucket (compiled on ``pool`` when given: ``compile_each``)."""
        write = jax.jit(functools.partial(_write_rows, keep=self._keep), donate_argnums=(0,),
                        out_shardings=self._sharding)
        self._compiled.update(compile_each({b: write.lower(table, jax.ShapeDtypeStruct(
            (b, 1 + self.width), jnp.int32, sharding=self._sharding)) for b in self.buckets}, pool))

    def warm(self, table: jax.Array) -> jax.Array:
        """Run each bucket's program once (start-up) on padding rows only: writes nothing."""
        for b in self.buckets:
            table = self(table, np.full(b, -1), np.zeros((b, self.width), np.int32))
        return table

    def __call__(self, table: jax.Array, slots: np.ndarray, rows: np.ndarray) -> jax.Array:
        """-> table with ``table[slots[i]] = rows[i]`` (int32[k, W]; ``table`` is donated)."""
        k = len(slots)
        b = next(b for b in self.buckets if k <= b)
        buf = np.full((b, 1 + self.width), -1, np.int32)
        buf[:k, 0] = slots
        buf[:k, 1:] = rows
        # One process: the executable takes the host buffer as it is (its own transfer costs the
        # host less than a device_put first, as the step's input: RESULTS_v2_sessions_5-8.md, session 6).
        arg = buf if self._sharding.is_fully_addressable else host_to_global(buf, self._sharding)
        return self._compiled[b](table, arg)
