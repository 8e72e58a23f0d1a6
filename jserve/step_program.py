"""The step programs: the model forward and the in-step sampler over one packed step.

Where it sits: the runner lowers and compiles these functions, one program per ``StepVariant``
(``fused_step``: forward + sampler in one program), and for host-masked rows the split pair
(``forward_step`` then ``sample_step``, jserve/split_step.py). They take the step's one int32
input array (``StepLayout.joint``) and the runner's device state (KV pool, slot table, penalty
state, previous tokens, logit state), all donated where they are written.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jserve.kv_cache import KVCache
from jserve.model.decoder import forward
from jserve.penalty_state import penalized_logits, record_tokens
from jserve.sampler import _sample_core
from jserve.sampling_batch import SamplerFlags
from jserve.spec import chain
from jserve.step_buffers import StepLayout
from jserve.structured.automaton_step import StepMasks, advance_states, apply_automata, row_states
from jserve.structured.logit_state import apply_logit_state, masked_logits

# The in-step sampler's static flags, one compiled step per value (``step_sampler_flags``):
#  general: a superset whose unused work (random draws, filters, top-N logprobs) is skipped at
#           run time by the batch's values (``lax.cond`` in ``sampler._sample_core``). An XLA
#           GPU conditional reads its predicate on the host, which blocks the dispatching
#           thread until the device reaches it (after the forward), so the host cannot run
#           ahead of the device: a 64-row sampled Qwen2.5-0.5B step's launch spent 1.5 of its
#           3.8 ms there (H200, profiled; RESULTS_v2_sessions_9-12.md, session 11). Larger
#           steps (prefill), flash prefill and batches with top-k / top-p / min-p rows take it;
#  plain:   no filters and no ``lax.cond``: penalties, token masks, the random draw and the
#           logprobs are computed for every row (rows that need none get the same values as
#           from the general variant). Decode buckets' non-greedy steps without filters;
#  greedy:  argmax only, no conditional, no penalty state: steps whose sampling rows are all
#           greedy without logprobs or penalties (the common decode).
_GENERAL = SamplerFlags(all_greedy=False, any_filters=True, history_width=0, max_logprobs=20)
_PLAIN = SamplerFlags(all_greedy=False, any_filters=False, history_width=0, max_logprobs=20,
                      branch_free=True)
_GREEDY = SamplerFlags(all_greedy=True, max_logprobs=0)


def step_sampler_flags(greedy: bool, plain: bool) -> SamplerFlags:
    """The sampler flags of a step program (see above)."""
    return _GREEDY if greedy else _PLAIN if plain else _GENERAL


TOP_N = 20
# The sampler as a nested jit: variants with the same row bucket share its trace (start-up).
_sample_step = jax.jit(_sample_core, static_argnums=(3,))


class StepVariant(NamedTuple):
    """One compiled step program (all fields static)."""

    tokens: int                 # the token bucket T
    fresh_prefill: bool         # every chunk starts at token 0: flash attention over the chunk
    greedy: bool                # argmax sampler: no conditionals, no penalty state
    decode_only: bool = False   # greedy, and every row is one token (the smallest bucket only):
    #                             attention runs the GPU kernel's decode launch alone
    plain: bool = False         # not greedy: the plain sampler (no filters, no conditional)
    burst: int = 1              # > 1: that many greedy decode steps in one program (burst_step)

    def kind(self) -> str:
        """What start-up's progress lines call it ("burst of 8, greedy decode", ...)."""
        return (f"burst of {self.burst}, " if self.burst > 1 else "") + (
            "flash prefill" if self.fresh_prefill else "greedy decode"
            if self.decode_only and self.greedy else "greedy" if self.greedy
            else "plain sampler" if self.plain else "general sampler")


def _forward_part(cfg: Any, layout: StepLayout, variant: StepVariant, mesh: Mesh, params: Any,
                  kv: KVCache, table: jax.Array, prev_tokens: jax.Array, joint: jax.Array) -> tuple:
    """The model half of a step -> (kv, table with the step's diffs, logits f32[R, V],
    SamplingBatch, pen_slot int32[R], ibuf)."""
    table, batch, sbatch, pen_slot, ibuf = layout.unpack_fed(joint, table, prev_tokens)
    kv, logits = forward(cfg, params, kv, batch, fresh_prefill=variant.fresh_prefill, mesh=mesh,
                         decode_only=variant.decode_only)
    return kv, table, logits.astype(jnp.float32), sbatch, pen_slot, ibuf


