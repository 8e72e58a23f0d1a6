"""Host KV tier / swap transfer benchmark: page moves between the device pool and host memory.

Moves ``--pages`` pages of a model's KV shape (default Llama-3.1-8B: 32 layers x 2 x 16 tokens
x 8 kv heads x 128, bf16 = 2 MiB a page) through ``KVPageMover`` (pinned host memory, async
DMA) and, in the same run, through the numpy path the engine used before (device -> numpy,
numpy -> device_put). Prints a table of ms and GB/s per direction. Not a test: numbers go to
benchmarks/RESULTS.md with the GPU name and date.

    PYTHONPATH=. python3 benchmarks/host_tier.py
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jserve.kv_transfer import KVPageMover, page_shape
from jserve.scheduler_output import KVTransfers


def timed(fn, reps: int) -> float:
    """Median seconds of ``fn()`` (which blocks until its result is ready)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--pool-pages", type=int, default=1024)
    ap.add_argument("--pages", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ns = ap.parse_args()
    dev = jax.devices()[0]
    mesh = Mesh(np.array([dev]), ("tp",))
    shard = NamedSharding(mesh, PartitionSpec())
    shape = (ns.pool_pages, ns.page_size, ns.kv_heads, ns.head_dim)
    make = jax.jit(lambda: jnp.ones(shape, jnp.bfloat16), out_shardings=shard)
    kv = [(make(), make()) for _ in range(ns.layers)]
    mover = KVPageMover(kv, ns.pages, {"bench": ns.pages})
    kv = mover.warmup(kv)
    slots = list(range(ns.pages))
    src = list(range(1, ns.pages + 1))
    dst = list(range(ns.pool_pages - ns.pages, ns.pool_pages))
    nbytes = ns.pages * int(np.prod(page_shape(kv))) * jnp.dtype(jnp.bfloat16).itemsize
    state = {"kv": kv}

    def offload() -> None:
        t = KVTransfers(to_host=[(p, "bench", s) for p, s in zip(src, slots, strict=True)])
        state["kv"] = mover.move(state["kv"], t)
        jax.block_until_ready([mover.host.get("bench", s) for s in slots])

    def load() -> None:
        t = KVTransfers(from_host=[("bench", s, p) for s, p in zip(slots, dst, strict=True)])
        state["kv"] = mover.move(state["kv"], t)
        jax.block_until_ready(state["kv"])

    gather = jax.jit(lambda kv, ids: jnp.stack([jnp.stack([k[ids], v[ids]], 1) for k, v in kv], 1))
    ids = jnp.asarray(src, jnp.int32)
    host = {}

    def numpy_offload() -> None:
        host["x"] = np.asarray(gather(state["kv"], ids))

    def numpy_load() -> None:
        jax.block_until_ready(jax.device_put(host["x"], shard))

    rows = [("offload (device -> host)", "mover, pinned host", timed(offload, ns.reps)),
            ("load (host -> device)", "mover, pinned host", timed(load, ns.reps)),
            ("offload (device -> host)", "numpy (before)", timed(numpy_offload, ns.reps)),
            ("load (host -> device)", "numpy (before)", timed(numpy_load, ns.reps))]
    print(f"\n{getattr(dev, 'device_kind', str(dev))}: {ns.pages} pages of {page_shape(kv)} bf16 = "
          f"{nbytes / 2**20:.0f} MiB per move, median of {ns.reps}\n")
    print("| direction | path | ms | GB/s |\n|---|---|---|---|")
    for name, path, s in rows:
        print(f"| {name} | {path} | {s * 1e3:.1f} | {nbytes / s / 1e9:.1f} |")


if __name__ == "__main__":
    main()
