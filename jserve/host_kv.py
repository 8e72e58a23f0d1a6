"""HostPageStore: KV pages in host memory (the swap space and the host KV tier both use one).

Where it sits: beside the device pool. The ``KVCacheManager`` decides, on the host, which
slot a page goes to or comes from (``allocate`` / ``free``) while it schedules a step; the
runner moves the bytes while it dispatches that step (``KVPageMover``)::

    schedule():  slot = store.allocate(1)          bookkeeping only, no page there yet
    execute():   store.put(slot, page)             device -> host copy *dispatched* (async)
                 page = store.get(slot)            host -> device copy of it, later (async)

A slot holds one page object: in the engine a ``jax.Array`` in the device's host memory
space (``pinned_host`` on GPU), so both directions are DMA copies that JAX orders by data
dependence and nothing waits on the host; in model-free tests a numpy array. A slot is
*valid* once a page was put into it; getting a slot that is not valid is a bug (an
``AssertionError``), and a prefix-cache lookup never counts a slot that is not valid.

``page_shape`` / ``dtype`` describe one page, ``(num_layers, 2, page_size, num_kv_heads,
head_dim)`` for the model's KV; the store is sized in whole pages of that many bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def slots_for_bytes(num_bytes: float, bytes_per_page: int) -> int:
    """Whole pages that fit in ``num_bytes`` of host memory."""
    if bytes_per_page <= 0:
        raise ValueError(f"bytes_per_page must be positive, got {bytes_per_page}")
    return max(0, int(num_bytes // bytes_per_page))


class HostPageStore:
    """``num_slots`` host page slots of ``page_shape`` (numpy ``dtype``) with a free list.

    valid: bool[num_slots]   a page was put into the slot (and it was not freed since)
    """

    def __init__(self, num_slots: int, page_shape: tuple[int, ...], dtype: np.dtype | str,
                 name: str = "host") -> None:
        if num_slots < 0:
            raise ValueError(f"{name}: num_slots must be >= 0, got {num_slots}")
        self.name = name
        self.num_slots = int(num_slots)
        self.page_shape = tuple(int(d) for d in page_shape)
        self.dtype = np.dtype(dtype)
        self.valid = np.zeros(self.num_slots, dtype=bool)
        self._free: list[int] = list(range(self.num_slots - 1, -1, -1))  # a stack: low ids first
        self._in_use = np.zeros(self.num_slots, dtype=bool)
        self._pages: dict[int, Any] = {}

    @property
    def bytes_per_page(self) -> int:
        return int(np.prod(self.page_shape)) * self.dtype.itemsize

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    # ------------------------------------------------------------ bookkeeping
    def allocate(self, n: int) -> list[int]:
        """Reserve ``n`` slots (not valid until a page is put). Raises ``ValueError`` on shortage."""
        if n < 0 or n > len(self._free):
            raise ValueError(f"{self.name}: cannot allocate {n} slots, {len(self._free)} of "
                             f"{self.num_slots} free")
        slots = [self._free.pop() for _ in range(n)]
        self._in_use[slots] = True
        return slots

    def free(self, slots: Iterable[int]) -> None:
        """Give slots back; their pages are dropped (the host memory is released)."""
        slots = list(slots)
        if len(set(slots)) != len(slots) or not all(self._in_use[s] for s in slots):
            raise ValueError(f"{self.name}: free of slots {slots} that are not all reserved once")
        self._in_use[slots] = False
        self.valid[slots] = False
        for s in slots:
            self._pages.pop(s, None)
        self._free.extend(reversed(slots))

    # ------------------------------------------------------------------ pages
    def put(self, slot: int, page: Any) -> None:
        """``page`` (shape ``page_shape``) into a reserved ``slot``, which becomes valid."""
        if not self._in_use[slot]:
            raise AssertionError(f"{self.name}: put into unreserved slot {slot}")
        if tuple(page.shape) != self.page_shape:
            raise ValueError(f"{self.name}: page of shape {tuple(page.shape)}, expected "
                             f"{self.page_shape}")
        self._pages[slot] = page
        self.valid[slot] = True

    def get(self, slot: int) -> Any:
        """The page in ``slot`` (the store keeps it: the slot may be read again)."""
        if not self.valid[slot]:
            raise AssertionError(f"{self.name}: read of slot {slot} whose page was never put")
        return self._pages[slot]

    # ------------------------------------------------------------------ tests
    def check_invariants(self) -> None:
        free = self._free
        if len(set(free)) != len(free) or self._in_use[free].any():
            raise AssertionError(f"{self.name}: free list and reservations disagree")
        if int(self._in_use.sum()) + len(free) != self.num_slots:
            raise AssertionError(f"{self.name}: slots leaked")
        if (self.valid & ~self._in_use).any():
            raise AssertionError(f"{self.name}: free slots marked valid")
        if sorted(self._pages) != np.flatnonzero(self.valid).tolist():
            raise AssertionError(f"{self.name}: stored pages and valid slots disagree")

    def __repr__(self) -> str:
        return (f"HostPageStore({self.name!r}, slots={self.num_slots}, used={self.num_used}, "
                f"{self.bytes_per_page} B/page)")
