"""KVHandoffMover: moves KV pages from the prefill group's pool into the decode group's pool.

Where it sits: called by the handoff (jserve/disagg/handoff.py) between two steps of the
groups; the page ids are plain values from the two schedulers. Three dispatches per piece,
none of which waits on the host::

    gather(prefill kv, src ids[B])  -> one contiguous buffer on the prefill mesh
                                       data [B, L, 2, page_size, Hkv, d] (+ scales [B, L, 2, Hkv]
                                       for an int8 / fp8 pool: a page moves with its scales)
    jax.device_put(buffer, decode mesh sharding)     device to device (NVLink on one host)
    scatter(decode kv [donated], dst ids[B], buffer) -> decode kv

Page counts go in pieces of power-of-two buckets (1, 2, 4, ... up to 128 or the pages of one
sequence): n pages move as the largest bucket that fits what is left (13 = 8 + 4 + 1), so no
byte moves twice and nothing is padded; every bucket is compiled (and run once on the null
page, page 0, which nothing reads) at start-up, so serving never compiles (DESIGN invariant 4).

Ordering is by data dependence: the gather reads the prefill pool after every step dispatched
before it, the scatter writes the decode pool before every later decode step. The received
buffers are returned so the caller can tell when the decode side holds the bytes
(``is_ready``) before it frees the prefill pages. Across hosts the ``device_put`` becomes a
send / receive of the same buffer; the rest stays as it is.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jserve.kv_cache import KVCache
from jserve.kv_transfer import bucket_pieces
from pallas_kernels.kv_write import scatter_rows
from sharding import host_to_global

MAX_HANDOFF_BUCKET = 128


def handoff_buckets(max_pages: int) -> tuple[int, ...]:
    """Powers of two from 1 up to the first >= ``max_pages`` (capped at 128)."""
    out = [1]
    while out[-1] < min(max_pages, MAX_HANDOFF_BUCKET):
        out.append(out[-1] * 2)
    return tuple(out)


def _quantized(kv: KVCache) -> bool:
    return len(kv[0]) == 4


def _gather(kv: KVCache, ids: jax.Array) -> tuple[jax.Array, ...]:
    """ids int32[B] -> (data [B, L, 2, page_size, Hkv, d],) or (data, scales [B, L, 2, Hkv])."""
    data = jnp.stack([jnp.stack([layer[0][ids], layer[1][ids]], axis=1) for layer in kv], axis=1)
    if not _quantized(kv):
        return (data,)
    scales = jnp.stack([jnp.stack([layer[2][ids], layer[3][ids]], axis=1) for layer in kv], axis=1)
    return data, scales


def _scatter(kv: KVCache, ids: jax.Array, buf: tuple[jax.Array, ...]) -> KVCache:
    """The buffer's B pages (and scales) -> pool pages ``ids`` of every layer."""
    data = buf[0]
    if not _quantized(kv):
        return [(scatter_rows(k, ids, data[:, i, 0]), scatter_rows(v, ids, data[:, i, 1]))
                for i, (k, v) in enumerate(kv)]
    sc = buf[1]
    return [(scatter_rows(k, ids, data[:, i, 0]), scatter_rows(v, ids, data[:, i, 1]),
             ks.at[ids].set(sc[:, i, 0]), vs.at[ids].set(sc[:, i, 1]))
            for i, (k, v, ks, vs) in enumerate(kv)]


def _signature(kv: KVCache) -> tuple:
    """What must agree between the two pools: layers, and per array the page shape and dtype."""
    return len(kv), tuple((a.shape[1:], str(a.dtype)) for a in kv[0])


def _buffer_shardings(kv: KVCache) -> tuple[NamedSharding, ...]:
    """The buffer's shardings on ``kv``'s mesh: split over kv heads as the pool is."""
    s = kv[0][0].sharding
    spec = tuple(s.spec) + (None,) * (4 - len(s.spec))
    out = [NamedSharding(s.mesh, PartitionSpec(None, None, None, *spec[1:]))]
    if _quantized(kv):
        ss = kv[0][2].sharding
        sspec = tuple(ss.spec) + (None,) * (2 - len(ss.spec))
        out.append(NamedSharding(ss.mesh, PartitionSpec(None, None, None, sspec[1])))
    return tuple(out)


