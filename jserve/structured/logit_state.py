"""Per-slot token masks and logit biases on the device, applied inside the step jit.

Where it sits: the runner holds one ``LogitState``. A slot's row is the packed bitmask of the
tokens its request may sample (1 bit per token) followed by a sparse logit bias::

    state int32[S + 1, W + 2B]    W = ceil(V / 32) mask words, B = MAX_LOGIT_BIAS
      [:W]       allowed-token bits (bit t % 32 of word t // 32)    all ones: no mask
      [W:W+B]    bias token ids (-1: unused)
      [W+B:]     bias values (float32 bits)

Static constraints (``allowed_token_ids``, ``logit_bias``) are written once, when a request
takes its slot. Dynamic ones (a grammar, multi-token ``bad_words``) arrive per step from the
host as ``SchedulerOutput.token_masks`` (the engine's ``ConstraintTracker``) and are ANDed with
the static bits; only the rows that change are written (``SlotWriter``, a small program per
row bucket), so the step buffer carries one int per row: ``mask_slot[r]`` (-1: free row).

Speculative decoding (``positions`` = K + 1): a verify row samples at 1 + k positions and a
grammar's mask differs at each (the matcher advanced along the drafts), so the state has a row
per (slot, position): slot s at position j is row ``s + j * S`` (position 0 is row s, as
without speculation). ``rows_for`` writes them and the step buffer's ``mask_step[r]`` (S, or
0: position 0's row at every position, a static constraint) gives the stride.
The step reads the rows it needs (``apply_logit_state``) only when some row is masked
(``lax.cond``), so free batches pay nothing.
"""

from __future__ import annotations

from concurrent.futures import Executor

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding

from jserve.sampling_params import MAX_LOGIT_BIAS, SamplingParams
from jserve.slot_table import SlotWriter

_NEG_INF = float("-inf")


