"""RequestRows: the runner's persistent per-request state, kept from step to step.

Where it sits: inside ``Runner.dispatch``. The scheduler sends diffs as plain values
(``ScheduledChunk``: new requests' sampling parameters, page-table changes from an index on,
``SchedulerOutput.dropped`` for requests it stopped running); this class applies them to one
slot per request and packs a step's rows with vectorised gathers, so the per-step cost is the
diff, not the whole state::

    slot s:  table[s] = page_table[s, :P] top_k seed want_logprobs temperature top_p min_p fsm
             repetition/presence/frequency penalty, uses_penalties  params
    step:    rows r -> slots[r]; page-table entries that changed -> the step's diff list

``table`` mirrors the device slot table (``jserve.slot_table``): the runner writes a slot's
whole row there when a request takes it and sends only page-table diffs after that. The
penalty statistics of a slot live on the device (``penalty_state``), not here.

The runner never sees a live ``Request``: a chunk for an id it does not hold without ``new``
data is a contract violation and raises.
"""

from __future__ import annotations

import numpy as np

from jserve.sampling_params import SamplingParams
from jserve.scheduler_output import ScheduledChunk
from jserve.slot_table import FSM, MIN_P, NUM_FIELDS, SEED, TEMP, TOP_K, TOP_P, WANT_LP


def uses_filters(p: SamplingParams) -> bool:
    """Whether a request samples with top-k, top-p or min-p (a greedy one ignores them)."""
    return not p.greedy and p.uses_filters


class RequestRows:
    """Slots for at most ``max_requests`` requests at once, ``pages_per_seq`` pages each."""

    def __init__(self, max_requests: int, pages_per_seq: int, vocab_size: int) -> None:
        self.max_requests = max_requests
        self.vocab_size = vocab_size
        # The host mirror of the device slot table (``jserve.slot_table``): one int32 row per
        # slot; the fields below are views of its columns.
        p = pages_per_seq
        self.table = np.zeros((max_requests, p + NUM_FIELDS), np.int32)
        self.page_table = self.table[:, :p]
        self.top_k = self.table[:, p + TOP_K]
        self.seed = self.table[:, p + SEED:p + SEED + 2].view(np.uint32)
        self.want_logprobs = self.table[:, p + WANT_LP]
        self.temperature = self.table[:, p + TEMP].view(np.float32)
        self.top_p = self.table[:, p + TOP_P].view(np.float32)
        self.min_p = self.table[:, p + MIN_P].view(np.float32)
        # The token-automaton column: state + 1 (0: none) when a request takes the slot, then
        # -1 once written (the device advances it; a later whole-row write keeps it).
        self.fsm = self.table[:, p + FSM]
        self.automaton = np.zeros(max_requests, bool)   # the slot's request has a device automaton
        self.repetition_penalty = np.ones(max_requests, np.float32)
        self.presence_penalty = np.zeros(max_requests, np.float32)
        self.frequency_penalty = np.zeros(max_requests, np.float32)
        self.uses_penalties = np.zeros(max_requests, bool)
        self.filtered = np.zeros(max_requests, bool)   # ``uses_filters`` of the slot's request
        self.params: list[SamplingParams | None] = [None] * max_requests
        self.seeds: list[int] = [0] * max_requests
        self._slot: dict[str, int] = {}
        self._free = list(range(max_requests - 1, -1, -1))

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._slot

    def slot_of(self, req_id: str) -> int | None:
        return self._slot.get(req_id)

    def drop(self, req_ids: list[str]) -> None:
        for rid in req_ids:
            s = self._slot.pop(rid, None)
            if s is not None:
                self.params[s] = None
                self._free.append(s)

    def apply(self, chunk: ScheduledChunk) -> int:
        """Apply one row's diff; -> the request's slot."""
        if chunk.new is not None:
            if chunk.req_id in self._slot:
                raise ValueError(f"request {chunk.req_id!r} is already held by the runner")
            if not self._free:
                raise ValueError(f"more than {self.max_requests} requests at once in the runner")
            s = self._slot[chunk.req_id] = self._free.pop()
            self.table[s] = 0
            self._set_params(s, chunk.new.params, chunk.new.seed)
            self.fsm[s] = chunk.new.fsm_state + 1
            self.automaton[s] = chunk.new.fsm_state >= 0
        else:
            s = self._slot.get(chunk.req_id)
            if s is None:
                raise ValueError(f"request {chunk.req_id!r}: a row without new-request data for an "
                                 "id the runner does not hold")
        if chunk.page_ids:
            self.page_table[s, chunk.page_start:chunk.page_start + len(chunk.page_ids)] = chunk.page_ids
        return s

    def _set_params(self, s: int, p: SamplingParams, seed: int) -> None:
        self.params[s] = p
        self.seeds[s] = seed
        greedy = p.greedy
        self.temperature[s] = 0.0 if greedy else p.temperature
        self.top_p[s] = 1.0 if greedy else p.top_p
        self.min_p[s] = 0.0 if greedy else p.min_p
        self.top_k[s] = 0 if greedy or p.top_k >= self.vocab_size else p.top_k
        v = int(seed) % (1 << 64)
        self.seed[s] = (v >> 32, v & 0xFFFFFFFF)
        self.want_logprobs[s] = p.logprobs is not None
        self.uses_penalties[s] = p.uses_penalties
        self.filtered[s] = uses_filters(p)
        self.repetition_penalty[s] = p.repetition_penalty
        self.presence_penalty[s] = p.presence_penalty
        self.frequency_penalty[s] = p.frequency_penalty
