"""The scheduler -> runner -> scheduler contract (plain values, host side).

Where it sits: ``Scheduler.schedule()`` returns a ``SchedulerOutput`` (plain values: request ids,
token ids, page ids; no live ``Request``); ``Runner.dispatch`` packs it into the device step
input; the step's ``RunnerOutput`` (sampled tokens per row, ragged) comes back one step later
(the loop overlaps) and ``Scheduler.update(sched_out, runner_out)`` consumes it.
Orchestration tests build ``RunnerOutput`` by hand, no model needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from jserve.sampling_params import SamplingParams


@dataclass
class KVTransfers:
    """Page moves the runner makes during the step, in this order, before the forward::

        1. to_host    gather device pages -> host slots   (swap-out, host-tier offload)
        2. copies     device page -> device page          (copy-on-write)
        3. from_host  host slots -> device pages          (swap-in, host-tier hit)
        4. forward    writes this step's K/V

    Reads come before writes, so a page freed and handed out again in the same schedule is
    read (gathered / copied) before anything overwrites it. Plain values: pages are device
    page ids, a host slot is (store name, slot) in one of the host stores (``"swap"``,
    ``"tier"``, jserve/host_kv.py); the runner keeps the host pages itself and puts a
    gathered page into its slot when the copy is dispatched; the bytes land while the step
    runs.
    """

    copies: list[tuple[int, int]] = field(default_factory=list)            # (src, dst) pages
    to_host: list[tuple[int, str, int]] = field(default_factory=list)      # (page, store, slot)
    from_host: list[tuple[str, int, int]] = field(default_factory=list)    # (store, slot, page)

    def __bool__(self) -> bool:
        return bool(self.copies or self.to_host or self.from_host)


@dataclass(frozen=True)
class NewRequestData:
    """What the runner keeps per request from its first row on (and again after a preemption,
    which drops the runner's state): plain values, never the live ``Request``.

    ``history``: only for requests that use penalties, or all with n-gram speculation: the
    prompt then the outputs generated so far (none in flight: a request takes a slot only with
    all its tokens on the host), ``history[:num_prompt]`` the prompt. The runner fills the
    slot's penalty state (``params.uses_penalties``) and token history (n-gram) from it once;
    later tokens are counted and recorded on the device by the steps that compute them.

    ``fsm_state``: the request's token-automaton state (a global id of the runner's
    ``AutomatonPool``, after every output so far) where its grammar runs on the device; -1: none.
    """

    req_id: str
    params: SamplingParams
    seed: int
    history: tuple[int, ...] | None = None
    num_prompt: int = 0
    fsm_state: int = -1


class ScheduledChunk(NamedTuple):
    """One row of the ragged step: ``num_tokens`` tokens of request ``req_id`` from ``start``.

    A value (a named tuple: the scheduler makes one per row per step, and a frozen dataclass's
    construction cost 2.2 us against 0.8, a third of ``schedule``'s time at 256 rows); the runner
    reads these fields and never the live ``Request``::

        positions   start ............................ start + num_tokens
        token_ids   |known on the host (this list)   |placeholder|   num_placeholders = 0 or 1
                                                      ^ the token the in-flight step samples for
                                                        this request: the runner takes it from
                                                        that step's device output (no host trip)
        page row    [.. unchanged ..][page_ids (from index page_start) ....]

    ``samples``: the row's sampled token is kept (the chunk reaches the end of the request's
    tokens). ``output_index``: which output token it samples (the seed's counter).
    ``banned_ids``: ids forbidden this step (``min_tokens``).
    ``num_draft``: speculative decoding: the row is ``[last token, d_1 .. d_k]``; it samples up
    to k + 1 tokens (the accepted drafts and one more) and the scheduler rolls back the
    rejected ones. The drafts are the last k of ``token_ids`` (the last token known too), or,
    with ``device_drafts``, the draft model's output of the in-flight step for this request
    (the last token is then its placeholder, the row's first token: ``[placeholder, d_1 .. d_k]``).
    ``shifted``: the request's row in the in-flight step verified drafts: this row's
    ``start`` (and ``output_index``) assume none were accepted, and the device adds the
    accepted count (``jserve/spec/chain.py``).
    ``history``: n-gram speculation resumes for a request whose earlier steps ran without it:
    its tokens on the host, for the slot's token history (``spec/token_history.py``).
    """

    req_id: str
    start: int
    num_tokens: int
    token_ids: tuple[int, ...]
    num_placeholders: int = 0
    page_start: int = 0
    page_ids: tuple[int, ...] = ()
    samples: bool = False
    output_index: int = 0
    banned_ids: tuple[int, ...] = ()
    new: NewRequestData | None = None
    num_draft: int = 0   # unverified drafts at the row's end (jserve/spec/)
    device_drafts: bool = False
    shifted: bool = False
    history: tuple[int, ...] | None = None


@dataclass
class SchedulerOutput:
    """One step's plan, as values: rows, the requests whose runner state is dropped, page moves."""

    chunks: list[ScheduledChunk] = field(default_factory=list)  # row order of the step
    dropped: list[str] = field(default_factory=list)  # finished / preempted since the last plan
    transfers: KVTransfers = field(default_factory=KVTransfers)  # page moves before the forward
    num_preempted: int = 0
    # Speculation is on this step (``Scheduler.spec_active``): with n-gram its rows run the
    # speculative variant, whose lookup drafts on the device for the next step.
    speculative: bool = False
    # Whether a step without speculation runs the draft model's catch-up (its forward over the
    # step's tokens): False when every row belongs to a request that never drafts
    # (``disable_by_batch_size``) and none is a prompt chunk.
    draft_catch_up: bool = True
    # Decode steps the plan runs in one program (``num_scheduler_steps``; 1: an ordinary step):
    # every row is a one-token decode row and samples ``burst`` tokens (jserve/burst_step.py).
    burst: int = 1
    # Host-computed allowed-token bitmasks (int32[ceil(V / 32)]) of sampling rows, by request id
    # (a grammar, bad words: ``jserve.structured``); filled by the engine before dispatch. A row
    # verifying k drafts has int32[k + 1, ceil(V / 32)]: one per position, along the drafts.
    token_masks: dict[str, np.ndarray] = field(default_factory=dict)
    # The split step's host masks put ahead in request order (jserve/grammar_steps.py):
    # request id -> its row of them; other rows take the last row (all ones, or a row that
    # does not sample when every row of them holds a mask). None: row order.
    host_mask_rows: dict[str, int] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_seqs(self) -> int:
        return len(self.chunks)

    @property
    def has_drafts(self) -> bool:
        """Some row verifies draft tokens (the speculative step variant runs it)."""
        return any(c.num_draft for c in self.chunks)

    @property
    def moves_rows(self) -> bool:
        """Some row verifies drafts, or starts where its request's in-flight verify row left it
        (``shifted``: moved on the device by that row's accepted count, jserve/spec/chain.py):
        only the speculative variants do either, with speculation on this step or not."""
        return any(c.num_draft or c.shifted for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        """Nothing for the runner: no rows, no page moves, no state to drop."""
        return not self.chunks and not self.transfers and not self.dropped


@dataclass
class RunnerOutput:
    """Per row of the step (same order as ``SchedulerOutput.chunks``); ragged, so a row can
    carry several tokens (speculative decoding accepts 1 + k per row).

    sampled_token_ids: one list of token ids per row (empty for rows that do not sample)
    logprobs:          per row, per token: logprob of the sampled token, or None
    top_ids / top_logprobs: per row, per token: the top-N alternatives, or None
    draft_token_ids:   speculative decoding with a draft model: per row, the K drafts it proposed
                       after this step's tokens (the next step's draft rows); a row that
                       accepted every draft proposes K - 1 and a last -1: a place the next row
                       verifies nothing at, where its draft forward puts its emitted token
    verified_drafts:   speculative decoding: per row, the drafts it verified (its ``num_draft``
                       less the device n-gram lookup's missing ones); None: ``num_draft``
    """

    sampled_token_ids: list[list[int]]
    logprobs: list[list[float]] | None = None
    top_ids: list[list[list[int]]] | None = None
    top_logprobs: list[list[list[float]]] | None = None
    draft_token_ids: list[list[int]] | None = None  # per row: the draft model's next drafts
    verified_drafts: list[int] | None = None