def mask_words(vocab_size: int) -> int:
    """W: int32 words of one packed token mask."""
    return -(-vocab_size // 32)


def pack_token_ids(ids: np.ndarray | list[int], vocab_size: int) -> np.ndarray:
    """Bitmask int32[W] with the bits of ``ids`` set (host)."""
    bits = np.zeros(mask_words(vocab_size) * 32, bool)
    bits[np.asarray(ids, np.int64)] = True
    return np.packbits(bits.reshape(-1, 8), axis=1, bitorder="little").reshape(-1).view(np.int32)


def logit_state_bytes(num_slots: int, vocab_size: int) -> int:
    """Device bytes of the state's first position (per device: replicated): int32[S + 1, W + 2B]
    (speculative decoding's extra positions: ``spec.config.spec_state_bytes``)."""
    return (num_slots + 1) * (mask_words(vocab_size) + 2 * MAX_LOGIT_BIAS) * 4


def unpack_mask(words: jax.Array, vocab_size: int) -> jax.Array:
    """Inside jit: int32[R, W] -> bool[R, V] (bit t % 32 of word t // 32)."""
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(words.shape[0], -1)[:, :vocab_size] > 0


def apply_logit_state(logits: jax.Array, state: jax.Array, mask_slot: jax.Array,
                      host: jax.Array | None = None) -> jax.Array:
    """Inside jit: biases then the allowed-token mask of each masked row. logits f32[R, V];
    state int32[S + 1, W + 2B]; mask_slot int32[R] (-1: no static mask or bias); host
    int32[R, W] | None: each row's host mask (all ones: none; the split step's sampler),
    ANDed with the row's static bits (an empty AND: the host mask wins, as ``masked_rows``)
    -> f32[R, V]."""
    r, v = logits.shape
    w = mask_words(v)
    b = (state.shape[1] - w) // 2
    on = mask_slot >= 0
    rows = state[jnp.where(on, mask_slot, state.shape[0] - 1)]
    ids = jnp.where(on[:, None] & (rows[:, w:w + b] >= 0), rows[:, w:w + b], v)
    vals = jax.lax.bitcast_convert_type(rows[:, w + b:], jnp.float32)
    ridx = jnp.broadcast_to(jnp.arange(r)[:, None], ids.shape)
    logits = logits.at[ridx, ids].add(vals, mode="drop")
    words = jnp.where(on[:, None], rows[:, :w], -1)
    if host is not None:
        both = words & host
        words = jnp.where(jnp.any(both != 0, axis=1, keepdims=True), both, host)
    return jnp.where(unpack_mask(words, v), logits, _NEG_INF)


def masked_logits(logits: jax.Array, state: jax.Array, mask_slot: jax.Array) -> jax.Array:
    """Inside jit: ``apply_logit_state`` only when some row is masked (a run-time branch)."""
    return jax.lax.cond(jnp.any(mask_slot >= 0),
                        lambda: apply_logit_state(logits, state, mask_slot), lambda: logits)


def has_static(p: SamplingParams) -> bool:
    return bool(p.allowed_token_ids) or bool(p.logit_bias)


class LogitState:
    """Host mirror of the static part of each slot's row, and the device state it feeds."""

    def __init__(self, num_slots: int, vocab_size: int, sharding: Sharding,
                 positions: int = 1) -> None:
        """``positions``: mask rows per slot (K + 1 with speculative decoding, else 1)."""
        self.num_slots = num_slots
        self.vocab_size = vocab_size
        self.words = mask_words(vocab_size)
        self.width = self.words + 2 * MAX_LOGIT_BIAS
        self.static = np.zeros((num_slots, self.width), np.int32)
        self.active = np.zeros(num_slots, bool)  # slot has a static constraint
        self._writer = SlotWriter(num_slots * positions, self.width, sharding)
        self.device = self._writer.zeros()
        self.buckets = self._writer.buckets
        self._free_tail = self.static_row(_FREE)[self.words:]   # a row's bias part, no bias
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []   # (slots int[n], rows int32[n, width])

    def static_row(self, p: SamplingParams) -> np.ndarray:
        row = np.zeros(self.width, np.int32)
        w, b = self.words, MAX_LOGIT_BIAS
        if p.allowed_token_ids:
            row[:w] = pack_token_ids(list(p.allowed_token_ids), self.vocab_size)
        else:
            row[:w] = -1
        row[w:w + b] = -1
        if p.logit_bias:
            ids = np.fromiter((t for t, _ in p.logit_bias), np.int32)
            vals = np.fromiter((x for _, x in p.logit_bias), np.float32)
            row[w:w + len(ids)] = ids
            row[w + b:w + b + len(vals)] = vals.view(np.int32)
        return row

    def on_new(self, slot: int, p: SamplingParams) -> None:
        """A request takes ``slot``: keep (and send) its static row, if it has one."""
        self.active[slot] = has_static(p)
        if self.active[slot]:
            self.static[slot] = self.static_row(p)
            self._pending.append((np.array([slot]), self.static[slot][None].copy()))

    def row_for(self, slot: int, dynamic: np.ndarray | None) -> int:
        """The ``mask_slot`` value of a sampling row in ``slot`` (-1: free); a dynamic mask
        int32[W] is ANDed with the static bits and queued for writing."""
        if dynamic is None:
            return slot if self.active[slot] else -1
        self.masked_rows(np.array([slot]), dynamic[None])
        return slot

    def masked_rows(self, slots: np.ndarray, dynamic: np.ndarray) -> np.ndarray:
        """Dynamic masks int32[n, W] of n sampling rows in ``slots`` int[n], each ANDed with its
        slot's static bits and queued for writing (one block: the per-row work of a 64-row
        grammar batch cost the H200's host ~1 ms per step, RESULTS_v2_sessions_9-12.md, session 10) -> their
        ``mask_slot`` values (the slots)."""
        n = len(slots)
        rows = np.empty((n, self.width), np.int32)
        rows[:, :self.words] = dynamic
        rows[:, self.words:] = self._free_tail
        act = self.active[slots]
        if act.any():
            static = self.static[slots[act]]
            bits = static[:, :self.words] & dynamic[act]
            empty = ~bits.any(axis=1)   # an empty AND: the grammar wins
            bits[empty] = dynamic[act][empty]
            static[:, :self.words] = bits
            rows[act] = static
        self._pending.append((np.asarray(slots), rows))
        return np.asarray(slots, np.int32)

    def rows_for(self, slot: int, dynamic: list[np.ndarray]) -> tuple[int, int]:
        """A verify row's masks: ``dynamic[j]`` (int32[W]) is position j's host mask (the
        grammar advanced along the first j drafts), each ANDed with the static bits and queued
        for row ``slot + j * S`` -> (mask_slot, mask_step) of the row."""
        if len(dynamic) == 1:
            return self.row_for(slot, dynamic[0]), 0
        for j, mask in enumerate(dynamic):
            self.row_for(slot, mask)
            self._pending[-1] = (np.array([slot + j * self.num_slots]), self._pending[-1][1])
        return slot, self.num_slots

    def flush(self) -> None:
        """Write the queued rows to the device (before the step that reads them)."""
        if not self._pending:
            return
        if len(self._pending) == 1:
            (slots, rows), = self._pending
            slots = slots.astype(np.int64)
        else:
            slots = np.concatenate([sl for sl, _ in self._pending]).astype(np.int64)
            rows = np.concatenate([r for _, r in self._pending])
        self._pending = []
        # a slot written twice (static, then dynamic in the same step): the last write wins
        _, last = np.unique(slots[::-1], return_index=True)
        keep = np.sort(len(slots) - 1 - last)
        for i in range(0, len(keep), self.buckets[-1]):
            part = keep[i:i + self.buckets[-1]]
            self.device = self._writer(self.device, slots[part], rows[part])

    def compile(self, pool: Executor | None = None) -> None:
        """Compile the row writer (one program per row bucket, on ``pool`` when given) and run
        each once."""
        self._writer.compile(self.device, pool)
        for b in self.buckets:
            self.device = self._writer(self.device, np.full(b, -1), np.zeros((b, self.width), np.int32))


_FREE = SamplingParams()
