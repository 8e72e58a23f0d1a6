"""KVPageMover: the device side of page moves (copy-on-write, swap, host-tier offload/load).

Where it sits: inside ``Runner.dispatch``, before the jitted step. The scheduler's
``KVTransfers`` say which pages move (plain values: page ids, and host slots as (store name,
slot)); this class owns the host pages (``self.host``, a ``HostPages`` with one store per name
of ``host_slot_counts(config)``) and dispatches the moves with three small jitted functions
over the whole pool (every layer at once), each compiled for a few bucketed page counts at
warm-up, so serving never compiles (DESIGN invariant 4)::

    move(kv, transfers)                                     before the step is dispatched
      to_host:   gather(kv, ids[B]) -> B pages [L, 2, ps, Hkv, d]
                 -> device_put to host memory -> host.put(store, slot, page)
      copies:    kv = copy(kv, src[B], dst[B])              (kv donated; in place)
      from_host: host.get(store, slot) x B -> device_put to device -> kv = scatter(kv, ids[B], pages)
    step_fn(params, kv, batch) ...

Nothing here waits on the host. Host pages are ``jax.Array`` s in the device's host memory
space (``pinned_host`` where the backend has it: GPU DMA at PCIe speed straight from/to the
page, no staging copy), and every transfer is an async dispatch ordered by data dependence:
a page put into a slot can be read back in the next step before its bytes have landed, and
the gather of a page that is handed out again runs before the step that overwrites it.
(Measured on an H200 with Llama-8B pages, see benchmarks/RESULTS.md: the previous numpy
store spent ~1 s per 512 MiB on host copies and a blocking wait after the step.)

Buckets are powers of 4 (1, 4, 16, 64); n pages go in calls of the largest bucket that
fits what is left (70 = 64 + 4 + 1 + 1), so nothing is padded and no byte moves twice.
(Warm-up runs each bucket on page 0, the null page, which nothing reads.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jserve.host_pages import HostPages
from jserve.kv_cache import KVCache
from jserve.scheduler_output import KVTransfers
from pallas_kernels.kv_write import scatter_rows
from sharding import host_to_global

# 64 pages per call: each page is its own host array, so larger calls gain little, and the
# activation budget holds the largest call's pages five times (jserve/activation_peak.py).
MAX_TRANSFER_BUCKET = 64
HOST_MEMORY_KINDS = ("pinned_host", "unpinned_host")


def transfer_buckets(max_pages: int) -> tuple[int, ...]:
    """Powers of 4 from 1 up to the first >= ``max_pages`` (capped at ``MAX_TRANSFER_BUCKET``)."""
    out, b = [1], 1
    while b < min(max_pages, MAX_TRANSFER_BUCKET):
        b *= 4
        out.append(min(b, MAX_TRANSFER_BUCKET))
    return tuple(out)


def _quantized(kv: KVCache) -> bool:
    return len(kv[0]) == 4


def _gather(kv: KVCache, ids: jax.Array) -> tuple:
    """ids: int32[B] -> B pages [L, 2, page_size, Hkv, d] (K and V of every layer); for an
    int8 / fp8 pool each page is (data, scales [L, 2, Hkv]): a page moves with its scales."""
    g = jnp.stack([jnp.stack([layer[0][ids], layer[1][ids]], axis=1) for layer in kv], axis=1)
    if not _quantized(kv):
        return tuple(g[i] for i in range(ids.shape[0]))
    s = jnp.stack([jnp.stack([layer[2][ids], layer[3][ids]], axis=1) for layer in kv], axis=1)
    return tuple((g[i], s[i]) for i in range(ids.shape[0]))


def _copy(kv: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    """Page ``src[i]`` -> page ``dst[i]`` in every layer (scales too); src/dst: int32[B]."""
    return [tuple(scatter_rows(a, dst, a[src]) for a in layer) for layer in kv]


def _scatter(kv: KVCache, ids: jax.Array, pages: tuple) -> KVCache:
    """pages: B x [L, 2, page_size, Hkv, d] (or (data, scales) pairs) -> pool pages ``ids``."""
    if not _quantized(kv):
        data = jnp.stack(pages)
        return [(scatter_rows(k, ids, data[:, i, 0].astype(k.dtype)),
                 scatter_rows(v, ids, data[:, i, 1].astype(v.dtype))) for i, (k, v) in enumerate(kv)]
    data = jnp.stack([p[0] for p in pages])
    sc = jnp.stack([p[1] for p in pages])
    return [(scatter_rows(k, ids, data[:, i, 0]), scatter_rows(v, ids, data[:, i, 1]),
             ks.at[ids].set(sc[:, i, 0]), vs.at[ids].set(sc[:, i, 1]))
            for i, (k, v, ks, vs) in enumerate(kv)]


def page_shape(kv: KVCache) -> tuple[int, ...]:
    """Shape of one page in host memory: (L, 2, page_size, Hkv, d); a pipelined pool's
    (L/S, 2, S, page_size, Hkv, d) (jserve/kv_cache.py)."""
    return (len(kv), 2, *kv[0][0].shape[1:])


def host_memory_kind(device: jax.Device) -> str:
    """The memory space host pages live in: pinned host memory where the backend has it."""
    kinds = {m.kind for m in device.addressable_memories()}
    for kind in HOST_MEMORY_KINDS:
        if kind in kinds:
            return kind
    raise ValueError(f"device {device} has no host memory space ({sorted(kinds)}); set "
                     f"swap_space_gb=0 and host_kv_cache_gb=0")


def _page_sharding(kv: KVCache) -> NamedSharding:
    """One page's device sharding: the pool's, with the page axis replaced by (L, 2)."""
    s = kv[0][0].sharding
    spec = tuple(s.spec) + (None,) * (kv[0][0].ndim - len(s.spec))
    return NamedSharding(s.mesh, PartitionSpec(None, None, *spec[1:]))


def _scale_sharding(kv: KVCache) -> NamedSharding:
    """One page's scales [L, 2, Hkv] (pipelined: [L/S, 2, S, Hkv]): split like the pool's."""
    s = kv[0][2].sharding
    spec = tuple(s.spec) + (None,) * (kv[0][2].ndim - len(s.spec))
    return NamedSharding(s.mesh, PartitionSpec(None, None, *spec[1:]))


def bucket_pieces(n: int, buckets: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """[0, n) -> (start, stop) pieces, each exactly one bucket long, largest first (``buckets``
    holds 1, so any n splits)."""
    out, start = [], 0
    while start < n:
        b = max(b for b in buckets if b <= n - start)
        out.append((start, start + b))
        start += b
    return out


class KVPageMover:
    """Compiled page gather / copy / scatter over one KV pool (see the module docstring)."""

    def __init__(self, kv: KVCache, max_pages: int, host_slots: Mapping[str, int]) -> None:
        """``host_slots``: store name -> slots (``host_slot_counts(config)``); host moves are
        compiled only when some store has a slot."""
        shardings = jax.tree.map(lambda a: a.sharding, kv)
        self.buckets = transfer_buckets(max_pages)
        self.host = HostPages(host_slots)
        self.host_moves = bool(self.host)
        self._page_shape = page_shape(kv)
        self._on_device = _page_sharding(kv)
        kind = host_memory_kind(self._on_device.mesh.devices.flat[0]) if self.host_moves else "device"
        self._on_host = self._on_device.with_memory_kind(kind)
        if _quantized(kv):   # a page is (data, scales)
            scales = _scale_sharding(kv)
            self._on_device = (self._on_device, scales)
            self._on_host = (self._on_host, scales.with_memory_kind(kind))
        self._ids_sharding = NamedSharding(_page_sharding(kv).mesh, PartitionSpec())
        self._gather = jax.jit(_gather)
        self._copy = jax.jit(_copy, donate_argnums=(0,), out_shardings=shardings)
        self._scatter = jax.jit(_scatter, donate_argnums=(0,), out_shardings=shardings)

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        return bucket_pieces(n, self.buckets)

    def _ids(self, values: list[int]) -> jax.Array:
        return host_to_global(np.asarray(values, np.int32), self._ids_sharding)

    def _to_host(self, pages: tuple[jax.Array, ...]) -> list[jax.Array]:
        return jax.device_put(list(pages), [self._on_host] * len(pages))

    def _to_device(self, pages: list[jax.Array]) -> tuple[jax.Array, ...]:
        return tuple(jax.device_put(pages, [self._on_device] * len(pages)))

    def move(self, kv: KVCache, t: KVTransfers) -> KVCache:
        """Dispatch this step's page moves (reads first, see ``KVTransfers``); -> the new pool."""
        for a, b in self._chunks(len(t.to_host)):
            moves = t.to_host[a:b]
            pages = self._to_host(self._gather(kv, self._ids([p for p, _, _ in moves])))
            for (_, store, slot), page in zip(moves, pages, strict=True):
                self.host.put(store, slot, page)
        for a, b in self._chunks(len(t.copies)):
            src = self._ids([s for s, _ in t.copies[a:b]])
            dst = self._ids([d for _, d in t.copies[a:b]])
            kv = self._copy(kv, src, dst)
        for a, b in self._chunks(len(t.from_host)):
            moves = t.from_host[a:b]
            pages = self._to_device([self.host.get(store, slot) for store, slot, _ in moves])
            kv = self._scatter(kv, self._ids([p for _, _, p in moves]), pages)
        return kv

    def _lower_host_moves(self, kv: KVCache, bucket: int) -> list[Any]:
        """The lowered device -> host gather and host -> device scatter of ``bucket`` pages over
        ``kv`` (arrays or their ShapeDtypeStructs; the scatter takes the gather's output size)."""
        ids = jax.ShapeDtypeStruct((bucket,), jnp.int32, sharding=self._ids_sharding)
        gather = self._gather.lower(kv, ids)
        pages = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             gather.out_info, (self._on_device,) * len(gather.out_info))
        return [gather, self._scatter.lower(kv, ids, pages)]

    def lower_largest_moves(self, kv: KVCache) -> list[Any]:
        """The largest bucket's host moves (``_lower_host_moves``): with the uploaded pages their
        memory analyses give the mover's peak (jserve/activation_peak.py). Empty without host
        moves."""
        return self._lower_host_moves(kv, self.buckets[-1]) if self.host_moves else []

    def compile(self, kv: KVCache) -> None:
        """Compile every bucket's moves over ``kv`` (the pool's ShapeDtypeStructs at start-up,
        beside the step variants) into JAX's persistent cache, so that ``warmup``'s calls load
        them instead of compiling one after another. Nothing to do with the cache off."""
        if not jax.config.jax_compilation_cache_dir:
            return
        for bucket in self.buckets:
            ids = jax.ShapeDtypeStruct((bucket,), jnp.int32, sharding=self._ids_sharding)
            lowered = [self._copy.lower(kv, ids, ids)]
            if self.host_moves:
                lowered += self._lower_host_moves(kv, bucket)
            for low in lowered:
                low.compile()

    def warmup(self, kv: KVCache) -> KVCache:
        """Compile (or load, after ``compile``) and run once, on the null page, every bucket of
        every move."""
        for bucket in self.buckets:
            ids = self._ids([0] * bucket)
            kv = self._copy(kv, ids, ids)
            if self.host_moves:
                pages = self._to_device(self._to_host(self._gather(kv, ids)))
                kv = self._scatter(kv, ids, pages)
        return kv
