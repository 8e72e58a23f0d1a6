"""The device slot table (page-table rows and sampling parameters per slot) mirrors the host.

After every step of random runs (prefix-cache hits, preemption, n > 1, mixed sampling), the
device table's row of every request the runner holds equals the host's ``RequestRows.table``
row; a step whose page-table diffs overflow the bucket's diff list writes the overflowing rows
whole through the ``SlotWriter`` (no truncation, no compile); a reused slot starts clean.
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import CompileCounter

from jserve.sampling_params import SamplingParams
from jserve.scheduler_output import NewRequestData, ScheduledChunk, SchedulerOutput
from jserve.slot_table import FSM


def _mirrored(runner, s):
    """The host row of slot ``s`` as the device should hold it: once written, the token
    automaton column is the device's (-1 on the host; no automaton in these tests: 0)."""
    row = runner.rows.table[s].copy()
    fsm = runner.config.pages_per_seq + FSM
    assert row[fsm] == -1, "the slot's row was never written"
    row[fsm] = 0
    return row


def _check_mirror(runner):
    dev = np.asarray(runner.slot_table)
    rows = runner.rows
    assert not dev[-1].any(), "the null row was written"
    for rid in list(rows._slot):
        s = rows.slot_of(rid)
        np.testing.assert_array_equal(dev[s], _mirrored(runner, s), err_msg=f"slot {s} ({rid})")


@pytest.mark.parametrize("overlap", [True, False])
def test_device_table_equals_host_after_random_runs(make_engine, overlap):
    engine = make_engine("llama", num_pages=20, async_scheduling=overlap)
    rng = np.random.default_rng(3)
    shared = rng.integers(5, 400, 40).tolist()
    params = [SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, min_p=0.05, seed=3, max_tokens=20),
              SamplingParams(temperature=1.0, top_k=7, max_tokens=12, logprobs=2),
              SamplingParams(temperature=0.6, repetition_penalty=1.2, max_tokens=15, n=2)]
    steps = 0
    with CompileCounter() as counter:
        for i in range(14):
            prompt = (shared[:int(rng.integers(10, 40))] if i % 2 else []) + \
                rng.integers(5, 400, int(rng.integers(1, 30))).tolist()
            engine.add_request(None, prompt, params[i % len(params)])
        while engine.has_unfinished_requests():
            engine.step()
            _check_mirror(engine.runner)
            steps += 1
    assert counter.count == 0
    st = engine.stats()
    assert steps > 20 and st.num_preemptions_total > 0
    assert st.kv_cache["prefix_cache_hits_device"] > 0


def _plan(chunks, dropped=()):
    return SchedulerOutput(chunks=list(chunks), dropped=list(dropped))


def _new(rid, page_ids, params=None, start=0):
    params = params or SamplingParams(temperature=0.0, max_tokens=4)
    return ScheduledChunk(req_id=rid, start=start, num_tokens=1, token_ids=(7,), page_ids=page_ids,
                          samples=True, new=NewRequestData(rid, params, seed=1))


def test_diff_overflow_writes_rows_whole(make_engine):
    engine = make_engine("llama")
    runner = engine.runner
    P = runner.config.pages_per_seq
    n = runner.config.scheduler.max_num_seqs
    runner.dispatch(_plan([_new(f"r{i}", (1 + i,)) for i in range(n)])).result()
    # every row rewrites its whole page row: n * P entries, more than the bucket's diff list
    chunks = [ScheduledChunk(req_id=f"r{i}", start=0, num_tokens=1, token_ids=(9,), page_start=0,
                             page_ids=tuple(10 + (i * P + j) % 60 for j in range(P)))
              for i in range(n)]
    layout = runner.layout(runner.bucket_for(n)[0])
    cap = layout.num_diffs
    assert n * P > cap
    with CompileCounter() as counter:
        rows_before = runner.rows.table.copy()
        lay, ibuf, _, slots, writes = runner.pack(_plan(chunks))
        runner.rows.table[:] = rows_before  # pack again inside dispatch, from the same state
        diff = ibuf[lay.ints["pt_diff"][0]:][:3 * cap].reshape(cap, 3)
        fit = cap // P
        assert (diff[:fit * P] >= 0).all() and (diff[fit * P:] == -1).all()
        assert list(writes) == list(slots[fit:])
        runner.dispatch(_plan(chunks)).result()
    assert counter.count == 0
    _check_mirror(runner)
    for c in chunks:
        np.testing.assert_array_equal(np.asarray(runner.slot_table)[runner.rows.slot_of(c.req_id), :P],
                                      c.page_ids)
    runner.dispatch(_plan([], dropped=[f"r{i}" for i in range(n)]))


def test_reused_slot_starts_clean(make_engine):
    engine = make_engine("llama")
    runner = engine.runner
    P = runner.config.pages_per_seq
    a = SamplingParams(temperature=0.7, top_k=5, top_p=0.8, seed=4, max_tokens=4, logprobs=2)
    runner.dispatch(_plan([_new("a", tuple(range(1, P + 1)), a)])).result()
    slot = runner.rows.slot_of("a")
    assert np.asarray(runner.slot_table)[slot, :P].all()
    runner.dispatch(_plan([_new("b", (5,))], dropped=["a"])).result()
    assert runner.rows.slot_of("b") == slot
    row = np.asarray(runner.slot_table)[slot]
    np.testing.assert_array_equal(row, _mirrored(runner, slot))
    assert row[0] == 5 and not row[1:P].any()
    assert row[P:P + 4].tolist() == [0, 0, 1, 0]  # top_k, seed (hi, lo), want_logprobs
    runner.dispatch(_plan([], dropped=["b"]))
