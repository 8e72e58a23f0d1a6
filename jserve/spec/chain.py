"""Chained verify rows: speculative decoding in the overlapped loop (draft model or n-gram).

Where it sits: between the scheduler's plan for step N+1, made while step N is in flight, and
the speculative step executable (``verify_step.spec_step``). A verify row emits 1 + a tokens
(a accepted drafts) and the host learns a only when it reads the step, so without this the
loop read every speculative step right after dispatching it. Instead the next row of a request
is planned as if none of its in-flight drafts were accepted and the device moves it::

    step N (in flight)   row [t, d_1 .. d_K] at p .. p + K  -> emits 1 + a tokens; the draft model
                         (or the n-gram lookup, spec/token_history.py) drafts e_1 .. e_K after
                         them; out: last token, e_1 .. e_K, a (per row)
    step N+1 (planned)   row [placeholder, e_1 .. e_K] at p + 1 ..   (the host's "a = 0")
                         on the device: tokens fed from step N's output (``prev_index``),
                         positions, KV slots, seq_len and output index + a

The previous-step output the runner feeds from (``Runner._prev_tokens``) holds, per out row r
of the step that wrote it::

    [0, S)                 last emitted token of row r            (every step variant)
    [S + r K + j]          the next draft j after it (j < K; n-gram: -1 if none was found)
    [S (K + 1) + r]        a: the drafts row r accepted (0: it had none)

Host fields (``StepLayout``): ``shift_row[r]``: the out row of step N whose a moves row r
(-1: none); ``token_row[t]``: the row of token t when that row is moved (-1 otherwise).
Pages: the scheduler reserves them for the largest a (``Request.spec_in_flight``), so a moved
row stays on its pages; slots are recomputed on the device from the row's page table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jserve.sampling_batch import SamplingBatch
from jserve.scheduler_output import ScheduledChunk
from jserve.step_buffers import StepLayout
from jserve.step_input import StepInput


def prev_size(num_out: int, num_spec: int) -> int:
    """Length of the previous-step output in chained mode (module docstring)."""
    return num_out * (num_spec + 2)


def pack_chained(f: dict[str, np.ndarray], chunks: Sequence[ScheduledChunk], ends: Sequence[int],
                 chained: Sequence[tuple[int, int]], num_out: int, num_spec: int) -> None:
    """Host: fill the feed indices of device drafts and the shift fields of moved rows.
    ``chained``: (row, out row of the same request in the step in flight); ``ends``: each
    row's end in the token axis; ``f``: the step buffer's field views."""
    prev_index, shift_row, token_row = f["prev_index"], f["shift_row"], f["token_row"]
    for r, src in chained:
        c, end = chunks[r], ends[r]
        if c.device_drafts and c.num_draft:
            nd = c.num_draft
            prev_index[end - nd:end] = num_out + src * num_spec + np.arange(nd, dtype=np.int32)
        if c.shifted:
            shift_row[r] = src
            token_row[end - c.num_tokens:end] = r


def shift_rows(layout: StepLayout, ibuf: jax.Array, batch: StepInput, sbatch: SamplingBatch,
               prev: jax.Array, num_out: int, num_spec: int) -> tuple[StepInput, SamplingBatch]:
    """Inside jit: move each shifted row by the drafts its request's previous row accepted
    (``prev``: int32[prev_size]); -> (batch, sbatch) with positions [T], slot_mapping [T],
    seq_lens [R] and output_index [R] moved."""
    shift_row = layout.read(ibuf, "shift_row")
    token_row = layout.read(ibuf, "token_row")
    acc = jnp.where(shift_row >= 0, prev[num_out * (num_spec + 1) + jnp.maximum(shift_row, 0)], 0)
    on = token_row >= 0
    tr = jnp.maximum(token_row, 0)
    pos = batch.positions + jnp.where(on, acc[tr], 0)
    ps = layout.page_size
    idx = jnp.clip(pos // ps, 0, batch.page_table.shape[1] - 1)
    slots = jnp.where(on, batch.page_table[tr, idx] * ps + pos % ps, batch.slot_mapping)
    batch = dataclasses.replace(batch, positions=pos, slot_mapping=slots,
                                seq_lens=batch.seq_lens + acc)
    sbatch = dataclasses.replace(sbatch, output_index=sbatch.output_index + acc)
    return batch, sbatch


def plain_output(last: jax.Array, num_out: int, num_spec: int) -> jax.Array:
    """Inside jit: the previous-step output of an ordinary step variant: last [R] at [0, R);
    in a speculating engine (``num_spec`` K > 0) the chained layout with no drafts (-1: the
    next row verifies none) and no accepted ones -> int32[S] or int32[prev_size]."""
    r = last.shape[0]
    if num_spec == 0:
        return jnp.zeros((num_out,), jnp.int32).at[:r].set(last)
    out = jnp.full((prev_size(num_out, num_spec),), -1, jnp.int32).at[:r].set(last)
    return out.at[num_out * (num_spec + 1):].set(0)


def prev_output(last: jax.Array, drafts: jax.Array, num_emitted: jax.Array, num_draft: jax.Array,
                num_out: int) -> jax.Array:
    """Inside jit: the previous-step output a chained step leaves (module docstring) from
    last [R], drafts [R, K], num_emitted [R] and num_draft [R] -> int32[prev_size]."""
    r, k = drafts.shape
    out = jnp.zeros((prev_size(num_out, k),), jnp.int32)
    out = out.at[:r].set(last)
    out = out.at[num_out:num_out + r * k].set(drafts.reshape(-1))
    acc = jnp.where(num_draft > 0, num_emitted - 1, 0)
    return out.at[num_out * (k + 1):num_out * (k + 1) + r].set(acc)
