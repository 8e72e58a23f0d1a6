"""KVCacheManager: the pages of each request: sharing, copy-on-write, swap, prefix-cache hits.

Where it sits: between the ``Scheduler`` (which decides *who* runs and how many tokens) and
the ``PagePool`` / ``PrefixCache`` / host swap slots (which hold the pages). Host side only:
every device-side consequence is queued as a ``KVTransfers`` entry (plain page ids and host
slots) that the runner executes at the start of the step (``take_transfers``); the runner
owns the host pages' data, this side only their slots (``HostSlots``).

Per request, the page list is assembled from four sources::

    admission of a waiting request          page index:   0     1     2     3     4
      fresh, prefix-cache hit                  share dev | load from host tier | new ...
      n > 1 sibling (fork of the first)        share the first sibling's pages [0, P-1)
      resumed after swap                       load swap slot | share dev | load tier ...
    running request, chunk [s, e)
      a page in [s, e) that is shared or cached -> copy-on-write: new page, device copy
      pages past the end                        -> new

Rules:
  * A cache hit never covers the whole sequence: at least its last token is computed so the
    step produces logits (a hit of P tokens is capped at floor((P - 1) / page_size) pages).
  * Nothing writes into a page another request holds or the prefix cache indexes: the
    first write copies it (``grow``); full cached pages are never written at all.
  * A sibling of an ``n`` > 1 request waits until the first sibling has computed the prompt,
    then shares its pages up to position P-1 and computes token P-1 itself (its own sample).
  * Swap-out copies only pages the cache does not keep; on resume, each page comes back from
    the swap space, the device cache or the host tier, and at the first page found nowhere
    the request falls back to recomputing from there.
  * Pool demand is checked before anything changes (``demand`` / ``plan_admission``), so a
    step that does not fit changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from jserve.config import EngineConfig
from jserve.host_kv import SWAP, TIER, HostSlots, host_slot_counts
from jserve.page_pool import PagePool
from jserve.prefix_cache import CachedPage, HashFn, PrefixCache, default_page_hash
from jserve.request import Request, RequestStatus
from jserve.scheduler_output import KVTransfers

log = logging.getLogger(__name__)

PREEMPTION_MODES = ("swap", "recompute")


@dataclass
class AdmissionPlan:
    """What admitting a waiting request would take (computed without changing anything)."""

    num_computed: int                          # tokens it starts with (cached / forked / swapped)
    num_tokens: int                            # tokens of its first chunk
    pool_pages: int                            # pages the pool must supply (new + taken back)
    sources: list[tuple[str, object]] = field(default_factory=list)  # per page: share/swap/tier
    entries: list[CachedPage] = field(default_factory=list)
    fresh: bool = True                         # not a swap resume (counts as a prefix query)


class KVCacheManager:
    """Owns the page bookkeeping of every request (see the module docstring)."""

    def __init__(self, pool: PagePool, prefix_cache: PrefixCache | None = None,
                 swap_space: HostSlots | None = None,
                 preemption_mode: str = "recompute") -> None:
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {preemption_mode!r}")
        if prefix_cache is not None and prefix_cache.pool is not pool:
            raise ValueError("the prefix cache must index the same page pool")
        self.pool = pool
        self.prefix_cache = prefix_cache
        self.swap_space = swap_space if swap_space is not None and swap_space.num_slots > 0 else None
        tier = prefix_cache.host_tier if prefix_cache is not None else None
        if self.swap_space is not None and tier is not None and self.swap_space.name == tier.name:
            raise ValueError(f"the swap space and the host tier share the store name {tier.name!r}")
        self.preemption_mode = preemption_mode
        self._transfers = KVTransfers()
        # This step's destinations: a copy-on-write of a page that is itself being copied or
        # loaded in this step reads from the original source instead (the moves of one step
        # all read before they write, so a copy of a copy would read stale bytes).
        self._copied_from: dict[int, int] = {}
        self._loaded_from: dict[int, tuple[HostSlots, int]] = {}
        self._swap_slots_to_free: list[int] = []  # freed at the next step: a read may be in flight
        # This schedule's rows: computed tokens of each grown request before its row. A fork
        # sibling shares only what an earlier step computed (this step's copies run before
        # its forward, so a copy of a page the leader writes now would read stale bytes).
        self._computed_before: dict[Request, int] = {}
        self.counters = dict(prefix_cache_queries=0, prefix_cache_hits_device=0,
                             prefix_cache_hits_host=0, cow_copies=0, pages_swapped_out=0,
                             pages_swapped_in=0, host_tier_pages_loaded=0,
                             preemptions_swap=0, preemptions_recompute=0,
                             swap_resume_tokens_lost=0)

    @property
    def page_size(self) -> int:
        return self.pool.page_size

    def begin_step(self) -> None:
        """After a step ran (called from ``update`` and again from ``schedule``): its page
        moves are done, so the host slots it read may be reused."""
        if self._swap_slots_to_free:
            self.swap_space.free(self._swap_slots_to_free)
            self._swap_slots_to_free = []
        if self.prefix_cache is not None:
            self.prefix_cache.unpin()

    # ------------------------------------------------------------- running
    def _writes_shared(self, req: Request, end: int) -> list[int]:
        """Indices of pages req holds that the chunk up to ``end`` writes but must not."""
        pool, ids = self.pool, req.page_ids
        first = req.num_computed_tokens // pool.page_size
        last = min(len(ids), pool.pages_needed(end))
        if first >= last:   # the chunk writes only pages it has yet to get
            return []
        refcounts, cached = pool.refcounts, pool.cached
        return [i for i in range(first, last) if refcounts[ids[i]] > 1 or cached[ids[i]]]

    def demand(self, req: Request, k: int) -> int:
        """Pool pages that computing the next ``k`` tokens of a running ``req`` takes."""
        end = req.num_computed_tokens + k
        missing = self.pool.pages_needed(end) - len(req.page_ids)
        return max(0, missing) + len(self._writes_shared(req, end))

    def grow(self, req: Request, k: int) -> None:
        """Give ``req`` writable pages for its next ``k`` tokens (call after ``demand`` fits)."""
        end = req.num_computed_tokens + k
        self._computed_before.setdefault(req, req.num_computed_tokens)
        for i in self._writes_shared(req, end):
            old = req.page_ids[i]
            (new,) = self.pool.allocate(1)
            if old in self._loaded_from:
                self._load(*self._loaded_from[old], new)
            else:
                src = self._copied_from.get(old, old)
                self._transfers.copies.append((src, new))
                self._copied_from[new] = src
            req.page_ids[i] = new
            self.pool.free([old])
            self.counters["cow_copies"] += 1
        missing = self.pool.pages_needed(end) - len(req.page_ids)
        if missing > 0:
            req.page_ids.extend(self.pool.allocate(missing))

    # ------------------------------------------------------------ admission
    def plan_admission(self, req: Request, budget: int) -> AdmissionPlan | None:
        """The plan to admit waiting ``req`` with a first chunk of at most ``budget`` tokens;
        None while it must wait for its fork sibling to compute the shared prompt."""
        if req.page_ids:
            raise AssertionError(f"waiting request {req.request_id!r} holds pages {req.page_ids}")
        ps = self.page_size
        if req.swap_slots or req.num_computed_tokens:
            computed, sources, entries = self._resume_sources(req)
            fresh = False
        else:
            fresh = True
            leader = req.fork_of
            if leader is not None and leader.status is RequestStatus.RUNNING \
                    and leader.prompt_token_ids == req.prompt_token_ids and not req.output_token_ids:
                if self._computed_before.get(leader, leader.num_computed_tokens) < req.num_tokens - 1:
                    return None
                computed = req.num_tokens - 1
                sources = [("share", p) for p in leader.page_ids[:self.pool.pages_needed(computed)]]
                entries = list(leader.page_entries[:computed // ps])
            elif self.prefix_cache is not None:
                entries = self.prefix_cache.lookup(_TokenView(req, ps), _extra(req),
                                                   (req.num_tokens - 1) // ps)
                sources = [("share", e.device_page) if e.device_page is not None else ("tier", e)
                           for e in entries]
                computed = len(entries) * ps
            else:
                computed, sources, entries = 0, [], []
        k = min(req.num_tokens - computed, budget)
        pool = self.pool
        need = sum(1 for kind, v in sources if kind != "share" or pool.refcounts[v] == 0)
        need += max(0, pool.pages_needed(computed + k) - len(sources))
        need += sum(1 for kind, _ in sources[computed // ps:] if kind == "share")  # CoW of a share
        return AdmissionPlan(computed, k, need, sources, entries, fresh)

    def _resume_sources(self, req: Request) -> tuple[int, list[tuple[str, object]], list[CachedPage]]:
        pc, ps = self.prefix_cache, self.page_size
        sources: list[tuple[str, object]] = []
        computed = req.num_computed_tokens
        for i in range(self.pool.pages_needed(req.num_computed_tokens)):
            e = req.page_entries[i] if i < len(req.page_entries) else None
            if i in req.swap_slots:
                sources.append(("swap", req.swap_slots[i]))
            elif e is not None and e.device_page is not None:
                sources.append(("share", e.device_page))
            elif e is not None and pc is not None and pc.host_valid(e):
                sources.append(("tier", e))
            else:  # lost: recompute from this page on
                computed = i * ps
                break
        return computed, sources, list(req.page_entries[:computed // ps])

    def admit(self, req: Request, plan: AdmissionPlan) -> None:
        """Carry out ``plan`` (after ``plan.pool_pages <= pool.num_free`` was checked)."""
        pool, pc, ps = self.pool, self.prefix_cache, self.page_size
        shares = [v for kind, v in plan.sources if kind == "share"]
        tier = [v for kind, v in plan.sources if kind == "tier"]
        pool.incref(shares)  # first: the allocations below must not evict them
        if pc is not None:
            pc.pin(tier)  # until the step read them: no host-tier eviction may reuse their slots
        loaded = iter(pool.allocate(len(plan.sources) - len(shares)))
        pages = []
        for kind, v in plan.sources:
            if kind == "share":
                pages.append(v)
                continue
            page = next(loaded)
            pages.append(page)
            if kind == "swap":
                self._load(self.swap_space, v, page)
                self.counters["pages_swapped_in"] += 1
            else:
                self._load(pc.host_tier, v.host_slot, page)
                pc.attach_device(v, page)
                self.counters["host_tier_pages_loaded"] += 1
        self._swap_slots_to_free.extend(req.swap_slots.values())
        req.swap_slots = {}
        req.page_ids = pages
        req.page_entries = plan.entries
        if not plan.fresh:
            self.counters["swap_resume_tokens_lost"] += req.num_computed_tokens - plan.num_computed
        req.num_computed_tokens = plan.num_computed
        if plan.fresh:
            host_hit = len(tier) * ps
            self.counters["prefix_cache_queries"] += req.num_tokens
            self.counters["prefix_cache_hits_host"] += host_hit
            self.counters["prefix_cache_hits_device"] += plan.num_computed - host_hit
            if req.num_cached_tokens is None:
                req.num_cached_tokens = plan.num_computed
        self.grow(req, plan.num_tokens)

    def _load(self, store: HostSlots, slot: int, page: int) -> None:
        self._transfers.from_host.append((store.name, slot, page))
        self._loaded_from[page] = (store, slot)

    def _offload(self, page: int, store: HostSlots, slot: int) -> None:
        """Queue device ``page`` -> ``slot``; the slot is valid from now on (the runner
        dispatches any later read of it after this copy, ordered by data dependence)."""
        self._transfers.to_host.append((page, store.name, slot))
        store.mark_valid([slot])

    # ------------------------------------------------------------ preemption
    def preempt(self, req: Request) -> str:
        """Give up ``req``'s device pages: to the swap space when configured and it fits, else
        recompute (from the prefix cache on). Returns the mode used."""
        if self.preemption_mode == "swap" and self.swap_space is not None and req.num_computed_tokens:
            n = self.pool.pages_needed(req.num_computed_tokens)
            keep = [i for i in range(n) if not self._kept_by_cache(req, i)]
            if len(keep) <= self.swap_space.num_free:
                slots = self.swap_space.allocate(len(keep))
                for i, slot in zip(keep, slots, strict=True):
                    self._offload(req.page_ids[i], self.swap_space, slot)
                req.swap_slots = dict(zip(keep, slots, strict=True))
                self.pool.free(reversed(req.page_ids))
                req.page_ids = []
                req.page_entries = req.page_entries[:req.num_computed_tokens // self.page_size]
                self.counters["pages_swapped_out"] += len(keep)
                self.counters["preemptions_swap"] += 1
                return "swap"
        self.pool.free(reversed(req.page_ids))
        req.page_ids = []
        req.page_entries = []
        req.num_computed_tokens = 0
        self.counters["preemptions_recompute"] += 1
        return "recompute"

    def _kept_by_cache(self, req: Request, i: int) -> bool:
        """Page i need not be swapped: its K/V is in the host tier (or on its way there), or
        on device in a page someone else holds. (A page only ``req`` holds would be
        evictable the moment it is freed.)"""
        if self.prefix_cache is None or i >= len(req.page_entries):
            return False
        e = req.page_entries[i]
        if e.host_slot is not None:
            return True
        if e.device_page is None:
            return False
        return self.pool.refcounts[e.device_page] > (1 if req.page_ids[i] == e.device_page else 0)

    # ---------------------------------------------------------------- update
    def on_computed(self, req: Request) -> None:
        """After a step's result arrived: index ``req``'s newly full pages. Only pages whose
        tokens are all known on the host are indexed (``num_computed_tokens`` may already count
        an in-flight row over a placeholder); their K/V lands before any later step reads it."""
        pc = self.prefix_cache
        full = min(req.num_computed_tokens, req.num_tokens) // self.page_size
        if pc is None or full <= len(req.page_entries):
            return
        pc.register(req.page_entries, req.page_ids, _TokenView(req, self.page_size).page_tokens,
                    _extra(req), full)

    def rollback(self, req: Request, num_tokens: int) -> None:
        """Speculative decoding: ``req``'s last ``num_tokens`` computed tokens were rejected
        drafts. Move ``num_computed_tokens`` back and free the pages past the accepted tokens
        (tail first); the prefix cache never indexed them (``on_computed`` indexes known
        tokens only)."""
        req.num_computed_tokens -= num_tokens
        keep = self.pool.pages_needed(req.num_computed_tokens)
        if len(req.page_ids) > keep:
            tail = req.page_ids[keep:]
            del req.page_ids[keep:]
            self.pool.free(reversed(tail))

    def release(self, req: Request) -> None:
        """A finished request gives back its pages (tail first) and swap slots (a request
        still swapped out has no read of them planned)."""
        self.pool.free(reversed(req.page_ids))
        req.page_ids = []
        req.page_entries = []
        if req.swap_slots:
            self.swap_space.free(req.swap_slots.values())
            req.swap_slots = {}

    def take_transfers(self) -> KVTransfers:
        """This schedule's page moves (the prefix cache's host-tier offloads included)."""
        pc = self.prefix_cache
        if pc is not None and pc.host_tier is not None:
            for page, slot in pc.take_offloads():
                self._offload(page, pc.host_tier, slot)
        t, self._transfers = self._transfers, KVTransfers()
        self._copied_from, self._loaded_from = {}, {}
        self._computed_before = {}
        return t

    def host_slot_counts(self) -> dict[str, int]:
        """Slots of each host store this manager schedules moves into (name -> count): what
        the runner's ``HostPages`` must hold."""
        tier = self.prefix_cache.host_tier if self.prefix_cache is not None else None
        return {s.name: s.num_slots for s in (self.swap_space, tier) if s is not None}

    # ----------------------------------------------------------------- stats
    def stats(self) -> dict[str, int]:
        """Counters (monotonic since start-up) and gauges, flat, for metrics exporters."""
        pool, pc = self.pool, self.prefix_cache
        s = dict(self.counters)
        s.update(pages_total=pool.num_total, pages_used=pool.num_used, pages_free=pool.num_free,
                 pages_cached_evictable=pool.num_evictable, device_evictions=pool.num_evictions,
                 host_tier_pages=pc.num_host_pages if pc is not None else 0,
                 host_tier_evictions=pc.num_host_evictions if pc is not None else 0,
                 host_tier_pages_offloaded=pc.num_offloaded_pages if pc is not None else 0,
                 swap_slots_used=self.swap_space.num_used if self.swap_space is not None else 0,
                 swap_slots_total=self.swap_space.num_slots if self.swap_space is not None else 0)
        return s

    def check_invariants(self, requests: list[Request]) -> None:
        """Refcounts equal holders, swap slots equal holders (tests)."""
        self.pool.check_invariants()
        pages = [p for r in requests for p in r.page_ids]
        held = np.bincount(np.asarray(pages, np.int64), minlength=self.pool.num_pages)
        bad = np.flatnonzero(held != self.pool.refcounts)
        if bad.size:
            p = int(bad[0])
            raise AssertionError(f"page {p}: refcount {self.pool.refcounts[p]}, held by {held[p]} "
                                 f"requests")
        if self.swap_space is not None:
            self.swap_space.check_invariants()
            slots = [s for r in requests for s in r.swap_slots.values()] + self._swap_slots_to_free
            if len(set(slots)) != len(slots) or len(slots) != self.swap_space.num_used:
                raise AssertionError(f"swap slots held {len(slots)} != used {self.swap_space.num_used}")
        if self.prefix_cache is not None:
            self.prefix_cache.check_invariants()


