"""Runner: turns a SchedulerOutput (values) into one dispatched device step; results come later.

Where it sits: between ``Scheduler.schedule()`` and ``Scheduler.update()``, in the overlapped
loop (``LLMEngine.step``)::

    SchedulerOutput N+1 --RequestRows (per-request state: page rows, sampling params)-->
      [SlotWriter: whole rows of slots taken this step -> slot table]
      pack two flat buffers (StepLayout) --> compiled step(params, kv [donated], penalty
      state [donated], slot table [donated], tokens of step N [device, donated], both buffers
      as one host array)
      = model + sampler in one executable -> (kv, penalty state, slot table, tokens of step
      N+1 [in place], the same tokens for the host, logprobs, top-N [in place, in one of two
      donated slots: jserve/host_outputs.py])
      --copy_to_host_async--> StepHandle
    StepHandle N .result() -> RunnerOutput N   (the host waits only here, one step late)

The tokens of step N feed step N+1 on the device: a row over a placeholder takes its input
token from step N's output (``prev_index``), so no host round trip sits on the critical path.

Shapes are bucketed (DESIGN invariant 4): the token count pads to a power-of-two bucket and
the rows to that bucket's row count; ``compile()`` compiles every variant ahead of time (on GPU
each token bucket's first one alone, for the autotuner, then the rest on threads; through the
persistent cache) and the runner calls the compiled executables directly, so serving never
compiles. Buckets of at least ``flash_prefill_min_tokens`` also have a ``fresh_prefill`` variant
(flash attention over the chunk's own K/V), picked on the host for steps whose chunks all start
at token 0.

Slot table (``slot_table``): each slot's page-table row and sampling parameters live on the
device; the step buffer carries each row's slot and the page-table entries changed since the
last step, and the step applies them and gathers its rows, so packing is independent of the
pages per sequence.

Penalties: the per-slot token statistics live on the device (``penalty_state``): the general
variants take them donated, penalize the rows that use penalties and count the tokens they
sample, so penalty rows run over placeholders like any other. A request that uses penalties
gets its slot's row written from its prompt (and outputs) once, when it takes the slot
(``SlotInit``, a separate small executable). Steps with penalty rows take the general variant:
the greedy one (no control flow) stays exactly what it was for the common greedy decode.
Page moves (copy-on-write, swap, host tier: ``SchedulerOutput.transfers``) run just before
the step (``KVPageMover``).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jserve.burst_step import burst_step
from jserve.compile_pool import (
    COMPILE_THREADS,
    compile_in_order,
    cublas_min_tokens,
    steps_peak_bytes,
)
from jserve.config import EngineConfig
from jserve.executable_cache import ExecutableCache
from jserve.host_kv import host_slot_counts
from jserve.host_outputs import HostOutputStep, host_buffers, wrap_step
from jserve.kv_cache import KVCache
from jserve.kv_transfer import KVPageMover
from jserve.penalty_state import SlotInit, state_bytes
from jserve.runner_state import RequestRows
from jserve.scheduler_output import SchedulerOutput
from jserve.slot_table import FSM, SlotWriter, fill_page_diffs
from jserve.spec import chain
from jserve.spec.draft import DraftModel
from jserve.spec.verify_step import SpecStepHandle, SpecSteps
from jserve.split_step import SplitPending, SplitPrograms, lower_pair
from jserve.staged_input import StagedInputs
from jserve.step_buffers import StepLayout
from jserve.step_handle import StepHandle
from jserve.step_program import StepVariant, fused_step
from jserve.step_variants import StepVariants, greedy_rows, sampling_filters
from jserve.structured.automaton_pool import AutomatonPool, device_states
from jserve.structured.automaton_step import StepMasks
from jserve.structured.logit_state import LogitState
from jserve.warm_up import warm_runner
from sharding import host_to_global

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


class Runner:
    """Owns the params, the KV pool, the per-request rows (host, mirrored on the device by the
    slot table), the penalty state (device) and the compiled steps."""

    def __init__(self, config: EngineConfig, params: Any, kv: KVCache, mesh: Mesh,
                 draft: DraftModel | None = None) -> None:
        """``draft``: speculative decoding's draft model with its pool (jserve/spec/draft.py)."""
        self.config = config
        self.params = params
        self.kv = kv
        self.mesh = mesh
        self.platform: str = mesh.devices.flat[0].platform   # "cpu", "gpu" or "tpu"
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._one_process = self._replicated.is_fully_addressable   # (else inputs go global)
        sched = config.scheduler
        self._buckets = sched.token_buckets
        self._pages_per_seq = config.pages_per_seq
        self._page_size = config.cache.page_size
        self._num_out = max(sched.seq_bucket(t) for t in self._buckets)
        spec = config.speculative   # (a speculating engine's previous output: spec/chain.py)
        self._num_spec = spec.num_speculative_tokens if spec is not None else 0
        self.steps = StepVariants(sched, config.pipelined_bursts)   # (jserve/step_variants.py)
        self.rows = RequestRows(sched.max_num_seqs, self._pages_per_seq, config.model.vocab_size)
        self._compiled: dict[StepVariant, Any] = {}
        self.compile_timings: dict[str, float] = {}   # compile_pool.compile_in_order's
        self.steps_peak = 0   # bytes: the compiled step variants' activation peak (``compile``)
        self.executables: ExecutableCache | None = None   # the builder's (jserve/executable_cache.py)
        self._layouts: dict[int, StepLayout] = {}
        self._slot_init = SlotInit(sched.max_num_seqs, config.model.vocab_size, sched.max_model_len,
                                   self._replicated)
        self.penalty_state = self._slot_init.zeros()  # int32[max_num_seqs, V], see penalty_state
        log.info("penalty state: %d slots x %d tokens = %.1f MB per device", sched.max_num_seqs,
                 config.model.vocab_size, state_bytes(sched.max_num_seqs, config.model.vocab_size) / 1e6)
        self.logit_state = LogitState(sched.max_num_seqs, config.model.vocab_size, self._replicated,
                                      1 + spec.num_speculative_tokens if spec else 1)
        states = device_states(config, jax.process_count())
        self.automata = AutomatonPool(states, config.model.vocab_size, self._replicated) if states else None
        self._slot_writer = SlotWriter(sched.max_num_seqs, self.rows.table.shape[1], self._replicated,
                                       keep=self._pages_per_seq + FSM)
        self.slot_table = self._slot_writer.zeros()  # int32[max_num_seqs + 1, W], see slot_table
        prev = chain.prev_size(self._num_out, self._num_spec) if self._num_spec else self._num_out
        self._prev_tokens = jax.device_put(np.zeros(prev, np.int32), self._replicated)
        self._prev_rows: dict[str, int] = {}
        # Inputs copied into fixed device buffers (``staged_input.stage_inputs``, a benchmark
        # A/B); None: host arrays.
        self.staged_inputs: StagedInputs | None = None
        self.mover = KVPageMover(kv, max(self._pages_per_seq, sched.max_num_seqs),
                                 host_slot_counts(config))
        # Speculative decoding: the draft-verifying variants (jserve/spec/verify_step.py).
        self.spec_steps = None
        if spec is not None:
            lookup = (spec.prompt_lookup_min, spec.prompt_lookup_max) if spec.method == "ngram" else None
            self.spec_steps = SpecSteps(self, spec.num_speculative_tokens, draft, lookup,
                                        pauses=spec.disable_by_batch_size is not None)
        # Host-masked rows: forward and sampler as two programs, compiled on first use.
        self.split = SplitPrograms(
            [t for t in self._buckets if t in self.steps.decode and not sched.flash_prefill(t)],
            self.lower_split, lambda t: self.layout(t).int_size + self.layout(t).float_size,
            self._replicated)

    # ---------------------------------------------------------------- shapes
    def bucket_for(self, num_tokens: int) -> tuple[int, int]:
        """-> (token bucket T, row bucket R) for a step of ``num_tokens`` tokens."""
        t = self.steps.smallest(num_tokens)
        return t, self.config.scheduler.seq_bucket(t)

    def layout(self, token_bucket: int) -> StepLayout:
        """The buffer layout of a token bucket (one object per bucket: its tables are cached)."""
        lay = self._layouts.get(token_bucket)
        if lay is None:
            lay = self._layouts[token_bucket] = StepLayout(
                token_bucket, self.config.scheduler.seq_bucket(token_bucket), self._pages_per_seq,
                self._page_size)
        return lay

    def variants(self) -> list[StepVariant]:
        """Every compiled step program (``StepVariants.all``; none when a draft model runs in
        every step: only the speculative variants)."""
        if self.spec_steps is not None and self.spec_steps.every_step:
            return []
        return self.steps.all()

    # ---------------------------------------------------------------- host packing
    def pack(self, out: SchedulerOutput
             ) -> tuple[StepLayout, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Apply the plan's diffs to the request rows and pack the step's two buffers (host).
        -> (layout, int32 buffer, float32 buffer, slot of each row, slots whose whole row the
        ``SlotWriter`` must write before the step: new requests and diff-list overflows)."""
        self.rows.drop(out.dropped)
        chunks = out.chunks
        n = len(chunks)
        r_bucket = self.config.scheduler.seq_bucket(self.steps.smallest(out.num_tokens))
        if n > r_bucket:   # (a bucket moved up for filters has at least as many rows)
            raise ValueError(f"{n} rows exceed the row bucket {r_bucket}")
        rows = self.rows
        slots = np.fromiter((rows.apply(c) for c in chunks), np.int64, n)
        samples = np.fromiter((c.samples for c in chunks), bool, n)
        s = slots[samples]
        layout = self.layout(self.steps.bucket(out.num_tokens, lambda: bool(rows.filtered[s].any()),
                                               out.burst))
        ibuf, fbuf, f = layout.new_buffers()
        f["row_slot"][:n] = slots
        writes = fill_page_diffs(chunks, slots, f["pt_diff"])
        ns = np.fromiter((c.num_tokens for c in chunks), np.int32, n)
        starts = np.fromiter((c.start for c in chunks), np.int32, n)
        ends = np.cumsum(ns, dtype=np.int32)
        total = int(ends[-1])
        qsl = f["query_start_loc"]
        qsl[1:n + 1] = ends
        qsl[n + 1:] = total
        tok_row = np.repeat(np.arange(n), ns)
        pos = starts[tok_row] + np.arange(total, dtype=np.int32) - (ends - ns)[tok_row]
        f["positions"][:total] = pos
        ps = self._page_size
        f["slot_mapping"][:total] = rows.page_table[slots[tok_row], pos // ps] * ps + pos % ps
        ids = f["token_ids"]
        prev_rows = self._prev_rows
        # One pass over the rows in Python (locals and lists; numpy takes the gathered values
        # at once): a decode row over a placeholder has no token ids, only its feed index.
        fed_at, fed_from, new_rows, banned_rows, chained = [], [], [], [], []
        end_list = ends.tolist()
        for r, (c, end) in enumerate(zip(chunks, end_list, strict=True)):
            tids = c.token_ids
            if tids:
                a = end - c.num_tokens
                ids[a:a + len(tids)] = tids
            if c.num_placeholders:
                src = prev_rows.get(c.req_id)
                if c.num_placeholders != 1 or src is None:
                    raise ValueError(f"request {c.req_id!r}: a placeholder row with no sampled row "
                                     "for it in the step in flight")
                fed_at.append(end - 1 - (c.num_draft if c.device_drafts else 0))
                fed_from.append(src)
                if c.device_drafts or c.shifted:
                    chained.append((r, src))
            if c.new is not None:
                new_rows.append(r)
            if c.banned_ids:
                banned_rows.append(r)
        if fed_at:
            f["prev_index"][fed_at] = fed_from
        if chained:   # speculative rows planned while the step feeding them was in flight
            chain.pack_chained(f, chunks, end_list, chained, self._num_out, self.spec_steps.num_spec)
        f["seq_lens"][:n] = starts + ns
        f["num_seqs"][0] = n
        f["logits_indices"][:n] = ends - 1
        f["samples"][:n] = samples
        pen = rows.uses_penalties[s]
        if pen.any():
            r_pen, s_pen = np.flatnonzero(samples)[pen], s[pen]
            f["pen_slot"][r_pen] = s_pen
            f["repetition_penalty"][r_pen] = rows.repetition_penalty[s_pen]
            f["presence_penalty"][r_pen] = rows.presence_penalty[s_pen]
            f["frequency_penalty"][r_pen] = rows.frequency_penalty[s_pen]
        f["output_index"][:n] = np.fromiter((c.output_index for c in chunks), np.int32, n)
        if out.has_drafts:
            f["num_draft"][:n] = np.fromiter((c.num_draft for c in chunks), np.int32, n)
        lstate = self.logit_state
        for r in new_rows:   # static constraints first: a sampling row's mask slot reads them
            lstate.on_new(int(slots[r]), chunks[r].new.params)
        masks = out.token_masks
        dyn_rows: list[int] = []   # rows with one host mask: queued as one block
        unmasked = samples         # sampling rows without a host mask: their static one or none
        if masks:
            unmasked = samples.copy()
            for r, c in enumerate(chunks):
                m = masks.get(c.req_id) if c.samples else None
                if m is None:
                    continue
                unmasked[r] = False
                if m.ndim == 2:    # a verify row: one mask per position
                    f["mask_slot"][r], f["mask_step"][r] = lstate.rows_for(int(slots[r]), list(m))
                else:
                    dyn_rows.append(r)
        if lstate.active.any():   # some slot has a static constraint (allowed ids, logit bias)
            mask_slot = f["mask_slot"]
            mask_slot[:n] = np.where(unmasked & lstate.active[slots], slots, mask_slot[:n])
        for r in banned_rows:
            ban = np.unique(np.asarray(chunks[r].banned_ids, np.int32))
            f["banned_ids"][r, :len(ban)] = ban
        if dyn_rows:
            f["mask_slot"][dyn_rows] = lstate.masked_rows(
                slots[dyn_rows], np.stack([masks[chunks[r].req_id] for r in dyn_rows]))
        if out.host_mask_rows is not None:   # (the split sampler's rows of its host masks)
            last = layout.num_rows - 1
            rows_of = out.host_mask_rows
            f["host_row"][:] = [rows_of.get(c.req_id, last) for c in chunks] + [last] * (last + 1 - n)
        return layout, ibuf, fbuf, slots, writes

    # ---------------------------------------------------------------- device
    def _speculative(self, out: SchedulerOutput) -> bool:
        """Whether the plan runs a speculative variant: draft or shifted rows (``moves_rows``),
        a draft model that never pauses, or speculation on (drafts made on the device)."""
        s = self.spec_steps
        return s is not None and (out.moves_rows or s.every_step or out.speculative)

    def dispatch(self, out: SchedulerOutput) -> StepHandle | SpecStepHandle | None:
        """Dispatch the step (page moves first); returns at once. None when there are no rows."""
        prep = self._prepare(out)
        if prep is None:
            return None
        layout, ibuf, fbuf, slots, params, fresh, masked = prep
        if self._speculative(out):
            return self.spec_steps.dispatch(self, out, layout, params, self._joint(layout, ibuf), masked)
        sampling = [p for c, p in zip(out.chunks, params, strict=True) if c.samples]
        variant = (self.steps.burst(out.burst, not masked and greedy_rows(sampling), layout.num_tokens)
                   if out.burst > 1 else   # N decode steps in one program (jserve/burst_step.py)
                   self.steps.choose(layout.num_tokens, fresh, masked,
                                     all(c.num_tokens == 1 for c in out.chunks), sampling,
                                     lambda: sampling_filters(out, self.rows)))
        greedy = variant.greedy
        step = self._compiled.get(variant)
        if step is None:
            raise RuntimeError(f"step variant {variant} was not compiled at warm-up")
        pen = None if greedy else self.penalty_state
        masks = self.step_masks(greedy)
        joint = self._joint(layout, ibuf)
        if self.spec_steps is not None and out.draft_catch_up:   # a pausing draft model's catch-up
            self.spec_steps.catch_up(self, layout, joint)
        self.kv, pen, self.slot_table, self._prev_tokens, tokens, lp, top_ids, top_lp = step(
            self.params, self.kv, pen, self.slot_table, self._prev_tokens, joint, masks)
        if pen is not None:
            self.penalty_state = pen
        self._prev_rows = {c.req_id: r for r, c in enumerate(out.chunks) if c.samples}
        handle = self._handle(out, params, tokens, lp, top_ids, top_lp)
        if isinstance(step, HostOutputStep):
            step.own(handle)   # (its buffers are donated again two calls on)
        return handle

    def step_masks(self, greedy: bool = False, flush: bool = True) -> StepMasks | None:
        """The masking state a step program reads (None: a greedy one), rows queued for it
        written first (``flush``)."""
        if flush:
            self.logit_state.flush()
            if self.automata is not None:
                self.automata.flush()
        return None if greedy else StepMasks(self.logit_state.device, self.automata and self.automata.device)

    def _prepare(self, out: SchedulerOutput) -> tuple | None:
        """A step's host work before its programs: page moves, packing, slot-table rows of new
        requests, penalty inits -> (layout, ibuf, fbuf, slots, params by row, fresh prefill,
        some row masked), or None when there are no rows."""
        if out.transfers:
            self.kv = self.mover.move(self.kv, out.transfers)
            if self.spec_steps is not None:
                self.spec_steps.move(out.transfers)
        if not out.chunks:
            self.rows.drop(out.dropped)
            return None
        layout, ibuf, fbuf, slots, writes = self.pack(out)
        if len(writes):
            self.slot_table = self._slot_writer(self.slot_table, writes, self.rows.table[writes])
            self.rows.fsm[writes] = -1   # written: the device advances it from here
        histories = []   # n-gram: the token histories of slots taken or resuming speculation
        for c, s in zip(out.chunks, slots, strict=True):
            if c.new is not None and c.new.history is not None:  # takes the slot: its own counts
                h, n = c.new.history, c.new.num_prompt
                if c.new.params.uses_penalties:
                    self.penalty_state = self._slot_init(self.penalty_state, int(s), h[:n], h[n:])
                histories.append((int(s), h))
            elif c.history is not None:
                histories.append((int(s), c.history))
        if histories and self.spec_steps is not None:
            self.spec_steps.write_histories(histories)
        fresh = (self.config.scheduler.flash_prefill(layout.num_tokens)
                 and all(c.start == 0 for c in out.chunks))
        params = [self.rows.params[s] for s in slots]
        masked = bool((layout.read(ibuf, "mask_slot") >= 0).any()) or bool(self.rows.automaton[slots].any())
        return layout, ibuf, fbuf, slots, params, fresh, masked

    def _joint(self, layout: StepLayout, ibuf: np.ndarray) -> np.ndarray | jax.Array:
        """The step's one input array. A single process hands the host buffer to the executable
        as it is: its own argument transfer costs the host less than a device_put before the
        call (RESULTS_v2_sessions_5-8.md, session 6)."""
        joint = layout.joint(ibuf)
        if not self._one_process:
            return host_to_global(joint, self._replicated)
        return joint if self.staged_inputs is None else self.staged_inputs.put(joint)

    def _handle(self, out: SchedulerOutput, params: list, tokens: jax.Array, lp: jax.Array | None,
                top_ids: jax.Array | None, top_lp: jax.Array | None) -> StepHandle:
        """Start the step's outputs on their way to the host -> its handle."""
        top_n = tuple((p.logprobs or 0) if c.samples else 0 for c, p in zip(out.chunks, params, strict=True))
        want = any(c.samples and p.logprobs is not None for c, p in zip(out.chunks, params, strict=True))
        logprobs = (lp, top_ids, top_lp) if want else None
        if self.platform != "cpu":   # (a CPU's arrays are host memory; there the copy pins
            for a in (tokens, *(logprobs or ())):   # them: they could not be donated again)
                a.copy_to_host_async()
        return StepHandle(out, tokens, logprobs, top_n)

    # ---------------------------------------------------------------- split step
    def compile_split(self, threads: int = 1) -> None:
        """Compile the split step's programs (once, ``threads`` at a time; jserve/split_step.py)."""
        self.split.compile(threads, self.platform == "gpu", cublas_min_tokens(self.config.model.hidden_size))

    def split_wanted(self) -> bool:
        """Whether warm-up compiles the split step: on a GPU or TPU with the overlapped loop
        (there the forward runs on the device while the host fills masks; on CPU both share the
        cores, measured: no gain) and not when a draft model runs in every step."""
        sched = self.config.scheduler
        return (self.platform in ("gpu", "tpu") and sched.async_scheduling
                and not (self.spec_steps is not None and self.spec_steps.every_step))

    def can_split(self, out: SchedulerOutput) -> bool:
        """Whether this plan can run as forward, then sampler (its bucket's split programs are
        compiled; no draft rows, no flash prefill, no top-k / top-p / min-p rows)."""
        if not out.chunks or self._speculative(out):
            return False
        if sampling_filters(out, self.rows):   # the split's sampler is the plain one
            return False
        t, _ = self.bucket_for(out.num_tokens)
        return self.split.ready(t) and not (self.config.scheduler.flash_prefill(t)
                                            and all(c.start == 0 for c in out.chunks))

    def dispatch_forward(self, out: SchedulerOutput) -> SplitPending:
        """The split step's first half (``can_split`` holds): the host work and the forward,
        whose placeholders read the step in flight's tokens on the device; returns at once."""
        pending = self.prepare_forward(out)
        self.launch_forward(pending)
        return pending

    def prepare_forward(self, out: SchedulerOutput) -> SplitPending:
        """``dispatch_forward``'s host work (page moves, packing, new slots, the packed input
        staged on the device), not yet launched."""
        layout, ibuf, _, slots, params, _, _ = self._prepare(out)
        joint = self._joint(layout, ibuf)
        if isinstance(joint, np.ndarray):   # into its bucket's fixed buffer (jserve/split_step.py)
            joint = self.split.stage_joint(joint)
        return SplitPending(out, layout, joint, slots, params, None,
                            np.full((layout.num_rows, self.logit_state.words), -1, np.int32),
                            {c.req_id: r for r, c in enumerate(out.chunks) if c.samples})

    def lower_split(self, token_bucket: int) -> tuple[Any, Any]:
        """Lower a bucket's split pair -> (forward, sampler) lowered (``split_step.lower_pair``)."""
        return lower_pair(self, token_bucket)

    def launch_forward(self, pending: SplitPending) -> None:
        """Launch a prepared forward. Touches neither the logit state nor the pending's host
        masks, so the grammar may fill them on another thread meanwhile."""
        fwd, _ = self.split.programs(pending.layout.num_tokens)
        if self.spec_steps is not None and pending.sched_out.draft_catch_up:
            self.spec_steps.catch_up(self, pending.layout, pending.joint)
        self.kv, self.slot_table, pending.logits = fwd(self.params, self.kv, self.slot_table,
                                                       self._prev_tokens, pending.joint)
        self._prev_rows = pending.sample_rows   # (read only: the grammar thread reads it too)

    def upload_masks(self, pending: SplitPending) -> None:
        """Put the pending step's filled host masks on the device (the grammar thread does,
        beside the forward's launch; else ``dispatch_sample``)."""
        pending.device_masks = self.put_masks(pending.host_masks)

    def put_masks(self, host: np.ndarray) -> jax.Array:
        """Host masks int32[R, W] on the device, for the split step's sampler."""
        return jax.device_put(host, self._replicated)

    def dispatch_sample(self, pending: SplitPending, token_masks: dict[str, np.ndarray] | None) -> StepHandle:
        """The split step's second half: the sampler, after ``pending.stage(token_masks)``
        and ``upload_masks`` (None: the masks are in ``pending.host_masks`` already, uploaded
        or not)."""
        if token_masks is not None:
            pending.stage(token_masks)
            pending.device_masks = None
        if pending.device_masks is None:
            self.upload_masks(pending)
        masks = self.step_masks()   # (static rows of requests new in this step written first)
        _, smp = self.split.programs(pending.layout.num_tokens)
        self.penalty_state, self.slot_table, self._prev_tokens, tokens, lp, top_ids, top_lp = smp(
            pending.logits, self.penalty_state, self.slot_table, self._prev_tokens, pending.joint,
            masks, pending.device_masks)
        self.split.steps += 1
        return self._handle(pending.sched_out, pending.params, tokens, lp, top_ids, top_lp)

    # ---------------------------------------------------------------- start-up
    def lower_step(self, variant: StepVariant, host_out: bool = True) -> Any:
        """``variant``'s step program, lowered over the pool's shapes (``host_out`` False: a
        plain variant's program before session 58, fresh host-facing outputs, for A/Bs)."""
        variant = StepVariant(*variant)
        greedy = variant.greedy
        layout = self.layout(variant.tokens)
        fn = (functools.partial(burst_step, self.config.model, layout, self._num_out, variant, self.mesh)
              if variant.burst > 1 else
              functools.partial(fused_step, self.config.model, layout, self._num_out, self._num_spec,
                                variant, self.mesh))
        rep = self._replicated
        ibuf, _, _ = layout.new_buffers()
        pen = None if greedy else self.penalty_state
        args = (self.params, self.kv, pen, self.slot_table, self._prev_tokens,
                jax.device_put(layout.joint(ibuf), rep), self.step_masks(greedy, flush=False))
        if variant.burst == 1 and host_out:   # host-facing outputs' buffers, donated (host_outputs.py)
            args += (self.host_buffers(variant),)
        kv_sh = jax.tree.map(lambda a: a.sharding, self.kv)   # (k, v[, k_scales, v_scales]) per layer
        # Every buffer the step reads and writes across calls keeps its address (donated and
        # aliased: kv, penalty state, slot table, prev tokens), so XLA's command buffer (CUDA
        # graph) is not re-recorded for them on each call (RESULTS_v2_sessions_5-8.md, session 6).
        no_logprobs = greedy or variant.burst > 1   # (a burst's rows ask none)
        return jax.jit(fn, donate_argnums=(1, 2, 3, 4) + ((7,) if len(args) == 8 else ()),
                       out_shardings=(kv_sh, None if greedy else rep) + (rep,) * 3
                       + ((None,) * 3 if no_logprobs else (rep,) * 3)
                       ).lower(*args)

    def host_buffers(self, variant: StepVariant) -> tuple[jax.Array, ...]:
        """A plain variant's host-output buffers (``host_outputs.host_buffers``)."""
        return host_buffers(self._prev_tokens.shape, self.layout(variant.tokens).num_rows, variant.greedy,
                            self._replicated)

    def wrap_compiled(self, variant: StepVariant, compiled: Any) -> Any:
        """``variant``'s executable (``lower_step``, compiled) as the runner calls it: a burst's as
        it is, a plain variant's in a ``HostOutputStep`` (``host_outputs.wrap_step``)."""
        if variant.burst > 1:
            return compiled
        return wrap_step(compiled, variant.tokens, self.platform,
                         functools.partial(self.host_buffers, variant))

    def compile_threads(self) -> int:
        """Threads that compile programs at once (``compile_pool.compile_in_order``)."""
        return min(COMPILE_THREADS, os.cpu_count() or 1)

    def compile_programs(self, programs: list[tuple[int, Callable[[], Any]]], threads: int | None = None,
                         done: Callable[[int, Any, int], None] | None = None,
                         names: list[str] | None = None) -> list[Any]:
        """``compile_pool.compile_in_order`` on this runner's devices and threads; ``names``:
        the programs' names in ``self.executables`` (the builder's, or None)."""
        return compile_in_order(programs, threads or self.compile_threads(),
                                self.platform == "gpu", done, self.compile_timings,
                                cublas_min_tokens(self.config.model.hidden_size), self.executables, names)

    def compile(self, progress: Progress | None = None, threads: int | None = None) -> float:
        """Compile every step variant (speculative variants, the split step's pairs) ahead of
        time: lowered in turn, compiled on ``threads`` threads, through the persistent compilation
        cache (``self.executables``: loaded instead), warm-up's small programs beside. Needs only the
        pool's shapes: the builder compiles over ``abstract_kv_cache`` before it allocates the
        pool, so XLA's GPU autotuner has the memory the pool will take for its trial buffers
        (with the pool allocated to ``gpu_memory_utilization`` it ran out). ``progress`` gets one
        line per finished step. -> seconds taken."""
        t0 = time.perf_counter()
        variants = self.variants()
        say = progress or log.info
        total = len(variants)

        threads = threads or self.compile_threads()
        programs = [(v.tokens, functools.partial(self.lower_step, v)) for v in variants]
        names = [f"step {v}" for v in variants]
        split = self.split.buckets if self.split_wanted() else ()
        for t in split:   # the split step's (forward, sampler) pairs, lowered together
            pair = functools.cache(functools.partial(self.lower_split, t))
            programs += [(t, lambda pair=pair: pair()[0]), (t, lambda pair=pair: pair()[1])]
            names += [f"split forward {t}", f"split sampler {t}"]
        say(f"compiling {total} step variants on {threads} threads"
            + (f" (and the split step for token buckets {split})" if split else ""))
        count = 0

        def done(i: int, compiled: Any, _: int) -> None:
            nonlocal count
            if i >= total:
                return self.split.put(split[(i - total) // 2], (i - total) % 2, compiled)
            v, count = variants[i], count + 1
            self._compiled[v] = self.wrap_compiled(v, compiled)
            rows = self.config.scheduler.seq_bucket(v.tokens)
            say(f"compiled step {count}/{total} (tokens {v.tokens}, rows {rows}, {v.kind()}) at "
                f"{time.perf_counter() - t0:.1f} s")

        with ThreadPoolExecutor(max_workers=2) as side:   # warm-up's small programs, beside them
            jobs = [side.submit(self._slot_init.compile, self.penalty_state), side.submit(
                self._slot_writer.compile, self.slot_table), side.submit(self.logit_state.compile),
                *([side.submit(self.automata.compile)] if self.automata is not None else []),
                side.submit(self.mover.compile, self.kv)]
            compiled = self.compile_programs(programs, threads, done, names)
        self.steps_peak = steps_peak_bytes(compiled[:total], [self.split.programs(t) for t in split])
        for job in jobs:
            job.result()   # (their errors)
        if self.spec_steps is not None:
            self.spec_steps.compile(self, say, threads)
        elapsed = time.perf_counter() - t0
        log.info("compiled %d step variants (token buckets %s) in %.1f s (tracing and lowering %.1f s, "
                 "%d stored executables loaded)", total, self._buckets, elapsed,
                 self.compile_timings.get("lower_s", 0.0), self.executables.loaded if self.executables else 0)
        return elapsed

    def attach_pool(self, kv: KVCache, draft_kv: KVCache | None = None) -> None:
        """The allocated pool (and the draft model's) in place of the abstract one ``compile``
        ran over: same shapes, dtypes and shardings."""
        want = jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), self.kv)
        got = jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), kv)
        if want != got:
            raise ValueError("attach_pool: the pool's layout differs from the one compiled for")
        self.kv = kv
        if draft_kv is not None:
            self.spec_steps.draft.kv = draft_kv

    def warm(self) -> float:
        """Run each compiled step once over the allocated pool, then the small programs
        (``warm_up.warm_runner``). -> seconds taken."""
        return warm_runner(self)
