"""A model-free runner for scheduler / KV-manager tests: the "KV" of a token is its id.

``FakeKVRunner`` consumes ``SchedulerOutput`` values exactly as the real runner does and never
reads a live ``Request``:

  * per request id it keeps its own state, built from the plan's diffs: a page-table row
    (``new`` starts one, ``page_start``/``page_ids`` patch it, ``dropped`` forgets it), the seed
    from ``new``, and the token it sampled for the id in the previous step (a row's
    placeholder is fed from there, as the device feeds it from the in-flight step's output);
  * it makes the step's page moves in ``KVPageMover``'s order (gather to host, copy-on-write
    copies, loads from host) over its own host pages (a ``HostPages`` per store name, sized
    like the scheduler's stores, holding numpy copies of pool rows), then writes every row's
    tokens into a host copy of the pool (``int64[num_pages, page_size]``), then "samples" each
    sampling row: a hash of the context read back through ITS page table and the seed,
    skipping the row's ``banned_ids``.

A page mix-up, a wrong page-table diff, a missed copy-on-write, a stale swap slot, a wrong
prefix-cache hit or a wrong ``output_index`` / ban therefore changes the generated tokens,
which the tests compare with ``reference_generation`` (the same fake model over the plain
token list). ``tokens`` is an oracle that survives drops: every position's token, once seen,
must never change (a row that re-sends a known position with another id is a bug).

``Driver`` runs the loop in ``LLMEngine.step``'s order, synchronous or overlapped
(``schedule(N+1)`` and ``run(N+1)`` before ``update(N)``), and checks the plan against the
scheduler's requests after every step; ``drive`` runs it until nothing is left in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from jserve.host_kv import HostSlots
from jserve.host_pages import HostPages
from jserve.page_pool import PagePool
from jserve.request import Request, RequestStatus
from jserve.scheduler import Scheduler
from jserve.scheduler_output import RunnerOutput, SchedulerOutput

VOCAB = 48


def fake_model(context: np.ndarray | list[int], seed: int, banned: tuple[int, ...] = ()) -> int:
    """Deterministic next token from the whole context and the request's seed, never banned."""
    ctx = context.tolist() if isinstance(context, np.ndarray) else context
    t = hash((seed, tuple(ctx))) % VOCAB
    while t in banned:
        t = (t + 1) % VOCAB
    return t


def host_store(num_slots: int, name: str) -> HostSlots:
    """The scheduler's slots of host store ``name`` (``"swap"`` / ``"tier"``)."""
    return HostSlots(name, num_slots)