def _extra(req: Request) -> Hashable:
    """The prefix cache's namespace of ``req``'s pages: its ``cache_salt``, and apart for a
    request that never drafts (its pages hold no draft-model K/V: a drafting request must not
    hit them, jserve/spec/draft.py)."""
    return (req.cache_salt, "no draft K/V") if req.no_draft else req.cache_salt


class _TokenView:
    """Read-only sequence view of a request's tokens (prompt + output) without concatenating."""

    __slots__ = ("req", "page_size")

    def __init__(self, req: Request, page_size: int) -> None:
        self.req = req
        self.page_size = page_size

    def __len__(self) -> int:
        return self.req.num_tokens

    def __getitem__(self, s: slice) -> list[int]:
        req = self.req
        p = req.num_prompt_tokens
        start, stop, _ = s.indices(req.num_tokens)
        if stop <= p:
            return req.prompt_token_ids[start:stop]
        if start >= p:
            return req.output_token_ids[start - p:stop - p]
        return req.prompt_token_ids[start:] + req.output_token_ids[:stop - p]

    def page_tokens(self, i: int) -> tuple[int, ...]:
        return tuple(self[i * self.page_size:(i + 1) * self.page_size])


def make_kv_manager(config: EngineConfig, num_pages: int,
                    hash_fn: HashFn = default_page_hash) -> KVCacheManager:
    """The engine's manager: pool of ``num_pages``, prefix cache, swap space and host tier
    slots sized by ``host_slot_counts(config)`` (the runner sizes its host pages by it too)."""
    cache = config.cache
    pool = PagePool(num_pages, cache.page_size)
    counts = host_slot_counts(config)
    tier = HostSlots(TIER, counts[TIER]) if TIER in counts else None
    swap = HostSlots(SWAP, counts[SWAP]) if SWAP in counts else None
    pc = PrefixCache(pool, hash_fn, tier) if cache.enable_prefix_caching else None
    log.info("KV cache: prefix caching %s; host tier %s; preemption by %s%s",
             "on" if pc else "off", f"{tier.num_slots} pages" if tier else "off",
             cache.preemption_mode, f" ({swap.num_slots} swap pages)" if swap else "")
    return KVCacheManager(pool, pc, swap, cache.preemption_mode)
