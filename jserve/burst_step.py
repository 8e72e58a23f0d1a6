"""The burst program: N decode steps in one device program (``num_scheduler_steps``).

Where it sits: the runner compiles it beside the step variants (``StepVariant.burst`` > 1: the
smallest token bucket's decode-only variant, greedy and with the plain sampler) and dispatches
it for plans whose ``SchedulerOutput.burst`` is N: every row is one decode token with nothing
the host adds per token (no logprobs, grammar masks, top-k / top-p / min-p or ``min_tokens``
bans; ``Scheduler._burst``), so sub-step i's input follows from sub-step i - 1's on the device::

    step input (packed once, as for the decode-only step) -> rows r < num_seqs, token r = row r
    sub-step i:  token_ids  = the tokens sub-step i - 1 sampled (i = 0: the packed / fed ones)
                 positions  = packed positions + i
                 slot_mapping = page_table[r, pos // page_size] * page_size + pos % page_size
                 seq_lens   = packed seq_lens + i             (padding rows and tokens unchanged)
      forward (decode-only attention) -> argmax, or the plain sampler (penalties and static
      masks from the device state, the row's seed at output index + i) -> tokens_i int32[S]
    outputs: the last sub-step's tokens in the donated previous-tokens buffer (the next step
    feeds from them, as from an ordinary step) and all tokens int32[N, S] for the host

The scheduler reserved the pages of all N positions of every row (``Scheduler._burst``), and
``Scheduler.update`` takes the N tokens of a row like a speculative row's accepted ones, stop
checks included: tokens after a stop are computed and dropped (never emitted).

The N sub-steps are unrolled, not a ``fori_loop``: on an H200 (session 16, Qwen2.5-0.5B) XLA
copied every layer's weight slices inside the loop's body (the straight-line step passes them
to the GEMMs in place), 566-693 MiB of scratch that the start-up's 2-page probe did not see
(the 0.5 share ran out of memory), and ran at 1.66 ms per token against the step's ~1 ms.
Unrolled, the burst is one straight-line program like the decode step: its scratch equals the
step's (9.4 vs 9.3 MiB at every pool size) and a token costs the step's kernel time (1.096 vs
1.087 ms); it compiles longer (the bundled model's engine build 5 -> 10 s on CPU at N = 8).

At pipeline_parallel_size S > 1 a burst runs ``decoder.pipelined_burst``: the rows in S groups
circling through the stages (``sharding.gpipe_cycle``), so that every stage works on every
tick instead of one at a time; only its plain-sampler variant is compiled there (greedy rows
draw the argmax in it), in the smallest bucket and the one of ``max_num_seqs`` rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jserve.kv_cache import KVCache
from jserve.model.decoder import forward, pipelined_burst
from jserve.penalty_state import penalized_logits, record_tokens
from jserve.step_buffers import StepLayout
from jserve.step_input import advance_decode
from jserve.step_program import StepVariant, _sample_part, _sample_step, step_sampler_flags
from jserve.structured.automaton_step import StepMasks
from jserve.structured.logit_state import apply_logit_state
from sharding import num_stages


def burst_step(cfg: Any, layout: StepLayout, num_out: int, variant: StepVariant, mesh: Mesh,
               params: Any, kv: KVCache, pen: jax.Array | None, table: jax.Array,
               prev_tokens: jax.Array, joint: jax.Array, masks: StepMasks | None = None) -> tuple:
    """``variant.burst`` decode steps over one packed decode-only step, greedy or with the
    plain sampler (``variant.greedy``; ``fused_step``'s arguments and outputs, no logprobs) ->
    (kv, pen (None when greedy), table, prev_tokens' int32[S], tokens int32[N, S], None, None,
    None). The plain sampler draws sub-step i's token with the row's seed at its output index
    + i and counts it in the penalty state, as i ordinary steps would. No row has a token
    automaton (a grammar is never ``burstable``): the burst reads the logit state only."""
    masks = None if masks is None else masks._replace(automata=None)
    table, batch, sbatch, pen_slot, ibuf = layout.unpack_fed(joint, table, prev_tokens)
    t, r, ps = layout.num_tokens, layout.num_rows, layout.page_size
    mask_slot = layout.read(ibuf, "mask_slot")
    if num_stages(mesh) > 1:   # the rows circle through the stages in groups
        kv, pen, out = _pipelined(cfg, layout, num_out, variant, mesh, params, kv, pen, batch,
                                  sbatch, pen_slot, masks, mask_slot)
        return kv, pen, table, out[-1], out, None, None, None
    row = jnp.minimum(jnp.arange(t), r - 1)              # decode-only: token t is row t
    tok_valid = jnp.arange(t) < batch.num_seqs[0]

    ids, out = batch.token_ids, []
    for i in range(variant.burst):   # unrolled: see the module docstring
        step = dataclasses.replace(advance_decode(batch, i, ps), token_ids=ids)
        kv, logits = forward(cfg, params, kv, step, fresh_prefill=False, mesh=mesh, decode_only=True)
        sb = dataclasses.replace(sbatch, output_index=sbatch.output_index + i)
        pen, _, tokens, *_ = _sample_part(layout, num_out, 0, variant.greedy, variant.plain,
                                          logits.astype(jnp.float32), sb, pen, pen_slot, masks, ibuf,
                                          table)
        ids = jnp.where(tok_valid, tokens[row], ids)
        out.append(tokens)
    return kv, pen, table, out[-1], jnp.stack(out), None, None, None


def _pipelined(cfg: Any, layout: StepLayout, num_out: int, variant: StepVariant, mesh: Mesh,
               params: Any, kv: KVCache, pen: jax.Array | None, batch: Any, sbatch: Any,
               pen_slot: jax.Array, masks: StepMasks | None, mask_slot: jax.Array) -> tuple:
    """A burst at pipeline parallelism (``decoder.pipelined_burst``) -> (kv, pen, tokens
    int32[N, num_out]). The plain sampler draws a group's tokens on stage 0 with the rows'
    seeds at output index + i, their penalties counted in stage 0's copy of the penalty state
    as it goes; the real state records the burst's tokens afterwards, as N steps would."""
    r = layout.num_rows

    def sample(inputs: tuple, pen_l: jax.Array, logits: jax.Array, row0: jax.Array, i: jax.Array,
               fed: jax.Array) -> tuple[jax.Array, jax.Array]:
        sbatch, pen_slot, masks, mask_slot, num_seqs = inputs
        rows = row0 + jnp.arange(logits.shape[0])
        idx = jnp.minimum(rows, r - 1)
        sb = jax.tree.map(lambda a: a[idx], sbatch)
        sb = dataclasses.replace(sb, output_index=sb.output_index + i)
        slot = jnp.where(fed & (rows < num_seqs), pen_slot[idx], -1)
        # The plain sampler's parts (``step_program._sample_part``), inline: through that
        # function XLA:CPU's compile of this program segfaulted (jax 0.11.2).
        x = penalized_logits(logits, pen_l, slot, sb)
        if masks is not None:
            x = apply_logit_state(x, masks.logit, mask_slot[idx])
        tokens = _sample_step(logits, x, sb, step_sampler_flags(False, True)).token_ids
        return tokens, record_tokens(pen_l, slot, tokens)

    plain = not variant.greedy
    kv, tokens = pipelined_burst(cfg, params, kv, batch, variant.burst, layout.page_size, mesh,
                                 sample if plain else None,
                                 (sbatch, pen_slot, masks, mask_slot, batch.num_seqs[0]) if plain else None,
                                 pen if plain else None)
    n = min(tokens.shape[1], num_out)
    out = jnp.zeros((variant.burst, num_out), jnp.int32).at[:, :n].set(tokens[:, :n])
    if pen is not None:
        for i in range(variant.burst):
            pen = record_tokens(pen, pen_slot, out[i, :r])
    return kv, pen, out
