"""HostPageStore: KV pages in host memory (the swap space and the host KV tier both use one).

Where it sits: beside the device pool. The ``KVCacheManager`` decides, on the host, which
slot a page goes to or comes from (``allocate`` / ``free``) while it schedules a step; the
runner moves the bytes during that step (``read`` before the forward, ``write`` after it)::

    schedule():  slot = store.allocate(1)          bookkeeping only, data not there yet
    execute():   data = store.read(slots_in)       host -> device (before the forward)
                 ... forward ...
                 store.write(slots_out, gathered)  device -> host (marks the slots valid)

A slot is *valid* once its bytes have landed; reading a slot that is not valid is a bug (an
``AssertionError``), and a prefix-cache lookup never counts a slot that is not valid yet.

Layout: one numpy array ``[num_slots, *page_shape]``; for the model's KV ``page_shape`` is
``(num_layers, 2, page_size, num_kv_heads, head_dim)`` (K and V of every layer of one page,
contiguous). The array is created on the first write, so an unused store costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def slots_for_bytes(num_bytes: float, bytes_per_page: int) -> int:
    """Whole pages that fit in ``num_bytes`` of host memory."""
    if bytes_per_page <= 0:
        raise ValueError(f"bytes_per_page must be positive, got {bytes_per_page}")
    return max(0, int(num_bytes // bytes_per_page))


class HostPageStore:
    """``num_slots`` host page slots of ``page_shape`` (numpy ``dtype``) with a free list.

    valid: bool[num_slots]   the slot's bytes have been written (and not freed since)
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
        self._data: np.ndarray | None = None

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
        """Reserve ``n`` slots (not valid until written). Raises ``ValueError`` on shortage."""
        if n < 0 or n > len(self._free):
            raise ValueError(f"{self.name}: cannot allocate {n} slots, {len(self._free)} of "
                             f"{self.num_slots} free")
        slots = [self._free.pop() for _ in range(n)]
        self._in_use[slots] = True
        return slots

    def free(self, slots: Iterable[int]) -> None:
        slots = list(slots)
        if len(set(slots)) != len(slots) or not all(self._in_use[s] for s in slots):
            raise ValueError(f"{self.name}: free of slots {slots} that are not all reserved once")
        self._in_use[slots] = False
        self.valid[slots] = False
        self._free.extend(reversed(slots))

    # ------------------------------------------------------------------ bytes
    def write(self, slots: list[int], data: np.ndarray) -> None:
        """data: [len(slots), *page_shape] -> the slots, which become valid."""
        if data.shape != (len(slots), *self.page_shape):
            raise ValueError(f"{self.name}: write of shape {data.shape} into {len(slots)} slots of "
                             f"{self.page_shape}")
        self.write_rows(slots, data, range(len(slots)))

    def write_rows(self, slots: list[int], src: np.ndarray, rows: Iterable[int]) -> None:
        """``src[rows[i]]`` -> slot ``slots[i]``, one contiguous page copy each (fancy indexing
        of a whole batch was 2x slower: a generic strided copy, measured on 2 MiB pages)."""
        if not all(self._in_use[s] for s in slots):
            raise AssertionError(f"{self.name}: write into unreserved slots {slots}")
        if self._data is None:
            self._data = np.empty((self.num_slots, *self.page_shape), self.dtype)
        for slot, row in zip(slots, rows, strict=True):
            self._data[slot] = src[row]
        self.valid[slots] = True

    def read(self, slots: list[int]) -> np.ndarray:
        """-> a copy [len(slots), *page_shape] (never a view: the slots may be reused)."""
        out = np.empty((len(slots), *self.page_shape), self.dtype)
        self.read_into(slots, out, range(len(slots)))
        return out

    def read_into(self, slots: list[int], out: np.ndarray, rows: Iterable[int]) -> None:
        """slot ``slots[i]`` -> ``out[rows[i]]``, one contiguous page copy each."""
        bad = [s for s in slots if not self.valid[s]]
        if bad:
            raise AssertionError(f"{self.name}: read of slots {bad} whose data has not landed")
        for slot, row in zip(slots, rows, strict=True):
            out[row] = self._data[slot]

    # ------------------------------------------------------------------ tests
    def check_invariants(self) -> None:
        free = self._free
        if len(set(free)) != len(free) or self._in_use[free].any():
            raise AssertionError(f"{self.name}: free list and reservations disagree")
        if int(self._in_use.sum()) + len(free) != self.num_slots:
            raise AssertionError(f"{self.name}: slots leaked")
        if (self.valid & ~self._in_use).any():
            raise AssertionError(f"{self.name}: free slots marked valid")

    def __repr__(self) -> str:
        return (f"HostPageStore({self.name!r}, slots={self.num_slots}, used={self.num_used}, "
                f"{self.bytes_per_page} B/page)")