class FakeKVRunner:
    """``host_slots``: store name -> slots, as the engine's runner gets them from the config
    (tests pass ``sched.kv.host_slot_counts()``; empty: no host moves)."""

    def __init__(self, pool: PagePool, host_slots: Mapping[str, int] | None = None) -> None:
        self.ps = pool.page_size
        self.kv = np.full((pool.num_pages, pool.page_size), -1, np.int64)
        self.host = HostPages(host_slots or {})
        self.num_copies = self.num_to_host = self.num_from_host = 0
        self.num_steps = self.num_placeholder_rows = 0
        self.rows: dict[str, list[int]] = {}    # page-table row per request id (from the diffs)
        self.seeds: dict[str, int] = {}
        self.prev: dict[str, int] = {}          # id -> token the previous step sampled for it
        self.tokens: dict[str, list[int | None]] = {}  # oracle: token per position, never dropped

    def _record(self, rid: str, pos: int, token: int) -> None:
        seq = self.tokens.setdefault(rid, [])
        if pos >= len(seq):
            seq.extend([None] * (pos + 1 - len(seq)))
        assert seq[pos] in (None, token), \
            f"{rid}: position {pos} was token {seq[pos]}, the plan now says {token}"
        seq[pos] = token

    def run(self, out: SchedulerOutput) -> RunnerOutput:
        t = out.transfers
        for page, store, slot in t.to_host:
            self.host.put(store, slot, self.kv[page].copy())
        if t.copies:
            src, dst = zip(*t.copies, strict=True)
            self.kv[list(dst)] = self.kv[list(src)]
        for store, slot, page in t.from_host:
            self.kv[page] = self.host.get(store, slot)
        self.num_copies += len(t.copies)
        self.num_to_host += len(t.to_host)
        self.num_from_host += len(t.from_host)
        for rid in out.dropped:
            self.rows.pop(rid, None)
            self.seeds.pop(rid, None)
        if not out.chunks:
            return RunnerOutput([])
        self.num_steps += 1
        assert len({c.req_id for c in out.chunks}) == len(out.chunks), "two rows for one request"
        for c in out.chunks:  # the page-table diffs
            if c.new is not None:
                assert c.req_id not in self.rows, f"{c.req_id}: new data for an id the runner holds"
                assert c.new.req_id == c.req_id
                self.rows[c.req_id], self.seeds[c.req_id] = [], c.new.seed
                for p, tok in enumerate(c.new.history or ()):  # penalty history: known tokens
                    self._record(c.req_id, p, tok)
            assert c.req_id in self.rows, f"{c.req_id}: a row for an id the runner does not hold"
            row = self.rows[c.req_id]
            assert c.page_start <= len(row), f"{c.req_id}: page diff from {c.page_start} > {len(row)}"
            row[c.page_start:c.page_start + len(c.page_ids)] = c.page_ids
        for c in out.chunks:  # the step writes all rows' K/V, then attends
            assert c.num_tokens >= 1 and c.num_placeholders in (0, 1)
            assert len(c.token_ids) + c.num_placeholders == c.num_tokens
            ids = list(c.token_ids)
            if c.num_placeholders:
                assert c.req_id in self.prev, f"{c.req_id}: placeholder with no token in flight"
                ids.append(self.prev[c.req_id])
                self.num_placeholder_rows += 1
            pos = np.arange(c.start, c.start + c.num_tokens)
            row = self.rows[c.req_id]
            assert len(row) * self.ps >= c.start + c.num_tokens, f"{c.req_id}: page row too short"
            pages = np.asarray(row)[pos // self.ps]
            assert (pages != 0).all(), "a real token must not write the null page"
            self.kv[pages, pos % self.ps] = ids
            for p, tok in zip(pos.tolist(), ids, strict=True):
                self._record(c.req_id, p, tok)
        sampled: list[list[int]] = []
        prev: dict[str, int] = {}
        for c in out.chunks:
            if not c.samples:
                sampled.append([])
                continue
            end = c.start + c.num_tokens
            pos = np.arange(end)
            ctx = self.kv[np.asarray(self.rows[c.req_id])[pos // self.ps], pos % self.ps]
            tok = fake_model(ctx, self.seeds[c.req_id], c.banned_ids)
            self._record(c.req_id, end, tok)
            prev[c.req_id] = tok
            sampled.append([tok])
        self.prev = prev  # like the device: only the previous step's tokens can be fed
        return RunnerOutput(sampled)


def reference_generation(r: Request, max_model_len: int) -> tuple[list[int], RequestStatus]:
    """The fake model over the plain token list: (output tokens, finish status)."""
    sp, toks, out = r.sampling_params, list(r.prompt_token_ids), []
    stops = tuple(sp.stop_token_ids) + (() if sp.ignore_eos else tuple(r.eos_token_ids))
    while True:
        t = fake_model(toks, r.seed, stops if len(out) < sp.min_tokens else ())
        toks.append(t)
        out.append(t)
        if (sp.max_tokens is not None and len(out) >= sp.max_tokens) or len(toks) >= max_model_len:
            return out, RequestStatus.FINISHED_LENGTH
        if len(out) >= sp.min_tokens and ((not sp.ignore_eos and t in r.eos_token_ids)
                                          or t in sp.stop_token_ids):
            return out, RequestStatus.FINISHED_STOPPED


Hook = Callable[[SchedulerOutput], None]
Handle = tuple[SchedulerOutput, RunnerOutput]


class Driver:
    """``LLMEngine.step``'s loop over a scheduler and a runner (``run`` stands in for
    dispatch + result): overlapped, step N+1 is scheduled and run before ``update(N)``.

    Hooks: ``on_schedule(out)`` right after ``schedule()`` (before the runner), and
    ``in_flight(out)`` after the runner and before the update that follows: for a row of
    ``out`` (overlapped: also of the step before) that is the window between schedule and
    update, where an abort lands while the row is in flight.
    """

    def __init__(self, sched: Scheduler, runner: FakeKVRunner, overlap: bool,
                 check: bool = True) -> None:
        self.sched, self.runner, self.overlap, self.check = sched, runner, overlap, check
        self.pending: Handle | None = None  # dispatched, not yet updated
        self.steps = 0
        self.requests: dict[str, Request] = {}  # every request that got a row
        self.emitted: dict[str, int] = {}       # tokens update() appended, per request id

    @property
    def busy(self) -> bool:
        return self.sched.has_unfinished() or self.pending is not None

    def step(self, on_schedule: Hook | None = None, in_flight: Hook | None = None) -> list[Request]:
        sched = self.sched
        out = sched.schedule()
        self.steps += 1
        for c in out.chunks:
            req = self.requests[c.req_id] = sched.get_request(c.req_id)
            if c.samples:  # the seed counter: the output token the row samples
                want = c.start + c.num_tokens - req.num_prompt_tokens
                assert c.output_index == want, f"{c.req_id}: output_index {c.output_index}, wants {want}"
        if self.check:
            self._check_plan(out)
        if on_schedule is not None:
            on_schedule(out)
        handle = None
        if not out.is_empty:  # as the engine: an empty plan is not dispatched
            ro = self.runner.run(out)
            handle = (out, ro) if out.chunks else None
            if self.check:
                held = {r.request_id for r in sched.running}
                assert set(self.runner.rows) == held, \
                    f"runner holds {sorted(set(self.runner.rows) - held)} / lacks " \
                    f"{sorted(held - set(self.runner.rows))}"
        done, self.pending = (self.pending, handle) if self.overlap else (handle, None)
        if in_flight is not None:
            in_flight(out)
        if done is None:
            return []
        rows = [self.requests[c.req_id] for c in done[0].chunks]
        before = {r.request_id: (r.num_output_tokens, r.is_finished) for r in rows}
        touched = sched.update(*done)
        for r in rows:
            n, finished = before[r.request_id]
            if finished:  # finished while its row was in flight: nothing more is appended
                assert r.num_output_tokens == n and r not in touched, r.request_id
            self.emitted[r.request_id] = self.emitted.get(r.request_id, 0) + r.num_output_tokens - n
        if self.check:
            sched.kv.check_invariants(list(sched.running) + list(sched.waiting))
            assert all(r.num_placeholders >= 0 for r in touched)
            self._check_cache()
        return touched

    def _check_cache(self) -> None:
        """Every page the prefix cache indexes holds exactly its entry's tokens (a page with a
        placeholder position, or a dropped token, must never be indexed)."""
        pc = self.sched.kv.prefix_cache
        if pc is None:
            return
        for page in range(1, self.sched.pool.num_pages):
            e = pc.entry_of_page(page)
            if e is not None:
                assert len(e.token_ids) == self.runner.ps
                assert self.runner.kv[page].tolist() == list(e.token_ids), f"page {page}"

    def _check_plan(self, out: SchedulerOutput) -> None:
        sched, cfg = self.sched, self.sched.config
        assert out.num_tokens <= cfg.max_num_batched_tokens
        assert out.num_seqs <= cfg.max_num_seqs
        for c in out.chunks:
            r = self.requests[c.req_id]
            assert r is not None and r.status is RequestStatus.RUNNING, c.req_id
            assert c.start + c.num_tokens == r.num_computed_tokens  # advanced at schedule time
            assert c.start + c.num_tokens <= r.num_tokens + r.num_placeholders
            assert len(r.page_ids) >= sched.pool.pages_needed(r.num_computed_tokens)

    def drain(self, max_steps: int = 100_000, **hooks: Hook) -> None:
        """Step until every request finished and no step is in flight; then one more schedule
        (flushes deferred frees)."""
        for _ in range(max_steps):
            if not self.busy:
                out = self.sched.schedule()
                if not out.is_empty:
                    self.runner.run(out)
                return
            self.step(**hooks)
        raise AssertionError("did not finish")


def drive(sched: Scheduler, runner: FakeKVRunner, overlap: bool = False, max_steps: int = 100_000,
          on_schedule: Hook | None = None, in_flight: Hook | None = None) -> Driver:
    """Run the loop (synchronous or overlapped) until idle; checks every step."""
    d = Driver(sched, runner, overlap)
    d.drain(max_steps, on_schedule=on_schedule, in_flight=in_flight)
    return d


def abort_in_flight(sched, rng, aborted: set, out, p: float = 0.02) -> None:
    """With probability ``p``, abort one request that has a row in ``out`` (a step in flight),
    recording its id in ``aborted`` (randomized runs: aborts arrive while a step runs)."""
    if out.chunks and rng.random() < p:
        rid = rng.choice(out.chunks).req_id
        if sched.get_request(rid) is not None:
            sched.finish_request(rid, RequestStatus.FINISHED_ABORTED)
            aborted.add(rid)
