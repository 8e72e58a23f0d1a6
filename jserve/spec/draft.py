"""Draft-model proposer: a small model with the target's tokenizer, run inside the target's step.

Where it sits: start-up (``load_draft``: resolve, validate against the target, load the weights)
and, in every step while it is configured, the speculative step executable
(``verify_step.spec_step``) calls ``draft_step`` after verifying the row's drafts (a step
without speculation, above ``disable_by_batch_size``, runs the target's ordinary program after
``catch_up``, the draft's forward over the step's tokens, skipped when every row belongs to a
request admitted above that load, which never drafts: ``Request.no_draft``). The drafts it
stay on the device and are the next step's draft rows when that step is planned while this one
is in flight (``jserve/spec/chain.py``); they also travel to the host with the step's tokens,
for a request whose next row is planned after the read (``Scheduler`` keeps them per request).

KV: the draft has its own paged pool with the SAME page ids as the target's (a twin page per
target page, sized from the same memory budget: each page costs target + draft bytes), so the
target's page tables, prefix-cache hits, copy-on-write copies and swaps (a second
``KVPageMover`` mirrors every move) all hold for the draft's K/V too. Requests that never draft
write no draft K/V: their pages are prefix-cached apart (``kv_manager._extra``), so a drafting
request never hits them (it computes that prefix again, once, with the draft); at high load
the catch-up then runs for no step (at 256 running, speculation off, the draft model's
engine dispatched 0.19-0.34 ms per step more than the base's, its catch-up launches: sessions
19 and 23 on an H200)::

    step rows (prefill chunks, [last, d_1 .. d_k] verify rows), after verification emitted
    t at position p (= start + 1 + accepted a), t put in the place of the first rejected draft
    (rows with a < k)                              -> draft K/V at the same slots; logits at
                                                      t's place -> draft 0 of those rows
    draft decodes i = 1 .. K-1, per sampling row: rows with t placed: draft i - 1 at p + i ->
        draft i; the others (every draft accepted, or none): t at p, then draft i - 2 at
        p + i - 1 -> draft i - 1 (K - 1 drafts; the K-th is -1, none)
    positions past the row's pages (the scheduler reserves K lookahead positions when the pool
    has room; its page row is zero past the request's pages) write the null page

Greedy rows draft the argmax. Random rows (temperature > 0) sample draft i from the draft's own
distribution q_i: its logits through the row's sampling transforms (/ temperature -> top-k ->
top-p -> min-p, ``rejection.filtered_logits``), Gumbel-max with the row's seed salted
(``DRAFT_SEED_SALT``: independent of the target's draws) at draft i's output index. q_i
(f32[V]) is kept on the device per slot (``SpecSteps.draft_probs``, [S + 1, K, V]) until the
next step verifies the drafts with min(1, p/q) and residual resampling: the output then
follows the target's distribution exactly (Leviathan et al. 2023). The catch-up over accepted
tokens is the next step's verify row itself: it feeds [last token, d_1 .. d_k] through the
draft at their positions, with that step's emitted token in the first rejected draft's place,
so that one forward both catches up and proposes (one small forward fewer per step than a
catch-up forward followed by K decodes: the batch-1 speculative step is a few hundred small
kernels, bound by their count).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from checkpoints import HFModelDir
from jserve.config import ModelConfig
from jserve.kv_cache import KVCache
from jserve.model.decoder import hidden_states, logits_from_hidden
from jserve.sampler import gumbel_noise
from jserve.sampling_batch import SamplingBatch
from jserve.spec.config import SpeculativeConfig
from jserve.spec.rejection import filtered_logits, softmax_rows
from jserve.step_buffers import StepLayout
from jserve.step_input import StepInput

log = logging.getLogger(__name__)

# XORed into a row's seed for its drafts' draws: independent of the target's (same counters).
DRAFT_SEED_SALT = (0x5EC0DE01, 0xD7AF7B0B)
# The draft's decodes run at least this many rows (``draft_step``).
MIN_DECODE_ROWS = 2


@dataclass
class DraftModel:
    """The draft's config, weights and K/V pool (same page count and size as the target's)."""

    cfg: ModelConfig
    params: Any
    kv: KVCache | None = None


def _tokenizer_digest(path: Path) -> str | None:
    f = path / "tokenizer.json"
    return hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None


def resolve_draft(spec: SpeculativeConfig, target: ModelConfig, target_dir: Path | None,
                  dtype: str) -> tuple[ModelConfig, HFModelDir]:
    """The draft's config and directory; ValueError naming ``speculative_config.model`` when
    it is missing, of another vocabulary or another tokenizer than the target."""
    from jserve.builder import DEFAULT_MODELS, default_model_path

    name = spec.model
    path = default_model_path(name) if name in DEFAULT_MODELS else Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(f"speculative_config.model: {name!r} is neither a bundled draft "
                         f"({', '.join(DEFAULT_MODELS)}) nor an HF model directory")
    model_dir = HFModelDir(str(path))
    cfg = ModelConfig.from_hf_config(model_dir.config, source=str(path / "config.json"), dtype=dtype)
    if cfg.vocab_size != target.vocab_size:
        raise ValueError(f"speculative_config.model: the draft's vocab_size ({cfg.vocab_size}) "
                         f"differs from the target's ({target.vocab_size})")
    if target_dir is not None:
        a, b = _tokenizer_digest(path), _tokenizer_digest(target_dir)
        if a is not None and b is not None and a != b:
            raise ValueError(f"speculative_config.model: the draft's tokenizer ({path}) is not the "
                             f"target's ({target_dir})")
    return cfg, model_dir


def _sample_random(logits: jax.Array, batch: SamplingBatch, greedy: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    masked = filtered_logits(logits, batch)
    salt = jnp.asarray(DRAFT_SEED_SALT, jnp.uint32)
    noise = gumbel_noise(dataclasses.replace(batch, seed=batch.seed ^ salt[None, :]), logits.shape[1])
    tok = jnp.argmax(masked + noise, axis=1).astype(jnp.int32)
    return jnp.where(batch.temperature > 0, tok, greedy), softmax_rows(masked)


def draft_sample(logits: jax.Array, batch: SamplingBatch) -> tuple[jax.Array, jax.Array]:
    """Inside jit: one draft token per row from the draft's logits f32[R, V]; ``batch``: the
    rows' sampling parameters, ``output_index`` the draft's output index. Greedy rows: argmax;
    random rows: a sample of q = softmax(filtered_logits) drawn with the salted seed.
    -> (tokens int32[R], q f32[R, V] (meaningful for random rows only))."""
    greedy = jnp.argmax(logits, axis=1).astype(jnp.int32)
    return jax.lax.cond(jnp.any(batch.temperature > 0), lambda: _sample_random(logits, batch, greedy),
                        lambda: (greedy, jnp.zeros(logits.shape, jnp.float32)))


def draft_step(cfg: ModelConfig, params: Any, kv: KVCache, batch: StepInput, samples: jax.Array,
               num_draft: jax.Array, tokens: jax.Array, num_emitted: jax.Array, num_spec: int,
               page_size: int, mesh: Mesh | None, sbatch: SamplingBatch | None = None,
               probs: jax.Array | None = None, slot: jax.Array | None = None,
               short_rows: bool = False) -> tuple[KVCache, jax.Array, jax.Array | None]:
    """Inside jit. batch: the step's input (token ids fed); samples/num_draft/num_emitted:
    int32[R]; tokens: int32[R, K + 1] the verified tokens; sbatch: the rows' sampling
    parameters (output_index: position 0's), or None: every row is greedy; probs: the per-slot
    q table f32[S + 1, K, V] (with sbatch), where row r's q of draft j goes to
    ``probs[slot[r], j]`` (slot: int32[R], the null row S for rows that do not sample);
    short_rows (static): no row has more than ``batch.decode_rows`` tokens (the forward over
    them runs attention's decode launch alone, ``hidden_states``' decode_only)
    -> (draft kv, drafts int32[R, K] (-1: none), probs). The random path (and its writes) runs
    only when some row is random (``lax.cond``): greedy batches pay nothing for it.

    The forward over the step's tokens carries the new token: a row whose window held a
    rejected draft (``full``: a + 1 <= num_draft) gets its emitted token t in that draft's
    place, so this forward's logits there give draft 0 and K - 1 decodes follow; a row that
    accepted every draft (or had none) has no place for t inside it: its first decode takes t,
    and it proposes K - 1 drafts (the last is -1). The tokens after t's place are rejected
    drafts: causal attention keeps them out of t's logits, and the decodes overwrite their K/V
    (with the row's window at s .. s + k: they sit at s + a + 2 .. s + k, at or below the last
    decode's s + a + K)."""
    r = batch.num_rows
    rows = jnp.arange(r)
    t_new = jnp.take_along_axis(tokens, (num_emitted - 1)[:, None], axis=1)[:, 0]
    live = (samples > 0) & (rows < batch.num_seqs[0])
    full = live & (num_emitted <= num_draft)
    at = batch.logits_indices - num_draft + num_emitted     # t's index in the step's tokens
    n = batch.token_ids.shape[0]
    sub = jnp.full((n,), -1, jnp.int32).at[jnp.where(full, at, n)].set(rows.astype(jnp.int32),
                                                                       mode="drop")
    ids = jnp.where(sub >= 0, t_new[jnp.maximum(sub, 0)], batch.token_ids)
    h, kv = hidden_states(cfg, params, kv, dataclasses.replace(batch, token_ids=ids),
                          fresh_prefill=False, mesh=mesh, decode_only=short_rows)
    # This forward's attention reads the pool that the decodes below write: without an order
    # between them XLA copies a layer's pool arrays to keep the old version (a pool-sized
    # temporary: the 0.9-share start-up ran out of memory on an H200, session 13). The barrier
    # puts every read of this forward before those writes.
    h, kv = jax.lax.optimization_barrier((h, kv))
    logits = logits_from_hidden(cfg, params, h[jnp.where(full, at, 0)]).astype(jnp.float32)
    # draft j is output token output_index + num_emitted + j; rows without t's place write
    # this draw's q to the null slot (their draft 0 comes from the first decode)
    first, probs = _draw(logits, sbatch, num_emitted, 0, probs,
                         None if slot is None else jnp.where(full, slot, probs.shape[0] - 1))
    shift = full.astype(jnp.int32)
    p = batch.page_table.shape[1]
    pos0 = batch.positions[batch.logits_indices] - num_draft + num_emitted   # t's position
    # The decodes run at least MIN_DECODE_ROWS rows (idle ones past num_seqs write the null
    # page): with one row XLA turns every matrix-vector product into a multiply and a reduce,
    # two kernels each over a weight-sized temporary (H200 census, RESULTS_v2_sessions_24-26.md).
    # The row inputs are padded once, before the loop; an idle row is not live (position 0,
    # the null slot).
    rd = max(r, MIN_DECODE_ROWS)
    rows_d = jnp.arange(rd)
    qsl = jnp.minimum(jnp.arange(rd + 1), batch.num_seqs[0]).astype(jnp.int32)
    table, pos0, shift_d, live_d = (_pad_rows(a, rd) for a in (batch.page_table, pos0, shift, live))
    tok, outs = jnp.where(full, first, t_new), []
    for i in range(1, num_spec):
        pos = pos0 + i - 1 + shift_d
        idx = jnp.clip(pos // page_size, 0, p - 1)
        page = table[rows_d, idx]
        ok = live_d & (pos // page_size < p) & (page > 0)
        pos = jnp.where(live_d, jnp.clip(pos, 0, p * page_size - 1), 0)
        step = StepInput(token_ids=_pad_rows(tok, rd), positions=pos,
                         slot_mapping=jnp.where(ok, page * page_size + pos % page_size, 0),
                         page_table=table,
                         seq_lens=jnp.where(rows_d < batch.num_seqs[0], pos + 1, 0).astype(jnp.int32),
                         query_start_loc=qsl, num_seqs=batch.num_seqs,
                         logits_indices=rows_d.astype(jnp.int32))
        h, kv = hidden_states(cfg, params, kv, step, fresh_prefill=False, mesh=mesh,
                              decode_only=True)
        logits = logits_from_hidden(cfg, params, h[:r]).astype(jnp.float32)
        j = i - 1 + shift                                      # this draft's index in the row
        tok, probs = _draw(logits, sbatch, num_emitted + j, j, probs, slot)
        outs.append(tok)
    drafts = jnp.stack([first] + outs, axis=1) if outs else first[:, None]        # full rows
    short = jnp.concatenate([jnp.stack(outs, axis=1), jnp.full((r, 1), -1, jnp.int32)], axis=1) \
        if outs else jnp.full((r, 1), -1, jnp.int32)
    return kv, jnp.where(full[:, None], drafts, short), probs


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    """x [R, ...] -> [rows, ...] (rows >= R): zero rows appended."""
    extra = rows - x.shape[0]
    return x if extra == 0 else jnp.concatenate([x, jnp.zeros((extra, *x.shape[1:]), x.dtype)])


def _draw(logits: jax.Array, sbatch: SamplingBatch | None, offset: jax.Array, j: jax.Array | int,
          probs: jax.Array | None, slot: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """One draft per row from the draft's logits f32[R, V]: the argmax, or (``sbatch`` given:
    some rows may be random) ``draft_sample`` at output index ``output_index + offset`` [R],
    its q written to ``probs[slot[r], j[r]]`` (j: int32[R] or an int) -> (tokens int32[R],
    probs)."""
    greedy = jnp.argmax(logits, axis=1).astype(jnp.int32)
    if sbatch is None:
        return greedy, probs
    ib = dataclasses.replace(sbatch, output_index=sbatch.output_index + offset)

    def rnd(table: jax.Array) -> tuple[jax.Array, jax.Array]:
        t, q = _sample_random(logits, ib, greedy)
        return t, table.at[slot, j].set(q)

    return jax.lax.cond(jnp.any(ib.temperature > 0), rnd, lambda table: (greedy, table), probs)


def catch_up(cfg: ModelConfig, layout: StepLayout, mesh: Mesh | None, params: Any, kv: KVCache,
             table: jax.Array, prev_tokens: jax.Array, joint: jax.Array) -> KVCache:
    """The draft's K/V for a step that runs without speculation (above ``disable_by_batch_size``):
    the draft's forward over the step's tokens at their slots, nothing proposed, so that its
    pool holds every token when speculation resumes. Runs before the target's step, reading
    the same packed input (``layout``: its ``StepLayout``), the previous-step output it feeds
    placeholders from and the slot table (the step's page diffs applied here too; the table
    is not kept) -> the draft kv (donated)."""
    _, batch, *_ = layout.unpack_fed(joint, table, prev_tokens)
    _, kv = hidden_states(cfg, params, kv, batch, fresh_prefill=False, mesh=mesh)
    return kv
