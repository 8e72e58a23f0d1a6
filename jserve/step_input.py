"""StepInput: the packed, padded device input of one step (a registered pytree dataclass).

Where it sits: ``Runner.prepare(SchedulerOutput)`` fills these arrays on the host (numpy) at
a bucketed shape and sends them with one ``device_put``; the jitted ``step_fn`` reads them.

Ragged layout (T = token bucket, R = request-row bucket, P = pages per sequence)::

    token_ids      |a0 a1 a2 a3|b0|c0 c1|pad pad ...|      T entries
    query_start_loc 0           4  5     7  7  7 ...       R+1 entries (padding repeats)
    seq_lens        [len_a, len_b, len_c, 0, 0, ...]       context incl. this chunk
    page_table      row r = request r's pages, 0-padded (page 0 = null page)
    slot_mapping    page*page_size + offset per token; padding tokens -> slots of page 0
    logits_indices  last token row of each request (padding rows -> 0)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StepInput:
    token_ids: jax.Array        # int32[T]
    positions: jax.Array        # int32[T]   absolute position of each token in its sequence
    slot_mapping: jax.Array     # int32[T]   flat KV slot each token's K/V is written to
    page_table: jax.Array       # int32[R, P]
    seq_lens: jax.Array         # int32[R]   total context (cached + this chunk); 0 = padding
    query_start_loc: jax.Array  # int32[R + 1]
    num_seqs: jax.Array         # int32[1]   real rows; rows >= num_seqs are padding
    logits_indices: jax.Array   # int32[R]   token row whose hidden state is sampled
    # (static) query rows per request the paged attention's decode class should hold: 1 + k in
    # speculative verify steps (jserve/spec/verify_step.py), else 1
    decode_rows: int = dataclasses.field(default=1, metadata=dict(static=True))

    @classmethod
    def empty(cls, num_tokens: int, num_rows: int, pages_per_seq: int) -> StepInput:
        """All-padding numpy input of a bucket's shape (used for warm-up compiles)."""
        z = lambda *s: np.zeros(s, np.int32)
        return cls(token_ids=z(num_tokens), positions=z(num_tokens), slot_mapping=z(num_tokens),
                   page_table=z(num_rows, pages_per_seq), seq_lens=z(num_rows),
                   query_start_loc=z(num_rows + 1), num_seqs=z(1), logits_indices=z(num_rows))

    @classmethod
    def fresh_prompts(cls, token_ids: list[np.ndarray], num_tokens: int, num_rows: int, pages_per_seq: int,
                      page_size: int) -> StepInput:
        """Fresh prompts (no cached context) packed back to back on consecutive pages from page 1
        (benchmarks and kernel checks; the runner builds real steps in ``prepare``)."""
        b = cls.empty(num_tokens, num_rows, pages_per_seq)
        pos0, page0 = 0, 1
        for r, ids in enumerate(token_ids):
            n = len(ids)
            pos = np.arange(n, dtype=np.int32)
            pages = page0 + np.arange(-(-n // page_size), dtype=np.int32)
            b.token_ids[pos0:pos0 + n] = ids
            b.positions[pos0:pos0 + n] = pos
            b.slot_mapping[pos0:pos0 + n] = pages[pos // page_size] * page_size + pos % page_size
            b.page_table[r, :len(pages)] = pages
            b.seq_lens[r] = n
            b.query_start_loc[r + 1:] = pos0 + n
            b.logits_indices[r] = pos0 + n - 1
            pos0, page0 = pos0 + n, page0 + len(pages)
        b.num_seqs[0] = len(token_ids)
        return b

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_rows(self) -> int:
        return self.seq_lens.shape[0]


def advance_decode(batch: StepInput, i: int | jax.Array, page_size: int) -> StepInput:
    """Inside jit: a decode-only step (token r = row r, real rows first) ``i`` steps later, as a
    burst's sub-step runs it: positions + i, slots from the rows' pages, seq_lens + i (padding
    tokens and rows unchanged; token ids as they were)."""
    t, r = batch.num_tokens, batch.num_rows
    live = jnp.arange(t) < batch.num_seqs[0]
    pos = jnp.where(live, batch.positions + i, batch.positions)
    row = jnp.minimum(jnp.arange(t), r - 1)
    page = jnp.take_along_axis(batch.page_table[row], (pos // page_size)[:, None], axis=1)[:, 0]
    return dataclasses.replace(
        batch, positions=pos,
        slot_mapping=jnp.where(live, page * page_size + pos % page_size, batch.slot_mapping),
        seq_lens=jnp.where(jnp.arange(r) < batch.num_seqs[0], batch.seq_lens + i, batch.seq_lens))
