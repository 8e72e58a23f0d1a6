"""What a grammar batch's token masks cost the host on their way to the device (issue 16).

Session 18 (H200, Qwen2.5-0.5B shape, 64 json_schema rows): of the grammar thread's 2.7 ms per
step, staging the 64 masks took 0.39 ms and ``LogitState.flush`` (the row writer's program over
the packed rows) 0.97 ms. This script times the pieces apart, each over the same 64 x W int32
masks (W = ceil(V / 32)), on an idle device:

    logit_state   LogitState.masked_rows + flush (the engine's path)
    writer        the SlotWriter call alone (its buffer filled, its program run)
    device_put    jax.device_put of the masks
    arg           a compiled program (unpack the bits, mask f32[R, V] logits, argmax) given the
                  masks as a host argument
    arg_device    the same program given masks already on the device (its launch alone)

Each row: host ms of the call (returning) and ms until its result is ready. Run on the GPU:

    PYTHONPATH=. python3 benchmarks/mask_upload.py --rows 64 --vocab 151936
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jserve.structured.logit_state import LogitState, mask_words, unpack_mask


def timeit(name: str, call: Callable[[], object], n: int) -> str:
    for _ in range(3):
        jax.block_until_ready(call())
    host = ready = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        out = call()
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        host += t1 - t0
        ready += t2 - t0
    return f"| {name} | {host / n * 1e3:.3f} | {ready / n * 1e3:.3f} |"


def masked_argmax(logits: jax.Array, words: jax.Array) -> jax.Array:
    """logits f32[R, V], words int32[R, W] -> int32[R]."""
    allowed = unpack_mask(words, logits.shape[1])
    return jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--iters", type=int, default=50)
    ns = ap.parse_args()
    r, v = ns.rows, ns.vocab
    w = mask_words(v)
    rng = np.random.default_rng(0)
    masks = rng.integers(-2**31, 2**31 - 1, (r, w), dtype=np.int32)
    dev = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(dev)
    state = LogitState(ns.slots, v, sharding)
    state.compile()
    slots = np.arange(r, dtype=np.int64)

    def logit_state() -> jax.Array:
        state.masked_rows(slots, masks)
        state.flush()
        return state.device

    writer_rows = np.zeros((r, state.width), np.int32)

    def writer() -> jax.Array:
        state.device = state._writer(state.device, slots, writer_rows)
        return state.device

    logits = jax.device_put(rng.standard_normal((r, v), np.float32), sharding)
    prog = jax.jit(masked_argmax).lower(logits, jax.ShapeDtypeStruct((r, w), jnp.int32)).compile()
    on_device = jax.device_put(masks, sharding)
    rows = [f"## mask upload, {r} rows x {w} words ({r * w * 4 / 2**20:.2f} MiB), {dev.device_kind}",
            "| path | host ms per call | ms until ready |", "|---|---|---|",
            timeit("logit_state", logit_state, ns.iters),
            timeit("writer", writer, ns.iters),
            timeit("device_put", lambda: jax.device_put(masks, sharding), ns.iters),
            timeit("arg", lambda: prog(logits, masks), ns.iters),
            timeit("arg_device", lambda: prog(logits, on_device), ns.iters)]
    print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
