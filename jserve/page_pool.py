"""PagePool: the host-side allocator of KV cache pages (with room for prefix-cached pages).

Where it sits: the device holds one fixed KV pool ``[num_pages, page_size, ...]`` allocated at
start-up (DESIGN invariant 1). This class owns the *bookkeeping* of that pool on the host
(invariant 2): which page ids are free, how many owners each used page has, and which
unowned pages still hold prefix-cached K/V. The ``KVCacheManager`` allocates pages for the
chunks the scheduler picks and frees them when a request finishes or is preempted; the page
ids end up in ``Request.page_ids``, which the runner packs as page-table rows. Nothing here
touches the device; what a cached page *contains* is the ``PrefixCache``'s business.

Layout (``num_pages = 8``, two requests running, one finished request left cached pages)::

    page id     0      1     2     3     4     5     6     7
              +------+-----+-----+-----+-----+-----+-----+-----+
    refcount  | null |  1  |  1  |  0  |  2  |  0  |  1  |  0  |
    cached    |      |  c  |     |  c  |  c  |     |     |  c  |
              +------+-----+-----+-----+-----+-----+-----+-----+
               never   A     A   evict  A+B  empty   B   evict
               handed               able (shared)            able
    empty (FIFO):     head -> 5 -> tail
    evictable (LRU):  oldest -> 7 -> 3 -> newest
    num_total = 7 = num_empty 1 + num_evictable 2 + num_used 4;   num_free = 1 + 2 = 3

Every page 1..num_pages-1 is exactly one of (``check_invariants``):
  * **empty**: refcount 0, holds nothing worth keeping, in the FIFO ``empty`` list once;
  * **evictable**: refcount 0 but still holds cached K/V (``cached``), in the LRU list once;
    a prefix-cache hit takes it back (``incref``: 0 -> 1) without any copy;
  * **used**: refcount > 0 (cached or not), in neither list.
Page 0 is the null page: refcount 0, in no list, never handed out. Padded tokens write there.

Allocation order: ``allocate`` takes empty pages first (FIFO: the page freed longest ago), then
evicts the least recently used evictable page, telling ``on_evict(page)`` so the prefix cache
can forget it (or move it to the host tier) before the page is overwritten. ``num_free``
counts both kinds: it is what an allocation can get (vLLM's "free blocks" include cached ones).

Shortage policy: ``allocate(n)`` raises ``OutOfPagesError`` when fewer than ``n`` pages are free
(nothing is allocated then). Callers that can react (the scheduler preempts) check
``num_free`` first; an exception can't be silently ignored the way a ``None`` can.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from numbers import Integral

import numpy as np

NULL_PAGE = 0


class OutOfPagesError(RuntimeError):
    """``allocate`` asked for more pages than are free."""


class PagePool:
    """A fixed pool of ``num_pages`` KV pages of ``page_size`` tokens; page 0 is reserved.

    refcounts: int32[num_pages]   owners per page (0 = empty or evictable; always 0 for page 0)
    cached:    bool[num_pages]    the page holds K/V the prefix cache has registered
    on_evict:  called with a page id when ``allocate`` evicts a cached page (before reuse)
    """

    def __init__(self, num_pages: int, page_size: int) -> None:
        if not isinstance(num_pages, Integral) or num_pages < 2:
            raise ValueError(
                f"num_pages must be an integer >= 2 (page 0 is the null page), got {num_pages!r}")
        if not isinstance(page_size, Integral) or page_size < 1:
            raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        self.refcounts = np.zeros(num_pages, dtype=np.int32)
        self.cached = np.zeros(num_pages, dtype=bool)
        self._empty: deque[int] = deque(range(1, num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.on_evict: Callable[[int], None] | None = None
        self.num_evictions = 0  # cached pages evicted by allocate (monotonic; a metric)

    # ------------------------------------------------------------------ sizes
    @property
    def num_total(self) -> int:
        """Usable pages (the null page excluded)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        """Pages an allocation can get now: empty + evictable."""
        return len(self._empty) + len(self._evictable)

    @property
    def num_empty(self) -> int:
        return len(self._empty)

    @property
    def num_evictable(self) -> int:
        """Unowned pages that still hold prefix-cached K/V."""
        return len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_total - self.num_free

    @property
    def capacity_tokens(self) -> int:
        """Tokens the usable pages hold: the longest sequence that could ever fit alone."""
        return self.num_total * self.page_size

    def pages_needed(self, num_tokens: int) -> int:
        """Pages covering positions ``[0, num_tokens)``: ``ceil(num_tokens / page_size)``."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.page_size)

    def is_evictable(self, page: int) -> bool:
        return page in self._evictable

    # ------------------------------------------------------------ alloc / free
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` pages (refcount -> 1): empty ones first, then LRU evictions.

        Raises ``OutOfPagesError`` on shortage (nothing allocated then).
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > self.num_free:
            raise OutOfPagesError(f"asked for {n} pages, only {self.num_free} of {self.num_total} free")
        pages = []
        for _ in range(n):
            if self._empty:
                pages.append(self._empty.popleft())
                continue
            p, _ = self._evictable.popitem(last=False)
            self.cached[p] = False
            self.num_evictions += 1
            if self.on_evict is not None:
                self.on_evict(p)
            pages.append(p)
        self.refcounts[pages] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """Add one owner to each page: sharing a used page, or taking back an evictable one."""
        pages = list(pages)
        for p in pages:
            self._check_id(p)
            if self.refcounts[p] <= 0 and p not in self._evictable:
                raise ValueError(f"incref of page {p}, which is free and holds no cached K/V")
        for p in pages:
            if self.refcounts[p] == 0:
                del self._evictable[p]
            self.refcounts[p] += 1

    def free(self, pages: Iterable[int]) -> None:
        """Drop one owner of each page. At refcount 0 a cached page becomes evictable (newest
        in LRU order), any other page goes to the empty list's tail.

        All-or-nothing: every id is validated (null page, an unowned page, more drops than
        owners) before any count changes. Free a request's pages tail first (``reversed``):
        its last pages are then evicted before its first ones, which more requests share.
        """
        pages = list(pages)
        for p, times in Counter(pages).items():
            self._check_id(p)
            if self.refcounts[p] < times:
                what = "a free page" if self.refcounts[p] == 0 else f"refcount {self.refcounts[p]}"
                raise ValueError(f"free of page {p} {times} time(s), but it is {what}")
        for p in pages:
            self.refcounts[p] -= 1
            if self.refcounts[p] == 0:
                if self.cached[p]:
                    self._evictable[p] = None
                else:
                    self._empty.append(p)

    def mark_cached(self, page: int) -> None:
        """Flag a used page as holding prefix-cached K/V (it becomes evictable when freed)."""
        self._check_id(page)
        if self.refcounts[page] <= 0:
            raise ValueError(f"mark_cached of page {page}, which is not in use")
        self.cached[page] = True

    def drop_cached(self, pages: Iterable[int] | None = None) -> list[int]:
        """Turn evictable pages (all when ``pages`` is None) back into empty ones, without
        calling ``on_evict``; returns them. Used pages stay cached. For cache resets."""
        chosen = list(self._evictable) if pages is None else [p for p in pages if p in self._evictable]
        for p in chosen:
            del self._evictable[p]
            self.cached[p] = False
            self._empty.append(p)
        return chosen

    def _check_id(self, p: int) -> None:
        if p == NULL_PAGE:
            raise ValueError("page 0 is the null page: it is never allocated, shared or freed")
        if not 0 < p < self.num_pages:
            raise ValueError(f"page id {p} out of range [1, {self.num_pages})")

    # ------------------------------------------------------------------ tests
    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the lists, refcounts and cached flags disagree."""
        empty, evictable = list(self._empty), list(self._evictable)
        both = empty + evictable
        if len(set(both)) != len(both):
            dup = sorted(p for p, c in Counter(both).items() if c > 1)
            raise AssertionError(f"pages in the free lists more than once: {dup}")
        if NULL_PAGE in both:
            raise AssertionError("the null page is in a free list")
        if self.refcounts[NULL_PAGE] != 0 or self.cached[NULL_PAGE]:
            raise AssertionError(f"the null page has refcount {self.refcounts[NULL_PAGE]} "
                                 f"or is cached")
        if (self.refcounts < 0).any():
            raise AssertionError(f"negative refcounts at pages {np.flatnonzero(self.refcounts < 0).tolist()}")
        is_free = np.zeros(self.num_pages, dtype=bool)
        is_free[both] = True
        bad_free = np.flatnonzero(is_free & (self.refcounts != 0))
        if bad_free.size:
            raise AssertionError(f"free pages with refcount != 0: {bad_free.tolist()}")
        lost = np.flatnonzero(~is_free & (self.refcounts == 0))
        lost = lost[lost != NULL_PAGE]
        if lost.size:
            raise AssertionError(f"pages neither free nor used (leaked): {lost.tolist()}")
        bad_empty = [p for p in empty if self.cached[p]]
        if bad_empty:
            raise AssertionError(f"empty pages flagged cached: {bad_empty}")
        bad_evictable = [p for p in evictable if not self.cached[p]]
        if bad_evictable:
            raise AssertionError(f"evictable pages not flagged cached: {bad_evictable}")

    def __repr__(self) -> str:
        return (f"PagePool(num_pages={self.num_pages}, page_size={self.page_size}, "
                f"empty={self.num_empty}, evictable={self.num_evictable}, used={self.num_used})")
