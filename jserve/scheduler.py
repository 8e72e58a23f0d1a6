"""Scheduler: continuous batching, chunked prefill, prefix-cache hits, preemption (host side).

Where it sits: ``AsyncEngine.add_request`` -> ``Scheduler.waiting``; each step
``schedule()`` -> ``SchedulerOutput`` -> runner -> ``RunnerOutput`` -> ``update()`` -> detokenizer.
Pages come from the ``KVCacheManager`` (page pool, prefix cache, swap space); nothing here
touches the device.

No phases (DESIGN invariant 3): every request just catches ``num_computed_tokens`` up to
``num_tokens``. A prefill chunk, a decode token and (later) speculative tokens are all rows of
one ragged batch under a per-step token budget::

    step budget = max_num_batched_tokens, rows <= max_num_seqs
    running (arrival order)      A: decode 1 | B: decode 1 | C: prefill chunk 200 (of 900)
    waiting (fair, by priority)  D: prompt 50 -> admitted if rows, budget and pages allow
                                 E: ...       -> stop at the first whose turn it is that
                                                 doesn't fit (nobody overtakes it)

Admission order (jserve/fair_admission.py): preempted requests first, then by ``priority`` (lower
first), then fewest sequences of the same API request already running, then arrival: one
request's ``n`` = 128 sequences cannot starve a request that arrives after them.

Pages: a chunk ``[start, start + k)`` needs ``pages_needed(start + k)`` pages in
``req.page_ids``; the missing ones are allocated when the chunk is scheduled::

    req.page_ids   [ 7 ][ 3 ][ 12 ][ new ]      page_size = 4
    positions       0..3 4..7 8..11 12..15
                    |<- computed ->|<- chunk [10, 14) ->|

Pages, prefix-cache hits, copy-on-write and swap are the ``KVCacheManager``'s: the scheduler
asks it how many pool pages a chunk or an admission takes (``demand`` / ``plan_admission``)
and only then commits, so a step that does not fit changes nothing. A waiting request may
start at ``num_computed_tokens > 0`` (prefix-cache hit, shared prompt of an ``n`` > 1 sibling,
resume after swap); its first chunk is what is left, under the budget.

Preemption: when the pool can't cover a running request's chunk, the newest running request
(last in arrival order) gives up its pages and goes to the *front* of the waiting queue. In
swap mode its pages move to host memory and it resumes where it was; in recompute mode (or
when the swap space is full) it restarts at ``num_computed_tokens = 0`` (its outputs are
kept; cached full pages come back from the prefix cache). If the request being scheduled is
itself the newest, it is the one preempted and scheduling of this step stops there; no
waiting request is admitted in a step that preempted.

Lengths: ``max_model_len`` is capped at what the pool can hold (``pool.capacity_tokens``), so a
request alone always fits and the oldest running request always progresses (no livelock).

Overlap: ``schedule()`` advances ``num_computed_tokens`` as it plans (the step is then in flight)
and a row that samples leaves a placeholder; ``update()`` turns the placeholders of one step
into tokens. The engine may call ``schedule()`` for step N+1 before ``update()`` of step N: a
request whose token is in flight then gets a decode row over its placeholder, which the runner
feeds from step N's device output (with a draft model, a verify row over the drafts step N
made on the device, planned as if none of N's drafts were accepted: ``jserve/spec/chain.py``).
At most one step is in flight when ``schedule()`` runs::

    schedule(N) -> dispatch(N) -> schedule(N+1) -> dispatch(N+1) -> update(N) -> schedule(N+2) ...

Finishing one step late never leaks: a row whose request finished (EOS, stop, abort) by the
time its result arrives is dropped by ``update``; rows that would surely be wasted
(``max_tokens`` reached by the in-flight token) are not scheduled; prefix-cache pages are
indexed in ``update`` only over known tokens.
"""

from __future__ import annotations

import logging
from collections import Counter, deque

