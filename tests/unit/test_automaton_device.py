"""The token automata's device side without an engine: the pool's rows and writes, the in-step
mask and advance (jserve/structured/automaton_step.py), and the slot writer's kept column."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from jserve.slot_table import FSM, NUM_FIELDS, SlotWriter
from jserve.structured.automaton import TokenAutomaton
from jserve.structured.automaton_pool import WRITE_ROWS, AutomatonPool
from jserve.structured.automaton_step import advance_states, apply_automata, row_states

V = 6
SHARD = SingleDeviceSharding(jax.devices()[0])


def _chain(n: int, token: int = 2) -> TokenAutomaton:
    """n states: state i -> i + 1 on ``token``; the last is final (EOS 0 loops) and complete."""
    nxt = np.full((n, V), -1, np.int16)
    for i in range(n - 1):
        nxt[i, token] = i + 1
    nxt[n - 1, 0] = n - 1
    done = np.zeros(n, bool)
    done[n - 1] = True
    return TokenAutomaton(next=nxt, initial=0, done=done)


def _pool(states: int) -> AutomatonPool:
    pool = AutomatonPool(states, V, SHARD)
    pool.compile()
    return pool


def test_pool_loads_renumbers_and_writes_the_device_rows():
    pool = _pool(8)
    a = pool.acquire(("regex", "a", False), _chain(3))
    b = pool.acquire(("regex", "b", False), _chain(2, token=4))
    assert a != b and pool.acquire(("regex", "a", False), _chain(3)) == a   # loaded once
    s1 = pool.advance(np.array([a]), np.array([2]))[0]
    s2 = pool.advance(np.array([s1]), np.array([2]))[0]
    assert pool.done[s2] and not pool.done[s1]
    assert pool.advance(np.array([a, b, s2]), np.array([4, 2, 0])).tolist() == [-1, -1, s2]
    pool.flush()
    assert np.array_equal(np.asarray(pool.device), pool.host)
    assert not pool.host[pool.states].any()   # the free row allows everything


def test_pool_reclaims_unused_automata_least_recent_first_and_refuses_when_full():
    pool = _pool(5)
    k1, k2, k3 = (("choice", str(i), False) for i in range(3))
    pool.acquire(k1, _chain(2))
    pool.acquire(k2, _chain(2))
    assert pool.acquire(k3, _chain(2)) is None       # 1 row free, both in use
    pool.release(k1)
    s3 = pool.acquire(k3, _chain(2))                 # k1's rows reclaimed
    assert s3 is not None and k1 not in pool._loaded
    assert pool.acquire(("x", "big", False), _chain(6)) is None   # larger than the table
    rows = {int(r) for e in pool._loaded.values() for r in e.rows}
    assert len(rows) == 4 and rows.isdisjoint(pool._free)


def test_flush_writes_more_rows_than_one_block():
    pool = _pool(WRITE_ROWS + 9)
    pool.acquire(("regex", "long", False), _chain(WRITE_ROWS + 5))
    pool.flush()
    assert np.array_equal(np.asarray(pool.device), pool.host)


def test_in_step_mask_and_advance():
    """Row 0 in state 0 of a chain, row 1 free, row 2 does not sample; row 3's static mask
    leaves nothing the automaton allows: the automaton's mask over the raw logits wins."""
    pool = _pool(4)
    start = pool.acquire(("regex", "c", False), _chain(3))
    pool.flush()
    p = 2   # pages per sequence
    table = np.zeros((5, p + NUM_FIELDS), np.int32)
    table[[0, 2, 3], p + FSM] = start + 1
    row_slot = jnp.array([0, 1, 2, 3])
    samples = jnp.array([1, 1, 0, 1])
    states = row_states(jnp.asarray(table), row_slot, samples, p)
    assert states.tolist() == [start, -1, -1, start]
    logits = jnp.arange(4 * V, dtype=jnp.float32).reshape(4, V)
    masked = logits.at[3, 2].set(-jnp.inf)          # a static mask that bans the chain's token
    out = np.asarray(apply_automata(logits, masked, pool.device, states))
    allowed = np.isfinite(out)
    assert allowed[0].tolist() == [False, False, True, False, False, False]
    assert allowed[1].all() and allowed[2].all()
    assert allowed[3].tolist() == allowed[0].tolist() and out[3, 2] == logits[3, 2]
    tokens = jnp.array([2, 5, 2, 4])                # row 3 samples a refused token
    new = np.asarray(advance_states(jnp.asarray(table), pool.device, row_slot, states, tokens, p))
    nxt = pool.advance(np.array([start]), np.array([2]))[0]
    assert new[0, p + FSM] == nxt + 1               # advanced
    assert new[2, p + FSM] == start + 1             # not sampled: kept
    assert new[3, p + FSM] == 0                     # refused: no automaton from here
    assert new[1, p + FSM] == 0 and np.array_equal(new[:, :p + FSM], table[:, :p + FSM])


def test_slot_writer_keeps_the_device_column_where_the_row_says_so():
    writer = SlotWriter(3, 4, SHARD, keep=3)
    table = writer.zeros()
    writer.compile(table)
    table = writer(table, np.array([0, 1]), np.array([[1, 2, 3, 7], [4, 5, 6, 8]], np.int32))
    table = table.at[0, 3].set(42)                  # the step advanced slot 0's column
    table = writer(table, np.array([0, 1]), np.array([[9, 9, 9, -1], [5, 5, 5, 0]], np.int32))
    assert np.asarray(table)[:2].tolist() == [[9, 9, 9, 42], [5, 5, 5, 0]]
