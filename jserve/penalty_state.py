"""Penalty state: per-request token statistics on the device, kept up to date by the step.

Where it sits: the ``Runner`` owns one int32 array with a row per ``RequestRows`` slot. The
general step variant (``step_program.fused_step``) takes it donated, penalizes the logits of the rows
that use penalties from their slots' rows, and adds each such row's sampled token before it
returns the array, so the next step (dispatched before this one's tokens reach the host) sees
it. Nothing about penalties travels per step but the rows' slots and parameters::

    state int32[S, V]    state[s, t] = 2 * (times t was emitted for the request in slot s)
                                       + (1 if t is in its prompt)

    admission (ScheduledChunk.new, params use penalties)
        SlotInit: int32[2 + B] = [slot, num_prompt, prompt ids..., output ids..., -1 ...]
        -> row s := prompt bits + 2 * output counts       (own small executable per id bucket B)
    general step, rows r that sample with penalties (pen_slot[r] = slot, else -1)
        logits[r] <- penalize_counts(logits[r], seen = state[slot] != 0,
                                     out_counts = state[slot] >> 1)     (lax.cond: none -> skipped)
        state[slot, token[r]] += 2

One packed array instead of an ``out_counts`` int32 array plus a ``prompt_mask`` bool array:
one donated buffer and one gather per step, 4 bytes per (slot, token) instead of 5, and
"seen in the prompt or the output" (repetition penalty) is ``!= 0``. A slot's row means
something only while its request uses penalties: ``SlotInit`` rewrites the whole row when
such a request takes the slot, so a reused slot starts from its own prompt and outputs.

Prompt ids are sent once, at admission, because a prefix-cache hit never runs them through a
step; a request resuming after preemption (it takes a new slot) sends its outputs too.
"""

from __future__ import annotations

from concurrent.futures import Executor

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Sharding

from jserve.compile_pool import compile_each
from jserve.sampler import penalize_counts
from jserve.sampling_batch import SamplingBatch
from sharding import host_to_global

# Id-list buckets of SlotInit: powers of 4 from MIN_INIT_IDS, the last one max_model_len. A
# request sends its ids once; padding them up to 4x costs nothing next to a step, and the
# warm-up compiles few (tiny) programs: 1 for max_model_len <= 256, 3 for 4096, 5 for 32k.
MIN_INIT_IDS = 256
INIT_GROWTH = 4


def state_bytes(num_slots: int, vocab_size: int) -> int:
    """Device bytes of the state (per device: it is replicated)."""
    return num_slots * vocab_size * 4


def init_buckets(max_model_len: int) -> tuple[int, ...]:
    """The id-list lengths SlotInit compiles (every history is shorter than max_model_len)."""
    out, b = [], MIN_INIT_IDS
    while b < max_model_len:
        out.append(b)
        b *= INIT_GROWTH
    return (*out, max_model_len)


def penalized_logits(logits: jax.Array, state: jax.Array, pen_slot: jax.Array,
                     batch: SamplingBatch) -> jax.Array:
    """Inside jit. logits: f32[R, V]; state: int32[S, V]; pen_slot: int32[R] (-1: the row
    uses no penalties; its parameters in ``batch`` are neutral) -> penalized f32[R, V]."""
    rows = jnp.where((pen_slot >= 0)[:, None], state[jnp.maximum(pen_slot, 0)], 0)
    return penalize_counts(logits, rows != 0, (rows >> 1).astype(jnp.float32), batch)


def record_tokens(state: jax.Array, pen_slot: jax.Array, tokens: jax.Array) -> jax.Array:
    """Inside jit: count ``tokens[r]`` (int32[R]) once more in slot ``pen_slot[r]`` (rows with
    -1 are skipped). Slots are distinct (one row per request)."""
    slots = jnp.where(pen_slot >= 0, pen_slot, state.shape[0])  # out of range -> dropped
    return state.at[slots, tokens].add(2, mode="drop")


def _init_row(state: jax.Array, buf: jax.Array) -> jax.Array:
    """state int32[S, V] (donated), buf int32[2 + B] -> state with row buf[0] rewritten."""
    slot, num_prompt, ids = buf[0], buf[1], buf[2:]
    v = state.shape[1]
    cols = jnp.where(ids >= 0, ids, v)  # padding -> dropped
    is_prompt = jnp.arange(ids.shape[0]) < num_prompt
    row = jnp.zeros((v,), jnp.int32).at[jnp.where(is_prompt, cols, v)].set(1, mode="drop")
    row = row.at[jnp.where(is_prompt, v, cols)].add(2, mode="drop")
    return jax.lax.dynamic_update_slice(state, row[None], (slot, jnp.int32(0)))


class SlotInit:
    """Writes a slot's row from a request's prompt and output ids (compiled at warm-up, one
    executable per id bucket; called once per admission of a request that uses penalties)."""

    def __init__(self, num_slots: int, vocab_size: int, max_model_len: int,
                 sharding: Sharding) -> None:
        self.num_slots, self.vocab_size = num_slots, vocab_size
        self.buckets = init_buckets(max_model_len)
        self._sharding = sharding
        self._compiled: dict[int, jax.stages.Compiled] = {}

    def zeros(self) -> jax.Array:
        """A fresh state: int32[S, V] zeros."""
        return jax.device_put(np.zeros((self.num_slots, self.vocab_size), np.int32), self._sharding)

    def compile(self, state: jax.Array, pool: Executor | None = None) -> None:
        """One program per id bucket (compiled on ``pool`` when given: ``compile_each``)."""
        init = jax.jit(_init_row, donate_argnums=(0,), out_shardings=self._sharding)
        self._compiled.update(compile_each({b: init.lower(state, jax.ShapeDtypeStruct(
            (2 + b,), jnp.int32, sharding=self._sharding)) for b in self.buckets}, pool))

    def warm(self, state: jax.Array) -> jax.Array:
        """Run each bucket's program once (start-up); the state is all zeros again after."""
        for b in self.buckets:
            state = self(state, 0, [0] * b)
        return self(state, 0, [])

    def __call__(self, state: jax.Array, slot: int, prompt_ids: tuple[int, ...] | list[int],
                 output_ids: tuple[int, ...] | list[int] = ()) -> jax.Array:
        """-> state with row ``slot`` = prompt bits + 2 * output counts (``state`` is donated)."""
        n = len(prompt_ids) + len(output_ids)
        b = next((b for b in self.buckets if n <= b), None)
        if b is None:
            raise ValueError(f"{n} prompt + output ids exceed the largest penalty init bucket "
                             f"({self.buckets[-1]})")
        buf = np.full(2 + b, -1, np.int32)
        buf[0], buf[1] = slot, len(prompt_ids)
        buf[2:2 + len(prompt_ids)] = prompt_ids
        buf[2 + len(prompt_ids):2 + n] = output_ids
        return self._compiled[b](state, host_to_global(buf, self._sharding))
