"""PagePool: the host-side allocator of KV cache pages.

Where it sits: the device holds one fixed KV pool ``[num_pages, page_size, ...]`` allocated at
start-up (DESIGN invariant 1). This class owns the *bookkeeping* of that pool on the host
(invariant 2): which page ids are free, and how many owners each used page has. The
``Scheduler`` allocates pages for the chunks it schedules and frees them when a request
finishes or is preempted; the page ids end up in ``Request.page_ids``, which the runner packs
as page-table rows. Nothing here touches the device.

Layout (``num_pages = 8``, two requests running)::

    page id     0      1     2     3     4     5     6     7
              +------+-----+-----+-----+-----+-----+-----+-----+
    refcount  | null |  1  |  1  |  0  |  2  |  0  |  1  |  0  |
              +------+-----+-----+-----+-----+-----+-----+-----+
               never   A     A    free  A+B   free   B    free
               handed                 (shared
               out                     later)
    free list (FIFO): head -> 3 -> 5 -> 7 -> tail    num_total = 7, num_free = 3, num_used = 4

Invariants (``check_invariants``):
  * page 0 is the null page: refcount 0, never in the free list, never handed out. Padded
    tokens of a step write there and nothing reads it.
  * every page 1..num_pages-1 is exactly one of: free (in the free list once, refcount 0) or
    used (not in the free list, refcount > 0).

Free-list order: FIFO. ``allocate`` takes from the head, ``free`` appends at the tail, so the
page freed longest ago is reused first. That is the eviction order a prefix cache wants later
(a freed page keeps its K/V contents as long as possible), and it costs nothing now.

Shortage policy: ``allocate(n)`` raises ``OutOfPagesError`` when fewer than ``n`` pages are free
(nothing is allocated then). Callers that can react (the scheduler preempts) check
``num_free`` first; an exception can't be silently ignored the way a ``None`` can.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from numbers import Integral

import numpy as np

NULL_PAGE = 0


class OutOfPagesError(RuntimeError):
    """``allocate`` asked for more pages than are free."""


class PagePool:
    """A fixed pool of ``num_pages`` KV pages of ``page_size`` tokens; page 0 is reserved.

    refcounts: int32[num_pages]   owners per page (0 = free, and always 0 for the null page)
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
        self._free: deque[int] = deque(range(1, num_pages))

    # ------------------------------------------------------------------ sizes
    @property
    def num_total(self) -> int:
        """Usable pages (the null page excluded)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_total - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        """Tokens the usable pages hold: the longest sequence that could ever fit alone."""
        return self.num_total * self.page_size

    def pages_needed(self, num_tokens: int) -> int:
        """Pages covering positions ``[0, num_tokens)``: ``ceil(num_tokens / page_size)``."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.page_size)

    # ------------------------------------------------------------ alloc / free
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free pages (refcount 0 -> 1). Raises ``OutOfPagesError`` on shortage."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} pages, only {len(self._free)} of {self.num_total} free")
        pages = [self._free.popleft() for _ in range(n)]
        self.refcounts[pages] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """Add one owner to each (used) page: for sharing a page between requests."""
        pages = list(pages)
        for p in pages:
            self._check_id(p)
            if self.refcounts[p] <= 0:
                raise ValueError(f"incref of page {p}, which is free")
        for p in pages:
            self.refcounts[p] += 1

    def free(self, pages: Iterable[int]) -> None:
        """Drop one owner of each page; a page whose count reaches 0 goes to the free list tail.

        All-or-nothing: every id is validated (null page, a free page, more drops than owners)
        before any count changes.
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
                self._free.append(p)

    def _check_id(self, p: int) -> None:
        if p == NULL_PAGE:
            raise ValueError("page 0 is the null page: it is never allocated, shared or freed")
        if not 0 < p < self.num_pages:
            raise ValueError(f"page id {p} out of range [1, {self.num_pages})")

    # ------------------------------------------------------------------ tests
    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the free list and the refcounts disagree (for tests)."""
        free = list(self._free)
        if len(set(free)) != len(free):
            dup = sorted(p for p, c in Counter(free).items() if c > 1)
            raise AssertionError(f"pages in the free list more than once: {dup}")
        if NULL_PAGE in free:
            raise AssertionError("the null page is in the free list")
        if self.refcounts[NULL_PAGE] != 0:
            raise AssertionError(f"the null page has refcount {self.refcounts[NULL_PAGE]}")
        if (self.refcounts < 0).any():
            raise AssertionError(f"negative refcounts at pages {np.flatnonzero(self.refcounts < 0).tolist()}")
        is_free = np.zeros(self.num_pages, dtype=bool)
        is_free[free] = True
        bad_free = np.flatnonzero(is_free & (self.refcounts != 0))
        if bad_free.size:
            raise AssertionError(f"free pages with refcount != 0: {bad_free.tolist()}")
        lost = np.flatnonzero(~is_free & (self.refcounts == 0))
        lost = lost[lost != NULL_PAGE]
        if lost.size:
            raise AssertionError(f"pages neither free nor used (leaked): {lost.tolist()}")

    def __repr__(self) -> str:
        return (f"PagePool(num_pages={self.num_pages}, page_size={self.page_size}, "
                f"free={self.num_free}, used={self.num_used})")
