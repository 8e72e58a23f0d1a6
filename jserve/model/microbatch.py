"""Split one ragged step into pipeline micro-batches, inside the jit (no host change).

Where it sits: the decoder's pipelined path (``decoder.hidden_states`` with a mesh of several
stages) splits the step's ``StepInput`` [T tokens, R rows] into M micro-batches of T/M tokens
each before ``sharding.gpipe`` runs them through the stages. The host packs steps exactly as
at pp=1; the split is a static cut of the token rows plus a small gather of row metadata.

Micro-batch m holds tokens [m*T/M, (m+1)*T/M). A request whose chunk crosses the cut is in both
micro-batches, like a prompt prefilled in two chunks: the first writes its K/V to the pages,
the second (run later on every stage) reads them back as context::

    tokens      |a0 a1 a2 a3 a4|b0 c0 c1|pad...        T = 16, M = 2: cut at 8
    mb 0        |a0 a1 a2 a3 a4|b0 c0 c1|              rows a, b, c
    mb 1        |pad ...               |               no rows
    (with a 10-token row a: mb 0 = a0..a7, seq_len start+8; mb 1 = a8 a9 b0 ..., seq_len start+10)

Per micro-batch: rows are the global rows with a token in its window (contiguous, first at
local row 0), ``query_start_loc`` counts only their tokens in the window, ``seq_lens`` is the
context up to the window's last token of the row. So attention must read the pages (the paged
kernel): flash prefill over the chunk itself is only valid with M = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jserve.step_input import StepInput


def split_microbatches(batch: StepInput, num_microbatches: int) -> StepInput:
    """StepInput [T, R] -> a StepInput whose every leaf has a leading [M] axis: M micro-batches
    of T/M tokens and min(R, T/M) rows (``logits_indices`` zeros: logits are taken from the
    reassembled [T, H] hidden states with the global indices)."""
    t, r = batch.num_tokens, batch.num_rows
    m_count = num_microbatches
    if t % m_count:
        raise ValueError(f"{t} tokens do not split into {m_count} micro-batches")
    tm = t // m_count
    rm = min(r, tm)
    starts, ends = batch.query_start_loc[:-1], batch.query_start_loc[1:]   # [R]
    real = jnp.arange(r) < batch.num_seqs[0]
    out = []
    for m in range(m_count):
        a, b = m * tm, (m + 1) * tm
        lo, hi = jnp.clip(starts, a, b), jnp.clip(ends, a, b)
        cnt = jnp.where(real, hi - lo, 0)                          # row's tokens in the window
        first = jnp.sum(real & (ends <= a))                        # rows wholly before it
        idx = first + jnp.arange(rm)
        idx_c = jnp.minimum(idx, r - 1)
        n_tok = jnp.where(idx < r, cnt[idx_c], 0)
        qsl = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(n_tok).astype(jnp.int32)])
        seq = jnp.where(n_tok > 0, batch.seq_lens[idx_c] - (ends[idx_c] - hi[idx_c]), 0)
        out.append(StepInput(
            token_ids=batch.token_ids[a:b], positions=batch.positions[a:b],
            slot_mapping=batch.slot_mapping[a:b], page_table=batch.page_table[idx_c],
            seq_lens=seq.astype(jnp.int32), query_start_loc=qsl,
            num_seqs=jnp.sum(n_tok > 0, dtype=jnp.int32)[None],
            logits_indices=jnp.zeros((rm,), jnp.int32), decode_rows=batch.decode_rows))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *out)


def bubble(batch: StepInput, valid: jax.Array) -> StepInput:
    """A micro-batch as run on a bubble tick (``valid`` False): no rows, every token's K/V to the
    null page, so a stage's idle compute writes nothing a request reads."""
    return StepInput(
        token_ids=batch.token_ids, positions=batch.positions,
        slot_mapping=jnp.where(valid, batch.slot_mapping, 0), page_table=batch.page_table,
        seq_lens=jnp.where(valid, batch.seq_lens, 0),
        query_start_loc=jnp.where(valid, batch.query_start_loc, 0),
        num_seqs=jnp.where(valid, batch.num_seqs, 0), logits_indices=batch.logits_indices,
        decode_rows=batch.decode_rows)
