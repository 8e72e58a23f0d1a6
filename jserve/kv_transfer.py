"""KVPageMover: the device side of page moves (copy-on-write, swap, host-tier offload/load).

Where it sits: inside ``Runner.execute``, around the jitted step. The scheduler's
``KVTransfers`` say which pages move; this class moves them with three small jitted
functions over the whole pool (every layer at once), each compiled for a few bucketed page
counts at warm-up, so serving never compiles (DESIGN invariant 4)::

    begin(kv, transfers)                                   before the step is dispatched
      to_host:   gather(kv, ids[B]) -> [B, L, 2, ps, Hkv, d] ; copy_to_host_async()
      copies:    kv = copy(kv, src[B], dst[B])             (kv donated; in place)
      from_host: data = store.read(slots) -> ONE device_put -> kv = scatter(kv, ids[B], data)
    step_fn(params, kv, batch) ...                         the device-to-host copy overlaps it
    finish(handle)                                         gathered bytes -> HostPageStore.write

Buckets are powers of 4 (1, 4, 16, 64, 256); n pages go in calls of the largest bucket that
fits what is left (70 = 64 + 4 + 1 + 1), so nothing is padded and no byte moves twice.
(Warm-up runs each bucket on page 0, the null page, which nothing reads.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jserve.host_kv import HostPageStore
from jserve.kv_cache import KVCache
from jserve.scheduler_output import KVTransfers

MAX_TRANSFER_BUCKET = 256


def transfer_buckets(max_pages: int) -> tuple[int, ...]:
    """Powers of 4 from 1 up to the first >= ``max_pages`` (capped at 256)."""
    out, b = [1], 1
    while b < min(max_pages, MAX_TRANSFER_BUCKET):
        b *= 4
        out.append(min(b, MAX_TRANSFER_BUCKET))
    return tuple(out)


def _gather(kv: KVCache, ids: jax.Array) -> jax.Array:
    """ids: int32[B] -> [B, L, 2, page_size, Hkv, d] (K and V of every layer per page)."""
    return jnp.stack([jnp.stack([k[ids], v[ids]], axis=1) for k, v in kv], axis=1)


def _copy(kv: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    """Page ``src[i]`` -> page ``dst[i]`` in every layer; src/dst: int32[B]."""
    return [(k.at[dst].set(k[src]), v.at[dst].set(v[src])) for k, v in kv]


def _scatter(kv: KVCache, ids: jax.Array, data: jax.Array) -> KVCache:
    """data: [B, L, 2, page_size, Hkv, d] -> pages ``ids`` int32[B]."""
    return [(k.at[ids].set(data[:, i, 0].astype(k.dtype)), v.at[ids].set(data[:, i, 1].astype(v.dtype)))
            for i, (k, v) in enumerate(kv)]


def page_shape(kv: KVCache) -> tuple[int, ...]:
    """Shape of one page in host memory: (L, 2, page_size, Hkv, d)."""
    _, ps, h, d = kv[0][0].shape
    return (len(kv), 2, ps, h, d)


class KVPageMover:
    """Compiled page gather / copy / scatter over one KV pool (see the module docstring)."""

    def __init__(self, kv: KVCache, max_pages: int, replicated: jax.sharding.Sharding,
                 host_moves: bool) -> None:
        shardings = [(k.sharding, v.sharding) for k, v in kv]
        self.buckets = transfer_buckets(max_pages)
        self.host_moves = host_moves
        self._replicated = replicated
        self._page_shape = page_shape(kv)
        self._dtype = np.dtype(kv[0][0].dtype)
        self._gather = jax.jit(_gather)
        self._copy = jax.jit(_copy, donate_argnums=(0,), out_shardings=shardings)
        self._scatter = jax.jit(_scatter, donate_argnums=(0,), out_shardings=shardings)

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        """[0, n) -> (start, stop) pieces, each exactly one bucket long, largest first."""
        out, start = [], 0
        while start < n:
            b = max(b for b in self.buckets if b <= n - start)
            out.append((start, start + b))
            start += b
        return out

    @staticmethod
    def _ids(values: list[int]) -> np.ndarray:
        return np.asarray(values, np.int32)

    def begin(self, kv: KVCache, t: KVTransfers) -> tuple[KVCache, Any]:
        """Dispatch this step's page moves (reads first); -> (kv, handle for ``finish``)."""
        gathered = []
        pages = [p for p, _, _ in t.to_host]
        for a, b in self._chunks(len(pages)):
            g = self._gather(kv, self._ids(pages[a:b]))
            g.copy_to_host_async()
            gathered.append(g)
        for a, b in self._chunks(len(t.copies)):
            src = self._ids([s for s, _ in t.copies[a:b]])
            dst = self._ids([d for _, d in t.copies[a:b]])
            kv = self._copy(kv, src, dst)
        if t.from_host:
            data = _read_grouped([(store, slot) for store, slot, _ in t.from_host], self._page_shape,
                                 self._dtype)
            dst_pages = [p for _, _, p in t.from_host]
            for a, b in self._chunks(len(dst_pages)):
                ids, chunk = jax.device_put((self._ids(dst_pages[a:b]), data[a:b]), self._replicated)
                kv = self._scatter(kv, ids, chunk)
        return kv, (t.to_host, gathered)

    def finish(self, handle: Any) -> None:
        """Wait for the gathered pages and write them into their host slots."""
        to_host, gathered = handle
        if not to_host:
            return
        # Page i of the move is row i - offset of the gathered chunk it landed in; each page
        # is copied once, straight from the transferred chunk into its host slot.
        chunks = [np.asarray(g) for g in gathered]
        starts = np.cumsum([0] + [len(c) for c in chunks])
        for (_, store, slot), i in zip(to_host, range(len(to_host)), strict=True):
            c = int(np.searchsorted(starts, i, side="right")) - 1
            store.write_rows([slot], chunks[c], [i - int(starts[c])])

    def warmup(self, kv: KVCache) -> KVCache:
        """Compile (and run once, on the null page) every bucket of every move."""
        for bucket in self.buckets:
            ids = np.zeros(bucket, np.int32)
            kv = self._copy(kv, ids, ids)
            if self.host_moves:
                jax.block_until_ready(self._gather(kv, ids))
                data_zero = np.zeros((bucket, *self._page_shape), self._dtype)
                kv = self._scatter(kv, *jax.device_put((ids, data_zero), self._replicated))
        return kv


def _read_grouped(sources: list[tuple[HostPageStore, int]], shape: tuple[int, ...],
                  dtype: np.dtype) -> np.ndarray:
    """The pages of ``sources`` (any mix of stores) in order, each copied once."""
    out = np.empty((len(sources), *shape), dtype)
    by_store: dict[int, tuple[HostPageStore, list[int], list[int]]] = {}
    for i, (store, slot) in enumerate(sources):
        by_store.setdefault(id(store), (store, [], []))
        by_store[id(store)][1].append(slot)
        by_store[id(store)][2].append(i)
    for store, slots, rows in by_store.values():
        store.read_into(slots, out, rows)  # one copy per page, straight into place
    return out
