"""HostPages: the runner's half of the host KV stores: the page data, per store name and slot.

Where it sits: inside the runner's ``KVPageMover`` (and the model-free test runner). The
scheduler picks slots (``HostSlots``, jserve/host_kv.py) and sends the moves as plain values;
the runner carries them out against this holder while it dispatches the step::

    to_host   (page, store, slot):  put(store, slot, gathered page)
    from_host (store, slot, page):  get(store, slot) -> scattered into the pool

A page is whatever the runner moves: in the engine a ``jax.Array`` in the device's host memory
space (``pinned_host`` on GPU), in model-free tests a numpy array. The holder never learns of
frees: a freed slot keeps its last page until a later ``put`` replaces it (at most the
configured slot count of pages is ever held); the scheduler never reads a slot it has not
moved a page into since the slot was reserved. Getting a slot nothing was ever put into is a
bug and raises ``AssertionError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class HostPages:
    """Per store name, ``num_slots[name]`` slots of page data (see the module docstring)."""

    def __init__(self, num_slots: Mapping[str, int]) -> None:
        self.num_slots = {name: int(n) for name, n in num_slots.items()}
        if any(n < 0 for n in self.num_slots.values()):
            raise ValueError(f"slot counts must be >= 0, got {self.num_slots}")
        self._pages: dict[str, dict[int, Any]] = {name: {} for name in self.num_slots}

    def __bool__(self) -> bool:
        """Any host slot at all (host moves can happen)."""
        return any(self.num_slots.values())

    def _slots(self, store: str, slot: int) -> dict[int, Any]:
        pages = self._pages.get(store)
        if pages is None:
            raise AssertionError(f"no host store {store!r} (stores: {sorted(self._pages)})")
        if not 0 <= slot < self.num_slots[store]:
            raise AssertionError(f"{store}: slot {slot} outside [0, {self.num_slots[store]})")
        return pages

    def put(self, store: str, slot: int, page: Any) -> None:
        """``page`` into ``slot`` of ``store`` (replaces what the slot held)."""
        self._slots(store, slot)[slot] = page

    def get(self, store: str, slot: int) -> Any:
        """The page last put into ``slot`` of ``store`` (kept: the slot may be read again)."""
        pages = self._slots(store, slot)
        if slot not in pages:
            raise AssertionError(f"{store}: read of slot {slot} whose page was never put")
        return pages[slot]

    def __repr__(self) -> str:
        held = {name: len(p) for name, p in self._pages.items()}
        return f"HostPages(slots={self.num_slots}, held={held})"