class KVHandoffMover:
    """Compiled gather (prefill pool) / scatter (decode pool) in bucketed page counts."""

    def __init__(self, src_kv: KVCache, dst_kv: KVCache, max_pages: int) -> None:
        """``max_pages``: the most pages one sequence holds (bounds the largest bucket)."""
        if _signature(src_kv) != _signature(dst_kv):
            raise ValueError(f"disaggregation: the prefill and decode KV pools differ in layout "
                             f"({_signature(src_kv)} vs {_signature(dst_kv)}); both groups must "
                             f"serve the same model with the same kv_cache_dtype, page_size and "
                             f"kv heads")
        self.buckets = handoff_buckets(max_pages)
        self.page_bytes = sum(a.dtype.itemsize * math.prod(a.shape[1:]) for a in src_kv[0]) * len(src_kv)
        self._src_ids = NamedSharding(src_kv[0][0].sharding.mesh, PartitionSpec())
        self._dst_ids = NamedSharding(dst_kv[0][0].sharding.mesh, PartitionSpec())
        self._dst_buffer = _buffer_shardings(dst_kv)
        self._gather = jax.jit(_gather, out_shardings=_buffer_shardings(src_kv))
        self._scatter = jax.jit(_scatter, donate_argnums=(0,),
                                out_shardings=jax.tree.map(lambda a: a.sharding, dst_kv))

    def pieces(self, n: int) -> list[tuple[int, int]]:
        """[0, n) -> (start, stop) pieces, each exactly one bucket long, largest first."""
        return bucket_pieces(n, self.buckets)

    def send(self, src_kv: KVCache, src_pages: list[int], dst_kv: KVCache, dst_pages: list[int]
             ) -> tuple[KVCache, list[jax.Array]]:
        """Dispatch the copy of prefill pages ``src_pages[i]`` into decode pages ``dst_pages[i]``;
        -> (the decode pool, the received buffers: the bytes are on the decode side once all
        are ready)."""
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"send: {len(src_pages)} source pages for {len(dst_pages)} destinations")
        return self.put(dst_kv, dst_pages, self.gather(src_kv, src_pages))

    def gather(self, src_kv: KVCache, src_pages: list[int]) -> list[tuple[jax.Array, ...]]:
        """Dispatch the gather of prefill pages ``src_pages`` into contiguous buffers on the
        prefill mesh, one per piece (``pieces``); -> the buffers, for ``put``."""
        return [self._gather(src_kv, host_to_global(np.asarray(src_pages[a:b], np.int32), self._src_ids))
                for a, b in self.pieces(len(src_pages))]

    def put(self, dst_kv: KVCache, dst_pages: list[int], gathered: list[tuple[jax.Array, ...]]
            ) -> tuple[KVCache, list[jax.Array]]:
        """Dispatch the copy of ``gather``'s buffers (of as many pages) to the decode mesh and
        their scatter into decode pages ``dst_pages``; -> (the decode pool, the received
        buffers)."""
        pieces = self.pieces(len(dst_pages))
        if len(pieces) != len(gathered):
            raise ValueError(f"put: {len(gathered)} gathered pieces for {len(dst_pages)} pages")
        received: list[jax.Array] = []
        for (a, b), buf in zip(pieces, gathered, strict=True):
            dst = host_to_global(np.asarray(dst_pages[a:b], np.int32), self._dst_ids)
            buf = jax.device_put(buf, self._dst_buffer)
            dst_kv = self._scatter(dst_kv, dst, buf)
            received.extend(buf)
        return dst_kv, received

    def warmup(self, src_kv: KVCache, dst_kv: KVCache) -> KVCache:
        """Compile and run every bucket once, null page to null page; -> the decode pool."""
        for b in self.buckets:
            dst_kv, received = self.send(src_kv, [0] * b, dst_kv, [0] * b)
        jax.block_until_ready(dst_kv)
        return dst_kv
