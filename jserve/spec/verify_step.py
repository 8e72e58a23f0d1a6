"""The speculative step variants: model forward + draft verification in one executable.

Where it sits: ``Runner.dispatch`` hands a step whose plan has draft rows
(``SchedulerOutput.has_drafts``) to ``SpecSteps.dispatch`` after packing it as usual (the step
buffer's ``num_draft[r]`` marks the last tokens of row r as drafts). The executable::

    unpack, feed placeholders (as ``step_program.fused_step``) -> hidden states of all T tokens
    row r (K = num_speculative_tokens, k = num_draft[r] <= K, e = its last token):
        verify positions  e - k, e - k + 1, ..., e  (then e repeated up to K + 1 columns)
        logits [R, K + 1, V] at them; the drafts are the row's tokens e - k + 1 .. e
    penalties (column 0 of rows that use them: they never carry drafts), token masks (position
    j: the grammar advanced along the first j drafts, ``structured.logit_state``) and bans
    -> jserve.spec.rejection.rejection_sample (q: the draft model's distributions of random
       rows' drafts, kept per slot in ``draft_probs``; n-gram / greedy drafts: point masses)
       -> tokens [R, K + 1], num_emitted [R]
    -> the S-vector of each row's last emitted token (feeds placeholders of the next step,
       as the ordinary variants' output does), the penalty counts of that token; with a draft
       model or n-gram lookup (its token history recorded, ``token_history``) also the next
       drafts and the accepted counts after it (``chain``: the next step, planned while this
       one is in flight, is fed and moved from them)

Rows without drafts (prefill chunks, decode rows of requests that do not speculate) get
exactly the ordinary sampler's token in column 0. Variants: (token bucket, greedy); the greedy
one has no control flow (see ``step_program.step_sampler_flags``) and exists for the buckets a pure
decode step with drafts lands in. It takes only steps whose rows are verify or decode rows (at
most 1 + k tokens each, no prompt chunk): its attention runs the paged kernel's decode launch
alone (``decode_only``: no prefill tiles and no work list per layer), the target's and the
draft's. All are compiled at start-up with the runner's variants.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jserve.kv_cache import KVCache
from jserve.kv_transfer import KVPageMover
from jserve.model.decoder import hidden_states, logits_from_hidden
from jserve.penalty_state import penalized_logits, record_tokens
from jserve.sampler import apply_bans, raw_logprobs, top_k_rows
from jserve.scheduler_output import RunnerOutput, SchedulerOutput
from jserve.spec import chain, token_history
from jserve.spec.draft import DraftModel, catch_up, draft_step
from jserve.spec.rejection import expand_rows, rejection_sample
from jserve.step_buffers import StepLayout
from jserve.step_variants import decode_buckets, greedy_rows
from jserve.structured.logit_state import masked_logits

if TYPE_CHECKING:
    from jserve.runner import Runner

TOP_N = 20


def spec_step(cfg: Any, layout: StepLayout, num_out: int, num_spec: int, greedy: bool, mesh: Mesh,
              draft_cfg: Any, lookup: tuple[int, int] | None, params: Any, kv: KVCache,
              pen: jax.Array | None, table: jax.Array, prev_tokens: jax.Array, joint: jax.Array,
              draft_params: Any, draft_kv: KVCache | None, draft_probs: jax.Array | None,
              hist: jax.Array | None, masks: jax.Array | None = None) -> tuple:
    """-> (kv, pen, table, previous-step output (last tokens int32[S]; chained: int32[S (K + 2)],
    ``chain``), host: int32[R (K + 1) + 2R + RK] = tokens [R, K + 1], num_emitted [R], verified
    drafts [R], next drafts [R, K] (``unpack_host``), logprobs f32[R, K + 1], top_ids
    int32[R, K + 1, N], top_logprobs f32[R, K + 1, N] (the three None in the greedy variant),
    draft_kv, draft_probs, hist). Arguments
    as ``step_program.fused_step``; ``num_spec`` (static) is K; ``draft_cfg`` (static) the draft
    model's config, or None (n-gram: draft_kv None); ``lookup`` (static, n-gram, exactly when
    draft_cfg is None): (prompt_lookup_min, prompt_lookup_max), its token history ``hist``
    int32[S + 1, L] (``token_history``; else None); draft_probs: f32[S + 1, K, V]
    per slot, the distributions its random rows' drafts were sampled from (the draft model's
    general variant; else None): read to verify this step's drafts, written with the next;
    masks: the per-(slot, position) token masks / biases (``structured.logit_state``; None in
    the greedy variants): position j of row r reads row mask_slot[r] + j * mask_step[r]."""
    ibuf, fbuf = layout.split(joint)
    table, batch, sbatch, prev_index, pen_slot = layout.unpack(ibuf, fbuf, table)
    num_draft = layout.read(ibuf, "num_draft")
    fed = prev_tokens[jnp.maximum(prev_index, 0)]
    token_ids = jnp.where(prev_index >= 0, fed, batch.token_ids)   # -1: a draft not found
    r, k1 = layout.num_rows, num_spec + 1
    last = batch.logits_indices[:, None]
    cols = jnp.arange(k1)[None, :]
    idx = jnp.clip(last - num_draft[:, None] + cols, 0, last)                  # [R, K + 1]
    drafts = token_ids[idx[:, 1:]]                                             # [R, K]
    verified = verified_drafts(drafts, num_draft)
    drafts = jnp.maximum(drafts, 0)
    batch = dataclasses.replace(batch, token_ids=jnp.maximum(token_ids, 0), decode_rows=k1)
    # rows planned while the previous step ran move by its accepted drafts (chain.py)
    batch, sbatch = chain.shift_rows(layout, ibuf, batch, sbatch, prev_tokens, num_out, num_spec)
    h, kv = hidden_states(cfg, params, kv, batch, fresh_prefill=False, mesh=mesh, decode_only=greedy)
    logits = logits_from_hidden(cfg, params, h[idx.reshape(-1)], mesh).astype(jnp.float32)
    v = logits.shape[1]
    vbatch = expand_rows(sbatch, k1)
    x = logits
    if pen is not None:
        vslot = jnp.where(cols == 0, pen_slot[:, None], -1).reshape(-1)
        x = jax.lax.cond(jnp.any(pen_slot >= 0),
                         lambda: penalized_logits(logits, pen, vslot, vbatch), lambda: logits)
    if masks is not None:
        mslot, mstep = layout.read(ibuf, "mask_slot"), layout.read(ibuf, "mask_step")
        vslot = jnp.where(mslot[:, None] >= 0, mslot[:, None] + cols * mstep[:, None], -1)
        x = masked_logits(x, masks, vslot.reshape(-1))
    x = apply_bans(x, vbatch.banned_ids)
    slot = None
    samples = layout.read(ibuf, "samples")
    if draft_probs is not None:   # row r's q is draft_probs[slot[r]] (null row: not sampling)
        row_slot = layout.read(ibuf, "row_slot")
        slot = jnp.where((row_slot >= 0) & (samples > 0), row_slot, draft_probs.shape[0] - 1)
    tokens, num = rejection_sample(x.reshape(r, k1, v), drafts, verified, sbatch,
                                   all_greedy=greedy, draft_probs=draft_probs, draft_slot=slot)
    last_tok = jnp.take_along_axis(tokens, (num - 1)[:, None], axis=1)[:, 0]
    if pen is not None:
        pen = record_tokens(pen, pen_slot, last_tok)  # penalty rows carry no drafts: one token
    n = min(TOP_N, v)

    def with_logprobs() -> tuple[jax.Array, jax.Array, jax.Array]:
        lp = raw_logprobs(logits)
        chosen = jnp.take_along_axis(lp, tokens.reshape(-1, 1), axis=1)[:, 0]
        top_lp, top_ids = top_k_rows(lp, n)
        return (chosen.reshape(r, k1), top_ids.astype(jnp.int32).reshape(r, k1, n),
                top_lp.reshape(r, k1, n))

    def without() -> tuple[jax.Array, jax.Array, jax.Array]:
        return (jnp.zeros((r, k1), jnp.float32), jnp.zeros((r, k1, n), jnp.int32),
                jnp.zeros((r, k1, n), jnp.float32))

    if greedy:   # no row asks for logprobs: no arrays (each output is a node and a buffer per call)
        lp = top_ids = top_lp = None
    else:
        lp, top_ids, top_lp = jax.lax.cond(jnp.any(sbatch.want_logprobs), with_logprobs, without)
    if draft_cfg is not None:
        draft_kv, nxt, draft_probs = draft_step(
            draft_cfg, draft_params, draft_kv, batch, samples, num_draft, tokens, num, num_spec,
            layout.page_size, mesh, None if greedy else sbatch, draft_probs, slot,
            short_rows=greedy)
    else:   # n-gram lookup over the slots' token histories
        row_slot = layout.read(ibuf, "row_slot")
        hist = token_history.record(
            hist, token_history.token_slots(row_slot, batch.query_start_loc, layout.num_tokens),
            batch.positions, batch.token_ids)
        last_pos = batch.positions[batch.logits_indices] - num_draft + num
        hist, nxt = token_history.step_drafts(hist, row_slot, samples, last_pos, last_tok,
                                              num_spec, *lookup)
    out = chain.prev_output(last_tok, nxt, num, num_draft, num_out)
    host = jnp.concatenate([tokens.reshape(-1), num, verified, nxt.reshape(-1)])
    return kv, pen, table, out, host, lp, top_ids, top_lp, draft_kv, draft_probs, hist


def unpack_host(host: np.ndarray, num_rows: int, num_spec: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The speculative step's one host-bound int32 output (one transfer per step) ->
    (tokens [R, K + 1], num_emitted [R], verified drafts [R], next drafts [R, K])."""
    r, k1 = num_rows, num_spec + 1
    a = r * k1
    return (host[:a].reshape(r, k1), host[a:a + r], host[a + r:a + 2 * r],
            host[a + 2 * r:].reshape(r, num_spec))


