"""Request: the host-side state of one sequence being generated.

Where it sits: created by the engine from a prompt + SamplingParams, owned by the scheduler
(waiting -> running -> finished, possibly preempted in between), its page list is the page
table row the runner packs into the step input.

Token accounting (the "no phases" invariant)::

    all_token_ids = prompt_token_ids + output_token_ids          (len = num_tokens)
    |<------------- num_computed_tokens ------------->|<-- to compute -->|
    each step schedules a chunk [num_computed_tokens, num_computed_tokens + k) and advances
    num_computed_tokens at once (the step is in flight); the chunk that reaches the end
    produces a sampled token, appended to output_token_ids when the step's result arrives.
    Until then it is a *placeholder* (``num_placeholders``): the overlapped loop may already
    schedule the next row over it, fed on the device from the in-flight step's output::

        prompt + outputs (known)          | placeholder |
        |<------ num_tokens ------------->|<-- 0 or 1 ->|
        |<------------ num_computed_tokens (incl. in-flight rows) ------------>|

    Speculative decoding in the overlapped loop: an in-flight verify row's k drafts are
    counted in ``num_computed_tokens`` and in ``spec_in_flight`` until its result says how
    many were accepted; a row scheduled meanwhile starts at ``num_computed_tokens -
    spec_in_flight`` (as if none were) and the device moves it by the accepted count
    (``jserve/spec/chain.py``).

KV state (kept by the ``KVCacheManager``): ``page_ids`` covers the computed tokens and the
chunk in flight; ``page_entries[i]`` is the prefix-cache identity of full page i (computed
pages only); ``swap_slots`` maps page index -> host swap slot while the request is swapped
out (it then holds no pages, and ``num_computed_tokens`` keeps counting what is in host
memory). ``fork_of``: for ``n`` > 1 the first sibling, whose prompt pages this one shares.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from jserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    """One sequence. ``n`` > 1 sampling is expanded by the engine into n Requests."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    seed: int = 0                 # resolved sampling seed (the engine draws one if None)
    arrival_time: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_placeholders: int = 0     # sampled tokens of in-flight steps not yet on the host
    # Drafts of in-flight verify rows, not yet accepted or rejected: ``num_computed_tokens``
    # counts them (an upper bound for pages); the next row starts ``spec_in_flight`` earlier.
    spec_in_flight: int = 0
    page_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # Per output token: (sampled logprob, [(token_id, logprob), ...]) when logprobs requested.
    output_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    cache_salt: str | None = None          # namespaces the prefix cache (no sharing across salts)
    priority: int = 0                      # admission order: lower first (vLLM's priority)
    fork_of: Request | None = field(default=None, repr=False)  # n > 1: shares this one's prompt pages
    num_cached_tokens: int | None = None   # prompt tokens not computed at first admission
    page_entries: list[Any] = field(default_factory=list, repr=False)  # CachedPage per full page
    swap_slots: dict[int, int] = field(default_factory=dict)  # page index -> swap slot (swapped out)
    spec_num_draft_tokens: int = 0      # speculative decoding: drafts verified for this request
    spec_num_accepted_tokens: int = 0   # ... and accepted
    # draft_model with disable_by_batch_size: admitted above that load, the request never
    # drafts; the draft model skips its tokens, and its pages are prefix-cached apart from
    # those that carry the draft's K/V (jserve/kv_manager.py ``_extra``).
    no_draft: bool = False
    # A grammar run on the device (jserve/structured/device_grammars.py): the token-automaton
    # state after the outputs on the host (a global id of the runner's table); -1: none.
    fsm_state: int = -1

    def __post_init__(self) -> None:
        # A copy: the caller's list must never alias our growing state.
        self.prompt_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def token_at(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]
