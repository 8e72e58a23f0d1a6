"""GrammarSteps: the engine loop's host-masked rows (grammars, bad words) around each step.

Where it sits: owned by ``LLMEngine`` (``engine.grammar``), between the scheduler, the
``ConstraintTracker`` (jserve/structured/constraints.py) and the runner. A host-masked row's
mask for step N+1 needs the token it sampled in step N, so the loop orders the work three ways:

- the step in flight still runs on the device (the device is the bottleneck): the split step
  (jserve/split_step.py) dispatches step N+1's forward, reads step N, fills the masks, then
  dispatches the sampler (``LLMEngine.step``);
- the step in flight is done already (the host is the bottleneck: small models, many grammar
  rows): the engine reads it first and ``ahead`` hands its tokens to the helper thread, which
  advances the grammars, fills every continuing request's next mask into a block in request
  order and puts the block on the device, while the engine thread plans step N+1, stages its
  input and launches its forward. When the plan's host-masked rows are all in the block
  (``covers``), the sampler reads each row's mask from its row of the block
  (``SchedulerOutput.host_mask_rows``). Else (a request's first token, drafts, a row bucket
  that moved) the masks are filled in row order beside the forward's launch
  (``forward_beside``), or before the fused step;
- no constrained request in flight: masks for the plan, then the fused step (``attach``).

    read N -+-> helper: advance(N) -> fill masks(N+1) -> device_put   (one thread, in order)
            +-> engine: schedule N+1 -> stage, launch forward N+1 -> join -> launch sampler N+1
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from jserve.request import Request, RequestStatus
from jserve.scheduler_output import SchedulerOutput
from jserve.split_step import SplitPending
from jserve.structured.constraints import ConstraintTracker

log = logging.getLogger(__name__)


@dataclass
class Ahead:
    """The helper thread's work on a read step's tokens (``GrammarSteps.ahead``)."""

    job: Future | None       # -> the ids of requests whose grammar ended (accepted or rejected)
    rows_of: dict[str, int]  # request id -> its row of the block
    rows: int                # the block's rows (the read step's row bucket; 0: no block)
    masks: Any = None        # the block int32[rows, W] on the device, once ``job`` is done


class GrammarSteps:
    """The host-masked rows' part of ``LLMEngine.step`` (see the module docstring)."""

    def __init__(self, constraints: ConstraintTracker, scheduler: Any, runner: Any) -> None:
        self.constraints = constraints
        self.scheduler = scheduler
        self.runner = runner
        self.thread: Any = None   # the helper's executor (started on first use; benchmarks swap it)
        self.ahead_steps = 0      # split steps sampled under masks put ahead (tests, benchmarks)
        # The loop's order (``LLMEngine._read_first``): the step in flight was found done when
        # read after the next forward; the grammar work's last seconds (advance and masks).
        self.read_first = False
        self.seconds = 0.0

    def pool(self) -> ThreadPoolExecutor:
        """The helper thread of the grammar work beside the engine's (started on first use)."""
        if self.thread is None:
            self.thread = ThreadPoolExecutor(1, thread_name_prefix="jserve-grammar")
        return self.thread

    def needs_tokens(self, handle: Any) -> bool:
        """Whether a step's tokens feed some host-masked row's next mask."""
        cons = self.constraints
        return bool(len(cons)) and any(c.samples and c.req_id in cons for c in handle.sched_out.chunks)

    def advance(self, reqs: list[Request]) -> list[str]:
        """Feed the updated requests' new tokens to their host-mask matchers -> the ids of
        requests whose grammar ended (accepted, or rejected a token). Touches no scheduler
        state: it may run on the helper thread while the engine plans."""
        cons = self.constraints
        live = {req.request_id: req for req in reqs if req.request_id in cons}
        ended = cons.advance_all([(rid, req.output_token_ids) for rid, req in live.items()])
        return [rid for rid in ended if not live[rid].is_finished]

    def end(self, ended: list[str]) -> None:
        """Finish the requests whose grammar ended (stopped, or aborted with the reason logged)."""
        for rid in ended:
            err = self.constraints.error(rid)
            if err is not None:
                log.warning("request %s: aborted, its grammar matcher failed on a sampled token "
                            "(a rejected token or a parser limit): %s", rid, err)
            self.scheduler.finish_request(rid, RequestStatus.FINISHED_ABORTED if err
                                          else RequestStatus.FINISHED_STOPPED)

    def attach(self, sched_out: SchedulerOutput, after_read: bool = False) -> None:
        """Allowed-token bitmasks of this plan's host-masked sampling rows. Their tokens are all
        on the host: either no step that sampled them is in flight, or (``after_read``) that
        step was read after this plan was made, so a placeholder's token is known."""
        cons = self.constraints
        rows, verify = cons.mask_rows(sched_out.chunks, self.scheduler.get_request, after_read)
        sched_out.token_masks = cons.masks(rows)
        if verify:
            sched_out.token_masks.update(cons.draft_masks(verify))

    # ---------------------------------------------------------------- the step read first
    def ahead(self, handle: Any, reqs: list[Request]) -> Ahead:
        """A read step (``handle``) and its updated requests -> the helper thread advancing
        their grammars and putting each unfinished one's next mask on the device, in request
        order, in a block of the read step's row bucket (begun now, before the plan). No block
        when the read step could not split (top-k rows, drafts, a prefill bucket): the next
        one most likely cannot either, and its masks would be filled twice."""
        cons = self.constraints
        live = [req for req in reqs if req.request_id in cons and not req.is_finished]
        rows = self.runner.bucket_for(handle.sched_out.num_tokens)[1]
        ahead = Ahead(None, {req.request_id: i for i, req in enumerate(live)}, rows)
        if len(live) > rows or not self.runner.can_split(handle.sched_out):
            live, ahead.rows = [], 0
        ahead.job = self.pool().submit(self._advance_and_put, ahead, reqs, live)
        return ahead

    def _advance_and_put(self, ahead: Ahead, reqs: list[Request], live: list[Request]) -> list[str]:
        """(Helper thread.) Advance, then fill the next masks of ``live`` (a grammar that ended
        allows EOS only; one that rejected a token, everything) and put them on the device."""
        t = time.perf_counter()
        ended = self.advance(reqs)
        if live:
            block = np.full((ahead.rows, self.constraints.words), -1, np.int32)
            self.constraints.masks([(r.request_id, r.output_token_ids) for r in live], block,
                                   range(len(live)))
            ahead.masks = self.runner.put_masks(block)
        self.seconds = time.perf_counter() - t
        return ended

    def covers(self, sched_out: SchedulerOutput, ahead: Ahead) -> bool:
        """Whether the plan runs as a split step whose sampler can take the masks put ahead:
        every host-masked sampling row's mask is in the block (no request new to the plan's
        rows, no drafts), the plan's row bucket is the block's, and a free sampling row has
        the block's last row, all ones (a block full of masks: no free sampling row)."""
        cons, rows_of = self.constraints, ahead.rows_of
        full = len(rows_of) == ahead.rows
        return (ahead.rows > 0 and self.runner.can_split(sched_out)
                and self.runner.bucket_for(sched_out.num_tokens)[1] == ahead.rows
                and all(not c.samples
                        or (c.req_id in rows_of and c.new is None and not c.num_draft)
                        or (c.req_id not in cons and not full)
                        for c in sched_out.chunks))

    def dispatch_read(self, sched_out: SchedulerOutput, ahead: Ahead) -> Any:
        """Dispatch the plan made while ``ahead`` ran -> the step's handle (None: no rows)."""
        runner = self.runner
        if sched_out.is_empty:
            self.end(ahead.job.result())
            return None
        if self.covers(sched_out, ahead):
            sched_out.host_mask_rows = ahead.rows_of
            try:
                pending = runner.dispatch_forward(sched_out)
            finally:   # (never a helper still at work when this returns or raises)
                ended = ahead.job.result()
            self.end(ended)
            pending.device_masks = ahead.masks
            self.ahead_steps += 1
            return runner.dispatch_sample(pending, None)
        if runner.can_split(sched_out):
            return runner.dispatch_sample(self.forward_beside(sched_out, ahead.job), None)
        self.end(ahead.job.result())
        self.attach(sched_out)
        return runner.dispatch(sched_out)

    def forward_beside(self, sched_out: SchedulerOutput, advanced: Future) -> SplitPending:
        """The split step when the step in flight was read before this plan was made and
        ``advanced`` is advancing the grammars with its tokens on the helper thread: prepare the
        forward, then on the helper thread fill this plan's masks into the pending step's host
        masks and put them on the device while this thread launches the forward (llguidance,
        the upload and the executable's launch release the GIL) -> the forward's
        ``SplitPending``, its masks on the device."""
        pending = self.runner.prepare_forward(sched_out)

        def masks() -> dict[str, np.ndarray]:   # (after ``advanced``: one thread, in order)
            rows = self.constraints.mask_rows(sched_out.chunks, self.scheduler.get_request,
                                              skip=frozenset(advanced.result()))[0]
            filled = self.constraints.masks(rows, pending.host_masks,
                                            [pending.sample_rows[rid] for rid, _ in rows])
            self.runner.upload_masks(pending)
            return filled

        job = self.pool().submit(masks)
        try:
            self.runner.launch_forward(pending)
        finally:
            filled = job.result()
        self.end(advanced.result())
        sched_out.token_masks = filled
        return pending