from jserve.config import SchedulerConfig
from jserve.fair_admission import api_request, fair_quantum, next_waiting
from jserve.kv_manager import KVCacheManager
from jserve.page_pool import PagePool
from jserve.request import Request, RequestStatus
from jserve.scheduler_output import NewRequestData, RunnerOutput, ScheduledChunk, SchedulerOutput
from jserve.spec.config import SpeculativeConfig
from jserve.spec.ngram import NgramProposer

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue already holds ``max_waiting`` requests (HTTP 429 upstream)."""


class Scheduler:
    """Decides, each step, which requests run and how many tokens each computes."""

    def __init__(self, config: SchedulerConfig, kv: PagePool | KVCacheManager,
                 spec: SpeculativeConfig | None = None) -> None:
        """``kv``: a ``KVCacheManager``, or a bare ``PagePool`` (no prefix cache, recompute);
        ``spec``: speculative decoding (n-gram drafts), or None."""
        self.config = config
        self.kv = kv if isinstance(kv, KVCacheManager) else KVCacheManager(kv)
        self.pool = pool = self.kv.pool
        self.max_model_len = min(config.max_model_len, pool.capacity_tokens)
        if self.max_model_len < config.max_model_len:
            logger.warning("max_model_len %d exceeds the KV pool (%d pages x %d tokens); sequences "
                           "are capped at %d tokens", config.max_model_len, pool.num_total,
                           pool.page_size, self.max_model_len)
        self.waiting: deque[Request] = deque()  # arrival order; preempted requests go to the front
        self._fair_quantum = fair_quantum(config.max_num_seqs)   # (jserve/fair_admission.py)
        self.num_preemptions_total, self.pipelined_bursts = 0, False   # (the engine sets it)
        self.running: list[Request] = []        # arrival order; the newest is last
        self._requests: dict[str, Request] = {}  # every unfinished request, waiting or running
        self._sent_pages: dict[str, list[int]] = {}  # page row the runner holds, per request
        self._dropped: list[str] = []               # runner state to drop at the next step
        self.spec = spec
        self._proposer = (NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
                          if spec is not None and spec.method == "ngram" else None)
        # draft_model: the drafts each step's result carries, per request: (num_tokens they
        # follow, drafts); the scheduler also reserves K lookahead positions for the draft.
        self._draft_mode = spec is not None and spec.method == "draft_model"
        # Either proposer drafts on the device too (the draft model; n-gram lookup over the
        # slot's token history, jserve/spec/token_history.py): a row planned while its request's
        # previous row is in flight verifies those drafts (chained rows). N-gram steps run the
        # speculative variant only while speculation is on (``_spec_last``), so a request
        # scheduled meanwhile has a stale history, sent again when speculation resumes.
        self._chained = spec is not None
        self._spec_last = self._spec_now = False
        self._stale_history: set[str] = set()
        self._next_drafts: dict[str, tuple[int, list[int]]] = {}
        # draft_model with disable_by_batch_size N: requests admitted while more than N were
        # queued or running never draft (``Request.no_draft``): the draft's catch-up skips
        # their rows, and their pages are prefix-cached apart.
        # Speculative decoding counters (monotonic): verify rows, drafts verified, accepted.
        self.spec_counters = dict(spec_decode_num_drafts=0, spec_decode_num_draft_tokens=0,
                                  spec_decode_num_accepted_tokens=0,
                                  spec_decode_num_emitted_tokens=0)

    # ------------------------------------------------------------- queries
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id (waiting or running), else None."""
        return self._requests.get(request_id)

    # ---------------------------------------------------------------- add
    def add_request(self, req: Request) -> None:
        """Queue a new request at the back of the waiting queue.

        Raises ``QueueFullError`` when ``max_waiting`` requests wait, ``ValueError`` when the
        prompt can never be served (too long for ``max_model_len`` or for the whole pool) or the
        request is not fresh.
        """
        if req.request_id in self._requests:
            raise ValueError(f"request id {req.request_id!r} is already scheduled")
        if req.status is not RequestStatus.WAITING or req.num_computed_tokens or req.page_ids:
            raise ValueError(f"request {req.request_id!r} is not a fresh waiting request "
                             f"(status {req.status.value}, {req.num_computed_tokens} computed tokens)")
        if req.num_prompt_tokens == 0:
            raise ValueError(f"request {req.request_id!r} has an empty prompt")
        if req.num_tokens > self.config.max_model_len:
            raise ValueError(f"request {req.request_id!r}: prompt length {req.num_tokens} exceeds "
                             f"max_model_len {self.config.max_model_len}")
        if req.num_tokens > self.max_model_len:
            raise ValueError(f"request {req.request_id!r}: prompt length {req.num_tokens} needs "
                             f"{self.pool.pages_needed(req.num_tokens)} KV pages, the pool has "
                             f"{self.pool.num_total} ({self.pool.capacity_tokens} tokens)")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.config.max_waiting} requests); "
                                 f"retry later")
        self.waiting.append(req)
        self._requests[req.request_id] = req

    # ----------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        """Pick this step's rows: running requests first (arrival order), then waiting (fair order).

        Advances ``num_computed_tokens`` of every scheduled request (the step is in flight) and
        adds a placeholder for each row that samples; ``update`` fills the placeholders in.
        """
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        kv, pool = self.kv, self.pool
        kv.begin_step()
        speculate = out.speculative = self._spec_now = self.spec_active()
        burst = out.burst = self._burst()
        catch_up = False   # a row of a request that may draft (below)

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if not self._schedulable(req):
                i += 1
                continue
            start = req.num_computed_tokens - req.spec_in_flight
            k = min(req.num_tokens + req.num_placeholders - start, budget)
            if k <= 0:
                raise AssertionError(f"running request {req.request_id!r} has nothing to compute "
                                     f"({start}/{req.num_tokens} tokens)")
            drafts = self._drafts(req, budget) if speculate else []
            nd = drafts if isinstance(drafts, int) else len(drafts)
            if nd and kv.demand(req, k + nd) > pool.num_free:
                drafts, nd = [], 0  # drafts never preempt anyone: verify them when pages are free
            k += nd
            need = kv.demand(req, k)   # again only after a preemption (it may unshare req's pages)
            if need:   # (most decode rows write into a page they hold)
                while need > pool.num_free and self.running[-1] is not req:
                    self._preempt(self.running.pop(), out)
                    need = kv.demand(req, k)
                if need > pool.num_free:  # req is the newest: it makes way itself
                    self._preempt(self.running.pop(), out)
                    break
            la = self._lookahead(req, k)   # (0 in a burst: no draft model then)
            kv.grow(req, k + la if la and kv.demand(req, k + la) <= pool.num_free else max(k, burst))
            out.chunks.append(self._chunk(req, k, drafts))
            catch_up = catch_up or not req.no_draft
            if burst > 1:   # the burst computes and samples ``burst`` tokens of the row
                req.num_computed_tokens += burst - 1
                req.num_placeholders += burst - 1
            budget -= k
            i += 1

        if not out.num_preempted and self.waiting and burst == 1:   # (a burst is decode rows only)
            per_group = Counter(api_request(r) for r in self.running)
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = next_waiting(self.waiting, per_group, self._fair_quantum)
                if req.num_placeholders:
                    break  # preempted with a token in flight: resumes once it has landed
                was = req.no_draft   # decided before the plan: it picks the prefix namespace
                if self._draft_mode and (self._busy(len(self.running) + len(self.waiting))
                                         or (req.fork_of is not None and req.fork_of.no_draft)):
                    req.no_draft = True
                plan = kv.plan_admission(req, budget)
                if plan is None or plan.pool_pages > pool.num_free:
                    req.no_draft = was
                    break  # nobody overtakes the request whose turn it is
                if req is self.waiting[0]:
                    self.waiting.popleft()
                else:
                    self.waiting.remove(req)
                per_group[api_request(req)] += 1
                kv.admit(req, plan)
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                out.chunks.append(self._chunk(req, plan.num_tokens))
                catch_up = catch_up or not req.no_draft
                budget -= plan.num_tokens
        out.transfers = kv.take_transfers()
        out.dropped, self._dropped = self._dropped, []  # a plan with drops is never empty
        self._spec_last = speculate
        out.draft_catch_up = catch_up   # (per row above: a scan of 256 rows after planning
        #                                 took ~47 us per step on the 2-core CI machine)
        return out

    def _burst(self) -> int:
        """Decode steps this plan runs in one program: ``num_scheduler_steps`` (N) when nothing
        waits or all ``max_num_seqs`` seats are taken, each row a one-token decode row,
        ``burstable``, past ``min_tokens``, N - N // 4 tokens left (a last burst may overshoot
        ``max_tokens``: ``update`` drops the extra tokens as after a stop), pages free, at most
        the smallest bucket's rows; else 1. ``pipelined_bursts``: any rows, waiting or not."""
        n, cfg, pp = self.config.num_scheduler_steps, self.config, self.pipelined_bursts
        if (n <= 1 or not self.running or len(self.running) > (cfg.max_num_seqs if pp else cfg.burst_rows)
                or (self.waiting and len(self.running) < cfg.max_num_seqs and not pp)):
            return 1
        need = 0
        for req in self.running:
            sp = req.sampling_params
            n_out = req.num_output_tokens + req.num_placeholders
            if (req.num_tokens + req.num_placeholders - req.num_computed_tokens != 1
                    or req.spec_in_flight or not sp.burstable or n_out < sp.min_tokens
                    or (sp.max_tokens is not None and sp.max_tokens - n_out < n - n // 4)
                    or req.num_tokens + req.num_placeholders + n > self.max_model_len):
                return 1
            need += self.kv.demand(req, n)
        return n if need <= self.pool.num_free else 1

    def _schedulable(self, req: Request) -> bool:
        """False while the row would be wasted: the in-flight token ends the request for sure
        (max_tokens / max_model_len); or, after an in-flight verify row, while the row could
        pass max_model_len if all its drafts were accepted, or while how many drafts the next
        row may take depends on how many of them are (it waits for the result: the overlapped
        loop then drafts as the synchronous one does, so seeded samples come out the same)."""
        if not req.num_placeholders:
            return True
        sp = req.sampling_params
        n_out = req.num_output_tokens + req.num_placeholders
        if ((sp.max_tokens is not None and n_out >= sp.max_tokens)
                or req.num_tokens + req.num_placeholders >= self.max_model_len
                or req.num_computed_tokens >= self.max_model_len):
            return False
        if not req.spec_in_flight:
            return True
        k, a = self.spec.num_speculative_tokens, req.spec_in_flight   # all accepted: a more tokens
        return (req.num_tokens + req.num_placeholders + a + k <= self.max_model_len
                and (sp.max_tokens is None or n_out + a + k < sp.max_tokens))

    def spec_active(self) -> bool:
        """Whether this step proposes drafts: speculation is configured, at most
        ``disable_by_batch_size`` requests run and one of them may draft (the engine drains the
        step in flight first: only requests with every token on the host get drafts)."""
        return ((self._proposer is not None or self._draft_mode) and bool(self.running)
                and not self._busy(len(self.running))
                and not all(r.no_draft for r in self.running))

    def _busy(self, requests: int) -> bool:
        """Whether ``requests`` is more than ``disable_by_batch_size``."""
        n = self.spec.disable_by_batch_size
        return n is not None and requests > n

    def _drafts(self, req: Request, budget: int) -> list[int] | int:
        """Draft tokens for a decoding ``req``, at most what can still be emitted; none for
        rows with penalties or ``min_tokens`` bans (their statistics / bans change within the
        row), or past the budget. Its last token known and nothing in flight: the tokens. With
        a draft model and the request's previous row in flight: how many of the drafts that
        row's step makes on the device to verify (``device_drafts``, jserve/spec/chain.py;
        never for host-masked rows, whose masks follow the drafts), bounded as if all of its
        own drafts are accepted."""
        sp = req.sampling_params
        if sp.uses_penalties or req.num_output_tokens < sp.min_tokens or req.no_draft:
            return []
        chained = (req.num_placeholders == 1 and self._chained and not sp.uses_host_masks
                   and (self._spec_last or (self._draft_mode and self.spec.disable_by_batch_size
                                            is None)))   # the row in flight drafts
        if not chained and (req.num_placeholders or req.num_computed_tokens != req.num_tokens - 1):
            return []
        n_out = req.num_output_tokens + req.num_placeholders
        k = min(self.spec.num_speculative_tokens, budget - 1,
                self.max_model_len - req.num_computed_tokens - 1 if chained
                else self.max_model_len - req.num_tokens)
        if sp.max_tokens is not None:
            k = min(k, sp.max_tokens - n_out - 1)
        if k <= 0:
            return []
        if chained:
            return k
        if self._draft_mode:
            # The drafts as the device left them, a last -1 included: the row is then the one a
            # chained row verifies, so both loops draw the same seeded samples (``RunnerOutput.
            # draft_token_ids``). Host masks follow real drafts only.
            n, drafts = self._next_drafts.get(req.request_id, (-1, []))
            drafts = drafts[:k] if n == req.num_tokens else []
            return drafts[:drafts.index(-1)] if sp.uses_host_masks and -1 in drafts else drafts
        return self._proposer.propose(req.all_token_ids, k)

    def _lookahead(self, req: Request, k: int) -> int:
        """draft_model: positions past a sampling row's end whose pages the draft's decode
        steps write (at most K, within max_model_len; 0 when the row does not sample, and for
        requests that never draft: their rows' draft decodes write the null page there)."""
        if not self._draft_mode or req.no_draft:
            return 0
        end = req.num_computed_tokens + k
        if end < req.num_tokens + req.num_placeholders:
            return 0
        return max(0, min(self.spec.num_speculative_tokens, self.max_model_len - end))

    def _chunk(self, req: Request, k: int, drafts: list[int] | int = ()) -> ScheduledChunk:
        """The row value for ``k`` tokens of ``req`` from ``num_computed_tokens`` (less the
        in-flight drafts: ``Request.spec_in_flight``), the last of them its drafts (tokens, or
        a count of device drafts), with the page row diff against what the runner was last
        sent; then advance the request."""
        # One row per running request per step: locals, not repeated property reads (at 256
        # rows this function was a third of ``schedule``).
        shifted = req.spec_in_flight
        start, ps = req.num_computed_tokens - shifted, self.pool.page_size
        device_drafts = isinstance(drafts, int)
        nd = drafts if device_drafts else len(drafts)
        end = start + k
        num_tokens = req.num_tokens
        known = min(end - nd, num_tokens)
        rid = req.request_id
        new = None
        sent = self._sent_pages.get(rid)
        if sent is None:
            new = self._new_data(req)
            sent = self._sent_pages[rid] = []
        cur = req.page_ids
        n_sent, n_cur = len(sent), len(cur)
        first = min(n_sent, start // ps)  # pages before the chunk never change while held
        while first < n_sent and first < n_cur and sent[first] == cur[first]:
            first += 1
        page_ids = tuple(cur[first:]) if first < n_cur else ()
        if n_sent > n_cur:  # pages given back (speculative rollback): null them too
            page_ids += (0,) * (n_sent - max(n_cur, first))
        if first < n_sent or first < n_cur:
            del sent[first:]
            sent.extend(cur[first:])
        placeholders = req.num_placeholders
        samples = end - nd == num_tokens + placeholders
        sp = req.sampling_params
        out_index = num_tokens - req.num_prompt_tokens + placeholders
        banned: tuple[int, ...] = ()
        if samples and out_index < sp.min_tokens:
            banned = tuple(sp.stop_token_ids) + (() if sp.ignore_eos else tuple(req.eos_token_ids))
        token_ids = tuple(_tokens(req, start, known)) if known > start else ()
        history = None
        if self._proposer is not None:   # n-gram: is the slot's token history complete?
            if self._spec_now:   # (a request taking a slot sends its history with ``new``)
                if new is None and rid in self._stale_history:
                    history = tuple(req.all_token_ids)
                self._stale_history.discard(rid)
            else:
                self._stale_history.add(rid)
        chunk = ScheduledChunk(
            req_id=rid, start=start, num_tokens=k,
            token_ids=token_ids + tuple(drafts) if nd and not device_drafts else token_ids,
            num_placeholders=end - nd - max(known, start), page_start=first, page_ids=page_ids,
            samples=samples, output_index=out_index, banned_ids=banned, new=new, num_draft=nd,
            device_drafts=device_drafts and nd > 0, shifted=shifted > 0, history=history)
        req.num_computed_tokens += k
        req.spec_in_flight += nd
        if samples:
            req.num_placeholders += 1
        return chunk

    def _new_data(self, req: Request) -> NewRequestData:
        """The runner's per-request data when ``req`` takes a runner slot (admission, or again
        after a preemption); the history (for penalties, and for the device n-gram lookup) is
        complete: admission waits for tokens in flight."""
        sp = req.sampling_params
        if not (sp.uses_penalties or (self._proposer is not None and self._spec_now)):
            return NewRequestData(req.request_id, sp, req.seed, fsm_state=req.fsm_state)
        if req.num_placeholders:
            raise AssertionError(f"request {req.request_id!r} takes a runner slot with a token "
                                 "in flight")
        return NewRequestData(req.request_id, sp, req.seed,
                              history=tuple(req.prompt_token_ids) + tuple(req.output_token_ids),
                              num_prompt=req.num_prompt_tokens, fsm_state=req.fsm_state)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        """Preempt ``req`` (already removed from ``running``): swap or recompute."""
        mode = self.kv.preempt(req)
        logger.debug("preempted request %s by %s (%d computed tokens, %d preemptions so far); "
                     "%d running, %d free pages", req.request_id, mode, req.num_computed_tokens,
                     req.num_preemptions, len(self.running), self.pool.num_free)
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(req)
        self._next_drafts.pop(req.request_id, None)
        self._drop(req.request_id)
        out.num_preempted += 1

    def _drop(self, rid: str) -> None:
        """The runner forgets ``rid`` (its page row and sampling state) at the next step."""
        if self._sent_pages.pop(rid, None) is not None:
            self._dropped.append(rid)

    # ------------------------------------------------------------- update
    def update(self, sched_out: SchedulerOutput, runner_out: RunnerOutput) -> list[Request]:
        """Apply one step's results (its placeholders become tokens); returns the requests
        that got a token (row order). The step may be one behind ``schedule``.

        Rows whose request finished since it was scheduled (abort, stop found late) are
        skipped: their tokens are never appended. A request preempted since then still gets
        its token (the step computed it).
        """
        if len(runner_out.sampled_token_ids) < len(sched_out.chunks):
            raise ValueError(f"runner returned {len(runner_out.sampled_token_ids)} rows for "
                             f"{len(sched_out.chunks)} scheduled rows")
        self.kv.begin_step()  # the step ran: host slots it read may be reused
        touched: list[Request] = []
        any_finished = False
        for row, chunk in enumerate(sched_out.chunks):
            req = self._requests.get(chunk.req_id)
            if req is None:
                continue
            if req.status is RequestStatus.RUNNING:
                self.kv.on_computed(req)
            if not chunk.samples:
                continue
            req.num_placeholders -= sched_out.burst
            tokens = runner_out.sampled_token_ids[row]
            for j, token in enumerate(tokens):
                req.output_token_ids.append(int(token))
                if req.sampling_params.logprobs is not None and runner_out.logprobs is not None:
                    req.output_logprobs.append(self._logprobs_entry(req, row, j, runner_out))
                self._check_stop(req, int(token))
                if req.is_finished:
                    break
            if chunk.num_draft:
                verified = (chunk.num_draft if runner_out.verified_drafts is None
                            else runner_out.verified_drafts[row])
                self._rollback(req, chunk.num_draft, len(tokens), verified)
            if runner_out.draft_token_ids is not None and req.status is RequestStatus.RUNNING:
                # (a preempted request takes another runner slot, where its drafts' q is not:
                # it drafts again from its first sampled row there)
                self._next_drafts[req.request_id] = (req.num_tokens, runner_out.draft_token_ids[row])
            if req.status is RequestStatus.RUNNING:
                self.kv.on_computed(req)
            if req.is_finished:
                if req in self.waiting:
                    self.waiting.remove(req)
                self._release(req)
                any_finished = True
            touched.append(req)
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return touched

    def _rollback(self, req: Request, num_draft: int, num_emitted: int, verified: int) -> None:
        """After a row with ``num_draft`` draft positions of ``req`` verified ``verified`` drafts
        (fewer when the device n-gram lookup found fewer) and emitted ``num_emitted`` = accepted
        + 1 tokens: move ``num_computed_tokens`` back over the rest (their K/V slots are written
        again later) and give back the pages past the accepted tokens; count the drafts."""
        accepted = num_emitted - 1
        req.spec_in_flight -= num_draft
        if verified:   # else the row decoded one token: no draft to count
            c = self.spec_counters
            c["spec_decode_num_drafts"] += 1
            c["spec_decode_num_draft_tokens"] += verified
            c["spec_decode_num_accepted_tokens"] += accepted
            c["spec_decode_num_emitted_tokens"] += num_emitted
        req.spec_num_draft_tokens += verified
        req.spec_num_accepted_tokens += accepted
        if req.is_finished:
            return  # its pages are released
        if req.status is RequestStatus.RUNNING:
            self.kv.rollback(req, num_draft - accepted)
        else:  # preempted since: recompute restarts at 0; a swap resume stops before the drafts
            req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens - 1)

    @staticmethod
    def _logprobs_entry(req: Request, row: int, j: int,
                        runner_out: RunnerOutput) -> tuple[float, list[tuple[int, float]]]:
        n = req.sampling_params.logprobs
        top: list[tuple[int, float]] = []
        if n:
            have = 0 if runner_out.top_ids is None else len(runner_out.top_ids[row][j])
            if have < n:
                raise ValueError(f"request {req.request_id!r} asks for {n} top logprobs, the runner "
                                 f"returned {have}")
            top = [(int(t), float(lp)) for t, lp in
                   zip(runner_out.top_ids[row][j][:n], runner_out.top_logprobs[row][j][:n], strict=True)]
        return float(runner_out.logprobs[row][j]), top

    def _check_stop(self, req: Request, token: int) -> None:
        """Token-level stop checks after ``token`` was appended (stop strings: the engine)."""
        sp = req.sampling_params
        if (sp.max_tokens is not None and req.num_output_tokens >= sp.max_tokens) \
                or req.num_tokens >= self.max_model_len:
            req.status = RequestStatus.FINISHED_LENGTH
        elif req.num_output_tokens >= sp.min_tokens and (
                (not sp.ignore_eos and token in req.eos_token_ids) or token in sp.stop_token_ids):
            req.status = RequestStatus.FINISHED_STOPPED
            req.stop_reason = token

    # ------------------------------------------------------------- finish
    def finish_request(self, request_id: str, status: RequestStatus,
                       stop_reason: int | str | None = None) -> None:
        """Finish a waiting or running request (abort, stop string); frees its pages.

        A no-op for unknown or already finished ids.
        """
        if not status.finished:
            raise ValueError(f"finish_request needs a finished status, got {status}")
        req = self._requests.get(request_id)
        if req is None:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        if stop_reason is not None:
            req.stop_reason = stop_reason
        self._release(req)

    def _release(self, req: Request) -> None:
        """Forget a finished request and give its pages back (the caller updates the queues)."""
        self.kv.release(req)
        self._next_drafts.pop(req.request_id, None)
        self._stale_history.discard(req.request_id)
        del self._requests[req.request_id]
        self._drop(req.request_id)

    # -------------------------------------------------------------- metrics
    def kv_stats(self) -> dict[str, int]:
        """KV cache counters and gauges (see ``KVCacheManager.stats``) + preemptions."""
        s = self.kv.stats()
        s["preemptions"] = self.num_preemptions_total
        if self.spec is not None:
            s.update(self.spec_counters)
        return s


def _tokens(req: Request, start: int, end: int) -> list[int]:
    """Token ids of ``req`` at positions [start, end) (all known on the host)."""
    p = req.num_prompt_tokens
    if end <= p:
        return req.prompt_token_ids[start:end]
    if start >= p:
        return req.output_token_ids[start - p:end - p]
    return req.prompt_token_ids[start:] + req.output_token_ids[:end - p]
