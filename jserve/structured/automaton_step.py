"""The token automata inside the step: a row's mask and its state advance as two gathers.

Where it sits: in the sampler half of the step programs (``step_program._sample_part``), after
penalties and the logit state's masks; the state lives in the slot table's ``FSM`` column
(jserve/slot_table.py: global state + 1, 0: no automaton), written with the slot's row when a
request takes a slot and advanced here by every step that samples the row, so a constrained
row runs in the overlapped loop like a free one (no host work per token, no second launch)::

    q[r]      = table[row_slot[r], P + FSM] - 1      (-1: no automaton, or the row samples not)
    allowed   = automata[q[r]] >= 0                  (q = -1 reads the free row A: all allowed)
    token     = sample(logits masked by allowed)
    table[row_slot[r], P + FSM] := automata[q[r], token] + 1

A sampled token the automaton refuses (only when every allowed token was masked by something
else, e.g. ``min_tokens`` banning the EOS of a complete state) leaves the row with no automaton;
the host's walk of the same table (``DeviceGrammars.advance``) finds it and ends the request.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jserve.slot_table import FSM

_NEG_INF = float("-inf")


class StepMasks(NamedTuple):
    """The masking state a non-greedy step program reads (a pytree argument)."""

    logit: jax.Array                # the logit state int32[S + 1, W + 2B] (structured/logit_state.py)
    automata: jax.Array | None      # the automaton table int16[A + 1, V] (None: no device automata)


def row_states(table: jax.Array, row_slot: jax.Array, samples: jax.Array, pages_per_seq: int
               ) -> jax.Array:
    """Inside jit: each row's automaton state int32[R] (-1: none, or the row does not sample)."""
    col = table[jnp.where(row_slot >= 0, row_slot, table.shape[0] - 1), pages_per_seq + FSM]
    return jnp.where((samples > 0) & (row_slot >= 0), col - 1, -1)


def apply_automata(logits: jax.Array, masked: jax.Array, automata: jax.Array, states: jax.Array
                   ) -> jax.Array:
    """Inside jit: ``masked`` f32[R, V] (penalties, biases and static masks applied) with each
    row's automaton mask ANDed in; a row whose AND is empty takes the automaton's mask over the
    raw ``logits`` f32[R, V] instead (the grammar wins, as with host masks)."""
    free = automata.shape[0] - 1
    allowed = automata[jnp.where(states >= 0, states, free)] >= 0
    out = jnp.where(allowed, masked, _NEG_INF)
    empty = (states >= 0) & ~jnp.any(out > _NEG_INF, axis=1)
    return jnp.where(empty[:, None], jnp.where(allowed, logits, _NEG_INF), out)


def advance_states(table: jax.Array, automata: jax.Array, row_slot: jax.Array, states: jax.Array,
                   tokens: jax.Array, pages_per_seq: int) -> jax.Array:
    """Inside jit: the slot table with each automaton row's state moved by its sampled token
    (tokens int32[R]); rows without one are left alone."""
    free = automata.shape[0] - 1
    nxt = automata[jnp.where(states >= 0, states, free), tokens].astype(jnp.int32)
    slot = jnp.where(states >= 0, row_slot, table.shape[0])
    return table.at[slot, pages_per_seq + FSM].set(nxt + 1, mode="drop")
