"""Host KV stores, the scheduler's half: how many slots each store has, and which are in use.

Where it sits: beside the device pool, on the scheduling side. The swap space (``"swap"``) and
the host KV tier (``"tier"``) are each a named store of whole-page slots in host memory. The
``KVCacheManager`` (and the ``PrefixCache`` for the tier) decides here which slot a page goes
to or comes from while it schedules a step; the page moves reach the runner as plain values
``(page, store name, slot)`` / ``(store name, slot, page)`` in ``KVTransfers``, and the runner
keeps the page data itself (``HostPages``, jserve/host_pages.py)::

    schedule():  slot = slots.allocate(1)[0]             bookkeeping only
                 to_host (page, "swap", slot)            slot marked valid here
    dispatch():  pages.put("swap", slot, gathered page)  device -> host copy dispatched (async)
                 pages.get("swap", slot) -> device        later step, ordered by data dependence

A slot is *valid* from the schedule that queues its ``to_host`` move until it is freed: the
bytes land before any later step reads them, because the runner dispatches every read of a
slot after the copy into it and JAX orders the two by data dependence. A prefix-cache lookup
never counts a slot that is not valid (its offload is not queued yet).

Both halves are sized by ``host_slot_counts(config)``, so they always agree.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from jserve.config import EngineConfig
from jserve.kv_cache import kv_bytes_per_token, kv_scale_bytes_per_page

SWAP = "swap"  # preempted requests' pages (preemption_mode="swap", swap_space_gb)
TIER = "tier"  # the prefix cache's host tier (enable_prefix_caching, host_kv_cache_gb)


def slots_for_bytes(num_bytes: float, bytes_per_page: int) -> int:
    """Whole pages that fit in ``num_bytes`` of host memory."""
    if bytes_per_page <= 0:
        raise ValueError(f"bytes_per_page must be positive, got {bytes_per_page}")
    return max(0, int(num_bytes // bytes_per_page))


def host_page_bytes(config: EngineConfig) -> int:
    """Bytes of one host page: every layer, K and V, every kv head (a whole page, not a shard)."""
    return (kv_bytes_per_token(config.model, config.kv_dtype, 1) * config.cache.page_size
            + kv_scale_bytes_per_page(config.model, config.kv_dtype, 1))


def host_slot_counts(config: EngineConfig) -> dict[str, int]:
    """Slots of each host store the config enables: store name -> count, stores with at least
    one slot only. The one sizing rule: the manager's ``HostSlots`` and the runner's
    ``HostPages`` are both built from it."""
    cache = config.cache
    gib = {}
    if cache.preemption_mode == "swap":
        gib[SWAP] = cache.swap_space_gb
    if cache.enable_prefix_caching:
        gib[TIER] = cache.host_kv_cache_gb
    page_bytes = host_page_bytes(config)
    counts = {name: slots_for_bytes(gb * 2**30, page_bytes) for name, gb in gib.items()}
    return {name: n for name, n in counts.items() if n > 0}


class HostSlots:
    """``num_slots`` slots of the host store ``name``: a free list and valid flags, no data.

    valid: bool[num_slots]   a page move into the slot was scheduled (and it was not freed since)
    """

    def __init__(self, name: str, num_slots: int) -> None:
        if num_slots < 0:
            raise ValueError(f"{name}: num_slots must be >= 0, got {num_slots}")
        self.name = name
        self.num_slots = int(num_slots)
        self.valid = np.zeros(self.num_slots, dtype=bool)
        self._free: list[int] = list(range(self.num_slots - 1, -1, -1))  # a stack: low ids first
        self._in_use = np.zeros(self.num_slots, dtype=bool)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Reserve ``n`` slots (not valid until a move into them is scheduled). Raises
        ``ValueError`` on shortage."""
        if n < 0 or n > len(self._free):
            raise ValueError(f"{self.name}: cannot allocate {n} slots, {len(self._free)} of "
                             f"{self.num_slots} free")
        slots = [self._free.pop() for _ in range(n)]
        self._in_use[slots] = True
        return slots

    def mark_valid(self, slots: Iterable[int]) -> None:
        """A ``to_host`` move into each of these reserved slots was just scheduled."""
        slots = list(slots)
        if not all(self._in_use[s] for s in slots):
            raise AssertionError(f"{self.name}: move into unreserved slots {slots}")
        self.valid[slots] = True

    def free(self, slots: Iterable[int]) -> None:
        """Give slots back (the runner's copy of their pages is simply never read again)."""
        slots = list(slots)
        if len(set(slots)) != len(slots) or not all(self._in_use[s] for s in slots):
            raise ValueError(f"{self.name}: free of slots {slots} that are not all reserved once")
        self._in_use[slots] = False
        self.valid[slots] = False
        self._free.extend(reversed(slots))

    def check_invariants(self) -> None:
        free = self._free
        if len(set(free)) != len(free) or self._in_use[free].any():
            raise AssertionError(f"{self.name}: free list and reservations disagree")
        if int(self._in_use.sum()) + len(free) != self.num_slots:
            raise AssertionError(f"{self.name}: slots leaked")
        if (self.valid & ~self._in_use).any():
            raise AssertionError(f"{self.name}: free slots marked valid")

    def __repr__(self) -> str:
        return f"HostSlots({self.name!r}, slots={self.num_slots}, used={self.num_used})"