def verified_drafts(drafts: jax.Array, num_draft: jax.Array) -> jax.Array:
    """Inside jit: the drafts each row verifies: its first ``num_draft[r]`` up to the first
    missing one (-1: the device n-gram lookup found fewer than K) -> int32[R].
    drafts: int32[R, K]."""
    k = drafts.shape[1]
    known = (drafts >= 0) & (jnp.arange(k)[None, :] < num_draft[:, None])
    return jnp.sum(jnp.cumprod(known.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


@dataclass
class SpecStepHandle:
    """A dispatched speculative step: per row up to K + 1 tokens, on their way to the host."""

    sched_out: SchedulerOutput
    host: jax.Array                         # int32: tokens, counts, drafts (``unpack_host``)
    num_spec: int
    logprobs: tuple[jax.Array, ...] | None  # ([R, K + 1], [R, K + 1, N], [R, K + 1, N]) if asked
    top_n: tuple[int, ...]
    with_drafts: bool                       # a draft model's next drafts go to the scheduler

    def result(self) -> RunnerOutput:
        chunks = self.sched_out.chunks
        num_rows = self.host.shape[0] // (3 + 2 * self.num_spec)
        tokens, num, ver, nxt = unpack_host(np.asarray(self.host), num_rows, self.num_spec)
        sampled = [tokens[r, :num[r]].tolist() if c.samples else [] for r, c in enumerate(chunks)]
        drafts = None
        if self.with_drafts:
            drafts = [nxt[r].tolist() if c.samples else [] for r, c in enumerate(chunks)]
        verified = ver[:len(chunks)].tolist()
        if self.logprobs is None:
            return RunnerOutput(sampled, draft_token_ids=drafts, verified_drafts=verified)
        lp, ids, tlp = (np.asarray(a) for a in self.logprobs)
        rows = range(len(chunks))
        return RunnerOutput(
            sampled, draft_token_ids=drafts, verified_drafts=verified,
            logprobs=[lp[r, :max(1, num[r])].tolist() for r in rows],
            top_ids=[[ids[r, j, :t].tolist() for j in range(max(1, num[r]))]
                     for r, t in zip(rows, self.top_n, strict=True)],
            top_logprobs=[[tlp[r, j, :t].tolist() for j in range(max(1, num[r]))]
                          for r, t in zip(rows, self.top_n, strict=True)])


class SpecSteps:
    """The runner's speculative variants: compiled at warm-up, dispatched for draft steps."""

    def __init__(self, runner: Runner, num_spec: int, draft: DraftModel | None = None,
                 lookup: tuple[int, int] | None = None, pauses: bool = False) -> None:
        """``draft``: the draft model (its pool allocated): steps run here, the draft's K/V kept
        in step with the target's (page moves mirrored by ``move``); with ``pauses``
        (``disable_by_batch_size`` set) a step without speculation runs the target's ordinary
        program after the draft's ``catch_up`` instead. ``lookup``: n-gram drafts on the
        device, (prompt_lookup_min, prompt_lookup_max): the steps run while speculation is on
        run here and keep each slot's tokens (``token_history``)."""
        if (draft is None) == (lookup is None):
            raise ValueError("SpecSteps needs exactly one proposer: a draft model or an n-gram lookup")
        self.num_spec = num_spec
        self.draft = draft
        self.lookup = lookup
        self.pauses = pauses
        self._catch_up: dict[int, Any] = {}   # token bucket -> the draft's catch-up program
        self.mover = None
        if draft is not None:
            self.mover = KVPageMover(draft.kv, max(runner._pages_per_seq,
                                                   runner.config.scheduler.max_num_seqs),
                                     runner.mover.host.num_slots)
        sched = runner.config.scheduler
        buckets = sched.token_buckets
        widest = sched.max_num_seqs * (1 + num_spec)   # a pure decode step with drafts
        self._greedy_buckets = decode_buckets(buckets, widest)
        self._compiled: dict[tuple[int, bool], Any] = {}
        # The draft model's q of each slot's drafts (random rows), f32[S + 1, K, V]: written by
        # the step that drafts them, read by the next that verifies them (general variants).
        self.draft_probs = None
        if draft is not None:
            shape = (sched.max_num_seqs + 1, num_spec, runner.config.model.vocab_size)
            self.draft_probs = jax.device_put(np.zeros(shape, np.float32), runner._replicated)
        self.hist, self._hist_writer = None, None
        if lookup is not None:
            self._hist_writer = token_history.HistoryWriter(
                sched.max_num_seqs, sched.max_model_len, runner._replicated)
            self.hist = self._hist_writer.zeros()

    def variants(self, runner: Runner) -> list[tuple[int, bool]]:
        out = []
        for t in runner.config.scheduler.token_buckets:
            out.append((t, False))
            if t in self._greedy_buckets:
                out.append((t, True))
        return out

    @property
    def every_step(self) -> bool:
        """With a draft model that never pauses every step runs here (the draft sees every
        token); a pausing one's steps without speculation run ``catch_up`` and the ordinary
        program. N-gram steps run here while speculation is on (``SchedulerOutput
        .speculative``): their token histories miss what other steps compute, which the
        scheduler sends again (``ScheduledChunk.history``) before speculation resumes."""
        return self.draft is not None and not self.pauses

    def catch_up(self, runner: Runner, layout: StepLayout, joint: Any) -> None:
        """Before a step without speculation (its input ``joint``): the draft's forward over the
        step's tokens (``draft.catch_up``); nothing without a draft model."""
        if self.draft is not None:
            d = self.draft
            d.kv = self._catch_up[layout.num_tokens](d.params, d.kv, runner.slot_table,
                                                     runner._prev_tokens, joint)

    def _lower_catch_up(self, runner: Runner, t: int) -> Any:
        layout = runner.layout(t)
        d = self.draft
        fn = functools.partial(catch_up, d.cfg, layout, runner.mesh)
        joint = jax.device_put(layout.joint(layout.new_buffers()[0]), runner._replicated)
        return jax.jit(fn, donate_argnums=(1,),
                       out_shardings=jax.tree.map(lambda a: a.sharding, d.kv)).lower(
            d.params, d.kv, runner.slot_table, runner._prev_tokens, joint)

    def write_histories(self, rows: list[tuple[int, tuple[int, ...]]]) -> None:
        """Slots' token histories from the host, (slot, prompt + outputs) each: requests taking
        a slot, or resuming speculation (n-gram; else nothing to keep)."""
        if self._hist_writer is not None and rows:
            self.hist = self._hist_writer(self.hist, rows)

    def move(self, transfers: Any) -> None:
        """Mirror the step's page moves on the draft's pool (twin pages)."""
        if self.draft is not None:
            self.draft.kv = self.mover.move(self.draft.kv, transfers)

    def _draft_args(self) -> tuple[Any, Any, Any]:
        d = self.draft
        return (None, None, None) if d is None else (d.cfg, d.params, d.kv)

    def _args(self, runner: Runner, greedy: bool, joint: Any) -> tuple:
        """The executable's arguments (params, kv, penalty state, slot table, previous-step
        output, the packed input, draft params, draft kv, draft_probs, token history, token
        masks)."""
        _, dparams, dkv = self._draft_args()
        return (runner.params, runner.kv, None if greedy else runner.penalty_state,
                runner.slot_table, runner._prev_tokens, joint, dparams, dkv,
                None if greedy else self.draft_probs, self.hist,
                None if greedy else runner.logit_state.device)

    def _keep(self, runner: Runner, outs: tuple) -> tuple:
        """Store the donated state an executable returned (the previous-step output too) -> its
        other outputs."""
        runner.kv, pen, runner.slot_table, runner._prev_tokens = outs[:4]
        if pen is not None:
            runner.penalty_state = pen
        if self.draft is not None:
            self.draft.kv = outs[8]
        if outs[9] is not None:
            self.draft_probs = outs[9]
        if outs[10] is not None:
            self.hist = outs[10]
        return outs[4:8]

    def _lower(self, runner: Runner, variant: tuple[int, bool]) -> Any:
        t, greedy = variant
        layout = runner.layout(t)
        dcfg, dparams, dkv = self._draft_args()
        fn = functools.partial(spec_step, runner.config.model, layout, runner._num_out,
                               self.num_spec, greedy, runner.mesh, dcfg, self.lookup)
        rep = runner._replicated
        ibuf, _, _ = layout.new_buffers()
        args = self._args(runner, greedy, jax.device_put(layout.joint(ibuf), rep))
        kv_sh = jax.tree.map(lambda a: a.sharding, runner.kv)
        dkv_sh = None if dkv is None else jax.tree.map(lambda a: a.sharding, dkv)
        dp_sh = None if args[8] is None else rep
        hist_sh = None if self.hist is None else rep
        gen = None if greedy else rep   # penalty state and logprobs: general variants only
        return jax.jit(fn, donate_argnums=(1, 2, 3, 4, 7, 8, 9),
                       out_shardings=(kv_sh, gen, rep, rep, rep, gen, gen, gen, dkv_sh, dp_sh, hist_sh)
                       ).lower(*args)

    def compile(self, runner: Runner, say: Callable[[str], None], threads: int) -> None:
        """Compile every speculative variant (``threads`` at once); the pools may be abstract."""
        t0 = time.perf_counter()
        variants = self.variants(runner)
        say(f"compiling {len(variants)} speculative step variants (k = {self.num_spec})")

        def done(i: int, compiled: Any, count: int) -> None:
            v = variants[i]
            self._compiled[v] = compiled
            say(f"compiled speculative step {count}/{len(variants)} (tokens {v[0]}, "
                f"{'greedy' if v[1] else 'general sampler'}) at {time.perf_counter() - t0:.1f} s")

        runner.compile_programs([(v[0], functools.partial(self._lower, runner, v)) for v in variants],
                                threads, done, [f"verify {v}" for v in variants])
        if self.draft is not None and self.pauses:   # the draft's catch-up, one per bucket
            buckets = runner.config.scheduler.token_buckets
            compiled = runner.compile_programs(
                [(t, functools.partial(self._lower_catch_up, runner, t)) for t in buckets], threads,
                names=[f"draft catch-up {t}" for t in buckets])
            self._catch_up = dict(zip(buckets, compiled, strict=True))
            say(f"compiled {len(buckets)} draft catch-up programs at {time.perf_counter() - t0:.1f} s")

    def warm(self, runner: Runner) -> None:
        """Run each compiled speculative variant once over the allocated pools."""
        for v in self.variants(runner):
            layout = runner.layout(v[0])
            joint = jax.device_put(layout.joint(layout.new_buffers()[0]), runner._replicated)
            self._keep(runner, self._compiled[v](*self._args(runner, v[1], joint)))
        for t in self._catch_up:
            layout = runner.layout(t)
            self.catch_up(runner, layout, jax.device_put(layout.joint(layout.new_buffers()[0]),
                                                         runner._replicated))
        if self.draft is not None:
            self.draft.kv = self.mover.warmup(self.draft.kv)
        if self._hist_writer is not None:   # each history write once (zeros into row 0)
            self._hist_writer.compile(self.hist)
            for b in self._hist_writer.buckets:
                self.hist = self._hist_writer(self.hist, [(0, [0] * b)])

    def dispatch(self, runner: Runner, out: SchedulerOutput, layout: StepLayout, params: list,
                 joint: Any, masked: bool = False) -> SpecStepHandle:
        """Run a packed step with draft rows (``joint``: its input, as ``Runner._joint`` gives
        it: the host array itself in a single process); ``masked``: some row samples under a
        token mask / logit bias (the general variant applies it)."""
        t = layout.num_tokens
        greedy = (t in self._greedy_buckets and not masked
                  and all(c.num_tokens <= self.num_spec + 1 for c in out.chunks)
                  and greedy_rows(p for c, p in zip(out.chunks, params, strict=True) if c.samples))
        runner.logit_state.flush()
        host, lp, top_ids, top_lp = self._keep(
            runner, self._compiled[(t, greedy)](*self._args(runner, greedy, joint)))
        runner._prev_rows = {c.req_id: r for r, c in enumerate(out.chunks) if c.samples}
        top_n = tuple((p.logprobs or 0) if c.samples else 0
                      for c, p in zip(out.chunks, params, strict=True))
        want = any(c.samples and p.logprobs is not None for c, p in zip(out.chunks, params, strict=True))
        logprobs = (lp, top_ids, top_lp) if want else None
        for a in (host, *(logprobs or ())):
            a.copy_to_host_async()
        return SpecStepHandle(out, host, self.num_spec, logprobs, top_n, self.draft is not None)
