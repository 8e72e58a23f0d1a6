"""PrefixCache: automatic prefix caching of full KV pages, on device and in a host-memory tier.

Where it sits: inside the ``KVCacheManager`` (host side, no device work). When a request is
admitted, ``lookup`` finds the longest run of cached full pages of its tokens; after a step,
``register`` records the pages that step filled. The ``PagePool`` tells ``_on_device_evict``
when it reuses an unowned cached page; with a host tier the page's K/V is then copied to host
memory (the copy is queued in ``pending_offloads`` and runs at the start of the step), and a
later hit loads it back instead of recomputing it.

Identity of a page (a ``CachedPage``)::

    page i of a sequence:  hash_i = hash_fn(hash_{i-1}, token_ids[i*ps:(i+1)*ps], extra)
                           (hash_{-1} = None; ``extra`` namespaces anything else that changes
                           the K/V: the cache salt, later a LoRA id)

    tokens   |  t0 .. t15  |  t16 .. t31  |  t32 .. t47  | t48 t49 (partial: never cached)
    entries    serial 1       serial 2        serial 3
               parent None    parent 1        parent 2

A hash only *finds* candidates. A hit needs the candidate's stored token ids and ``extra``
to equal the query's and its ``parent_serial`` to be the serial of the entry matched for the
page before: the whole prefix is verified exactly, so a hash collision (``hash_fn`` is
injectable, a test can make every page collide) costs a lookup, never wrong K/V. Serials are
never reused.

Residency: an entry lives on device (``device_page``), in the host tier (``host_slot``), or
both; it is indexed while it lives somewhere. Eviction is LRU in both places: the pool keeps
unowned cached pages in LRU order, the tier keeps its own LRU (a host hit refreshes it). The
tier is inclusive: a page loaded back to device keeps its host copy.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from jserve.host_kv import HostSlots
from jserve.page_pool import PagePool

HashFn = Callable[[Hashable | None, tuple[int, ...], Hashable], Hashable]


def default_page_hash(parent_hash: Hashable | None, token_ids: tuple[int, ...],
                      extra: Hashable) -> int:
    """64-bit hash of (parent hash, the page's token ids, extra key)."""
    return hash((parent_hash, token_ids, extra))


@dataclass(eq=False, slots=True)
class CachedPage:
    """The content identity of one full page, and where a copy of its K/V lives."""

    serial: int
    hash: Hashable
    parent_serial: int | None
    token_ids: tuple[int, ...]
    extra: Hashable
    device_page: int | None = None   # page id in the device pool holding this K/V
    host_slot: int | None = None     # slot in the host tier (valid once its offload is queued)


class PrefixCache:
    """Hash index of full pages over a ``PagePool`` (+ an optional host tier)."""

    def __init__(self, pool: PagePool, hash_fn: HashFn = default_page_hash,
                 host_tier: HostSlots | None = None) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.hash_fn = hash_fn
        self.host_tier = host_tier if host_tier is not None and host_tier.num_slots > 0 else None
        pool.on_evict = self._on_device_evict
        self._by_hash: dict[Hashable, list[CachedPage]] = {}
        self._by_page: dict[int, CachedPage] = {}
        self._host_lru: OrderedDict[int, CachedPage] = OrderedDict()  # serial -> entry, oldest first
        self._pinned: set[int] = set()   # serials the tier must not evict right now
        self._serials = itertools.count(1)
        # (device page, host tier slot) copies the next step must make before it overwrites pages
        self.pending_offloads: list[tuple[int, int]] = []
        self.num_device_evictions = 0
        self.num_host_evictions = 0
        self.num_offloaded_pages = 0

    # ---------------------------------------------------------------- queries
    @property
    def num_entries(self) -> int:
        return sum(len(v) for v in self._by_hash.values())

    @property
    def num_host_pages(self) -> int:
        return len(self._host_lru)

    def entry_of_page(self, page: int) -> CachedPage | None:
        return self._by_page.get(page)

    def host_valid(self, e: CachedPage) -> bool:
        """The entry's K/V is in the host tier (its offload was handed to the runner: the
        bytes land before any later step reads them)."""
        return e.host_slot is not None and self.host_tier is not None and bool(
            self.host_tier.valid[e.host_slot])

    def usable(self, e: CachedPage) -> bool:
        return e.device_page is not None or self.host_valid(e)

    def _find(self, h: Hashable, parent: CachedPage | None, tokens: tuple[int, ...],
              extra: Hashable) -> CachedPage | None:
        ps = parent.serial if parent is not None else None
        for e in self._by_hash.get(h, ()):
            if e.parent_serial == ps and e.token_ids == tokens and e.extra == extra:
                return e
        return None

    def _page_hash(self, parent: CachedPage | None, tokens: tuple[int, ...], extra: Hashable) -> Hashable:
        return self.hash_fn(parent.hash if parent is not None else None, tokens, extra)

    def lookup(self, tokens: Sequence[int], extra: Hashable, max_pages: int) -> list[CachedPage]:
        """The longest verified run of usable cached pages covering ``tokens`` from position 0,
        at most ``max_pages`` (only full pages of ``tokens`` are looked up). No side effects."""
        ps = self.page_size
        chain: list[CachedPage] = []
        parent = None
        for i in range(min(max_pages, len(tokens) // ps)):
            toks = tuple(tokens[i * ps:(i + 1) * ps])
            e = self._find(self._page_hash(parent, toks, extra), parent, toks, extra)
            if e is None or not self.usable(e):
                break
            chain.append(e)
            parent = e
        return chain

    # ----------------------------------------------------------- registration
    def register(self, entries: list[CachedPage], page_ids: Sequence[int],
                 page_tokens: Callable[[int], tuple[int, ...]], extra: Hashable,
                 num_full_pages: int) -> None:
        """Record full pages ``len(entries) .. num_full_pages-1`` of a sequence after the step
        that computed them; ``entries`` (the sequence's content identities) grows in place.

        ``page_tokens(i)`` gives page i's token ids. A page whose content is already indexed
        reuses that entry (the sequence's own page then stays private, unless the entry has
        no device copy, in which case this page becomes it).
        """
        for i in range(len(entries), num_full_pages):
            parent = entries[i - 1] if i else None
            toks = page_tokens(i)
            h = self._page_hash(parent, toks, extra)
            e = self._find(h, parent, toks, extra)
            if e is None:
                e = CachedPage(next(self._serials), h, parent.serial if parent else None, toks, extra)
                self._by_hash.setdefault(h, []).append(e)
            page = page_ids[i]
            if e.device_page is None and page not in self._by_page:
                self.attach_device(e, page)
            entries.append(e)

    def attach_device(self, e: CachedPage, page: int) -> None:
        """``page`` (owned by a request) now holds ``e``'s K/V (computed or being loaded)."""
        e.device_page = page
        self._by_page[page] = e
        self.pool.mark_cached(page)
        if e.host_slot is not None:
            self._host_lru.move_to_end(e.serial)

    # ---------------------------------------------------------------- eviction
    def _on_device_evict(self, page: int) -> None:
        e = self._by_page.pop(page, None)
        if e is None:
            return
        e.device_page = None
        self.num_device_evictions += 1
        if self.host_tier is not None:
            if e.host_slot is not None:  # already in the tier (inclusive): just refresh
                self._host_lru.move_to_end(e.serial)
                return
            slot = self._reserve_host_slot()
            if slot is not None:
                e.host_slot = slot
                self._host_lru[e.serial] = e
                self.pending_offloads.append((page, slot))
                self.num_offloaded_pages += 1
                return
        self._unindex(e)

    def _reserve_host_slot(self) -> int | None:
        tier = self.host_tier
        if tier.num_free:
            return tier.allocate(1)[0]
        for serial, victim in self._host_lru.items():  # LRU first; skip offloads not yet queued
            if serial not in self._pinned and tier.valid[victim.host_slot]:
                break
        else:
            return None
        del self._host_lru[serial]
        slot, victim.host_slot = victim.host_slot, None
        self.num_host_evictions += 1
        if victim.device_page is None:
            self._unindex(victim)
        tier.free([slot])
        return tier.allocate(1)[0]

    def pin(self, entries: Sequence[CachedPage]) -> None:
        """Keep these entries' host slots until the step has read them (``unpin`` after)."""
        self._pinned.update(e.serial for e in entries)

    def unpin(self) -> None:
        self._pinned.clear()

    def touch_host(self, e: CachedPage) -> None:
        if e.host_slot is not None:
            self._host_lru.move_to_end(e.serial)

    def _unindex(self, e: CachedPage) -> None:
        bucket = self._by_hash.get(e.hash)
        if bucket is not None:
            bucket[:] = [x for x in bucket if x is not e]
            if not bucket:
                del self._by_hash[e.hash]

    def take_offloads(self) -> list[tuple[int, int]]:
        """The (device page, tier slot) offloads queued since the last call; the caller
        schedules them (``KVCacheManager.take_transfers``, which marks the slots valid)."""
        out, self.pending_offloads = self.pending_offloads, []
        return out

    def reset(self) -> int:
        """Forget every cached page no request holds (device LRU pages and the whole host
        tier); pages in use stay cached. Call between steps. Returns device pages dropped."""
        dropped = self.pool.drop_cached()
        for p in dropped:
            e = self._by_page.pop(p)
            e.device_page = None
        if self.host_tier is not None:
            for e in self._host_lru.values():
                self.host_tier.free([e.host_slot])
                e.host_slot = None
            self._host_lru.clear()
        for e in [e for bucket in self._by_hash.values() for e in bucket]:
            if e.device_page is None and e.host_slot is None:
                self._unindex(e)
        return len(dropped)

    # ------------------------------------------------------------------ tests
    def check_invariants(self) -> None:
        for page, e in self._by_page.items():
            if e.device_page != page or not self.pool.cached[page]:
                raise AssertionError(f"page {page} is indexed for entry {e.serial} but the entry "
                                     f"says {e.device_page} / pool cached={self.pool.cached[page]}")
        flagged = set(int(p) for p in self.pool.cached.nonzero()[0])
        if flagged != set(self._by_page):
            raise AssertionError(f"pool cached flags {sorted(flagged ^ set(self._by_page))} "
                                 f"disagree with the index")
        indexed = [e for bucket in self._by_hash.values() for e in bucket]
        for e in indexed:
            if e.device_page is None and e.host_slot is None:
                raise AssertionError(f"entry {e.serial} is indexed but lives nowhere")
        if self.host_tier is not None:
            self.host_tier.check_invariants()
            slots = [e.host_slot for e in self._host_lru.values()]
            if len(set(slots)) != len(slots) or len(slots) != self.host_tier.num_used:
                raise AssertionError("host tier slots and entries disagree")
