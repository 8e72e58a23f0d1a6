"""The device penalty state (jserve.penalty_state) against the pure reference (CPU, no model).

A slot's row written by ``SlotInit`` and updated by ``record_tokens`` penalizes logits exactly as
``sampler.apply_penalties`` does over the whole history; a slot a new request takes starts
from that request's own prompt and outputs only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jserve.penalty_state import SlotInit, init_buckets, penalized_logits, record_tokens
from jserve.sampler import apply_penalties
from jserve.sampling_batch import SamplingRow, pack_sampling
from jserve.sampling_params import SamplingParams

S, V, R, MAX_LEN = 6, 96, 8, 300


def _slot_init() -> SlotInit:
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    return SlotInit(S, V, MAX_LEN, NamedSharding(mesh, PartitionSpec()))


def _expected_row(prompt, output) -> np.ndarray:
    row = np.zeros(V, np.int32)
    row[list(prompt)] = 1
    np.add.at(row, np.asarray(output, int), 2)
    return row


def test_init_buckets():
    assert init_buckets(128) == (128,)
    assert init_buckets(256) == (256,)
    assert init_buckets(4096) == (256, 1024, 4096)
    assert init_buckets(5000) == (256, 1024, 4096, 5000)


def test_state_penalizes_like_the_history_reference_and_counts_sampled_tokens():
    rng = np.random.default_rng(0)
    init = _slot_init()
    state = init.zeros()
    init.compile(state)
    # rows r -> slots; row 2 samples without penalties, rows >= 5 are padding
    slots = [3, 0, -1, 5, 1]
    histories = {}
    for s in (3, 0, 5, 1):
        n = int(rng.integers(1, 280)) if s == 5 else int(rng.integers(1, 30))  # 2 init buckets
        prompt = rng.integers(0, V, n).tolist()
        output = rng.integers(0, V, int(rng.integers(0, 20))).tolist()
        histories[s] = (prompt, output)
        state = init(state, s, prompt, output)
    for s, (prompt, output) in histories.items():
        np.testing.assert_array_equal(np.asarray(state[s]), _expected_row(prompt, output))
    params = [SamplingParams(repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.6),
              SamplingParams(repetition_penalty=0.8),
              SamplingParams(temperature=0.0),
              SamplingParams(presence_penalty=-1.0, frequency_penalty=2.0),
              SamplingParams(repetition_penalty=1.1, frequency_penalty=0.1)]
    pen_slot = np.full(R, -1, np.int32)
    pen_slot[:5] = slots
    for _ in range(3):  # penalize, sample (a made-up token), count it; the next step sees it
        logits = (rng.normal(size=(R, V)) * 3).astype(np.float32)
        rows = [SamplingRow(p, 0, 0, *histories[s]) if s >= 0 else SamplingRow(p, 0, 0)
                for p, s in zip(params, slots, strict=True)]
        batch, _ = pack_sampling(rows, R, V)
        want = np.asarray(apply_penalties(jnp.asarray(logits), batch))
        got = np.asarray(jax.jit(penalized_logits)(logits, state, pen_slot, batch))
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got[2], logits[2])   # no penalties: untouched
        tokens = rng.integers(0, V, R).astype(np.int32)
        state = jax.jit(record_tokens)(state, pen_slot, tokens)
        for r, s in enumerate(slots):
            if s >= 0:
                histories[s][1].append(int(tokens[r]))
    for s, (prompt, output) in histories.items():
        np.testing.assert_array_equal(np.asarray(state[s]), _expected_row(prompt, output))
    for s in (2, 4):  # slots no row used are untouched
        assert not np.asarray(state[s]).any()


def test_a_reused_slot_starts_from_the_new_request_only():
    init = _slot_init()
    state = init.zeros()
    init.compile(state)
    state = init(state, 2, [1, 2, 3] * 20, [4, 4, 5] * 30)
    state = init(state, 3, [7], [8])
    state = init(state, 2, [9, 9], [10])           # another request takes slot 2
    np.testing.assert_array_equal(np.asarray(state[2]), _expected_row([9, 9], [10]))
    np.testing.assert_array_equal(np.asarray(state[3]), _expected_row([7], [8]))
    state = init(state, 2, [], [])
    assert not np.asarray(state[2]).any()