def _sample_part(layout: StepLayout, num_out: int, num_spec: int, greedy: bool, plain: bool,
                 logits: jax.Array, sbatch: Any, pen: jax.Array | None, pen_slot: jax.Array,
                 masks: StepMasks | None, ibuf: jax.Array, table: jax.Array,
                 host_masks: jax.Array | None = None) -> tuple:
    """The sampler half of a step (penalties, token masks, token automata, sampling, penalty
    counts) -> (pen, table (automaton states advanced), tokens int32[S] (a speculating engine,
    ``num_spec`` > 0: its chained layout, ``spec.chain.plain_output``), logprobs f32[R] | None,
    top_ids int32[R, N] | None, top_lp | None). ``plain``: penalties and masks apply to every
    row (neutral where a row has none); ``host_masks`` int32[R, W]: the split step's per-row
    host masks (``apply_logit_state``); automata: jserve/structured/automaton_step.py."""
    penalized = None
    if pen is not None:
        penalized = (penalized_logits(logits, pen, pen_slot, sbatch) if plain else
                     jax.lax.cond(jnp.any(pen_slot >= 0),
                                  lambda: penalized_logits(logits, pen, pen_slot, sbatch),
                                  lambda: logits))
    states = None
    if masks is not None:
        x = logits if penalized is None else penalized
        mask_slot = layout.read(ibuf, "mask_slot")
        penalized = (apply_logit_state(x, masks.logit, mask_slot, host_masks) if plain else
                     masked_logits(x, masks.logit, mask_slot))
        if masks.automata is not None:
            states = row_states(table, layout.read(ibuf, "row_slot"), layout.read(ibuf, "samples"),
                                layout.pages_per_seq)
            penalized = apply_automata(logits, penalized, masks.automata, states)
    out = _sample_step(logits, penalized, sbatch, step_sampler_flags(greedy, plain))
    if pen is not None:
        pen = record_tokens(pen, pen_slot, out.token_ids)
    if states is not None:
        table = advance_states(table, masks.automata, layout.read(ibuf, "row_slot"), states,
                               out.token_ids, layout.pages_per_seq)
    tokens = chain.plain_output(out.token_ids, num_out, num_spec)
    if greedy:  # no logprobs asked (the host picks this variant only then): no outputs
        return pen, table, tokens, None, None, None
    r = layout.num_rows
    top_ids = out.top_ids if out.top_ids is not None else jnp.zeros((r, TOP_N), jnp.int32)
    top_lp = out.top_logprobs if out.top_logprobs is not None else jnp.zeros((r, TOP_N), jnp.float32)
    return pen, table, tokens, out.logprobs, top_ids, top_lp


def fused_step(cfg: Any, layout: StepLayout, num_out: int, num_spec: int, variant: StepVariant,
               mesh: Mesh, params: Any, kv: KVCache, pen: jax.Array | None, table: jax.Array,
               prev_tokens: jax.Array, joint: jax.Array, masks: StepMasks | None = None,
               host_out: tuple = ()) -> tuple:
    """Model forward + sampler over one packed step (``joint``: the step's two buffers as one
    int32 array, ``StepLayout.joint``). pen: int32[S_req, V] penalty state (None
    in the greedy variants); table: int32[S_req + 1, W] slot table (page rows, sampling params);
    prev_tokens: int32[S] (the previous step's sampled tokens by row; donated) -> (kv, pen,
    table, prev_tokens' int32[S] (this step's tokens, in the donated buffer: the next step reads
    them from the same address), tokens int32[S] (the same values for the host), logprobs
    f32[R], top_ids int32[R, N], top_logprobs f32[R, N]); ``variant.greedy``: argmax only, no
    penalties, the last three outputs None; masks: the per-slot token
    masks / biases (``structured.logit_state``) and token automata (``StepMasks``; None in the
    greedy variants); host_out: buffers shaped as the host-facing outputs (tokens[, logprobs,
    top_ids, top_logprobs]), donated: the outputs take their addresses
    (``jserve.host_outputs``)."""
    kv, table, logits, sbatch, pen_slot, ibuf = _forward_part(cfg, layout, variant, mesh, params, kv,
                                                              table, prev_tokens, joint)
    pen, table, tokens, lp, top_ids, top_lp = _sample_part(
        layout, num_out, num_spec, variant.greedy, variant.plain, logits, sbatch, pen, pen_slot,
        masks, ibuf, table)
    host = [tokens, lp, top_ids, top_lp]
    if host_out:   # each value written over its donated buffer (the output takes its address)
        live = iter(host_out)
        host = [v if v is None else jax.lax.dynamic_update_slice(next(live), v, (0,) * v.ndim) for v in host]
    return kv, pen, table, tokens, *host


def forward_step(cfg: Any, layout: StepLayout, variant: StepVariant, mesh: Mesh, params: Any,
                 kv: KVCache, table: jax.Array, prev_tokens: jax.Array, joint: jax.Array) -> tuple:
    """The split step's first program (jserve/split_step.py): ``fused_step``'s model half ->
    (kv, table, logits f32[R, V]); prev_tokens is read, not donated."""
    kv, table, logits, *_ = _forward_part(cfg, layout, variant, mesh, params, kv, table, prev_tokens,
                                          joint)
    return kv, table, logits


def sample_step(layout: StepLayout, num_out: int, num_spec: int, logits: jax.Array, pen: jax.Array,
                table: jax.Array, prev_tokens: jax.Array, joint: jax.Array, masks: StepMasks,
                host_masks: jax.Array) -> tuple:
    """The split step's second program: ``fused_step``'s plain sampler (no filters, no
    conditional: its launch need not wait for the forward) over the forward's logits f32[R, V],
    with the token masks the host computed meanwhile: host_masks int32[R, W] (all ones: none),
    row r's in row ``host_row[r]`` of them (-1: row r; the packed input's), a buffer of its own
    (no row-writer program, no copy into the logit state), ANDed with the static masks of the
    packed input's mask slots -> (pen, table (donated: automaton states advanced),
    prev_tokens' (donated), tokens, logprobs, top_ids, top_lp). The table already carries the
    step's diffs (applying them again changes nothing)."""
    del prev_tokens   # donated: this step's tokens take its buffer
    ibuf, fbuf = layout.split(joint)
    _, _, sbatch, _, pen_slot = layout.unpack(ibuf, fbuf, table)
    row = layout.read(ibuf, "host_row")
    host_masks = host_masks[jnp.where(row >= 0, row, jnp.arange(layout.num_rows))]
    pen, table, tokens, lp, top_ids, top_lp = _sample_part(layout, num_out, num_spec, False, True,
                                                           logits, sbatch, pen, pen_slot, masks, ibuf,
                                                           table, host_masks)
    return pen, table, tokens, tokens, lp, top_ids, top_lp
