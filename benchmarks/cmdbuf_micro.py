"""When does XLA re-record its CUDA graph (command buffer) on a call, and what does it cost?

A 24-layer toy step (a [1, 1024] x [1024, 1024] bf16 GEMM, tanh and a KV-like scatter per
layer, ~100 graph nodes) called in the ways the engine could call its step. Each row prints the
host ms of one call on an idle device and ms per step back to back. Run on the GPU with XLA's
command-buffer log to see the moved allocations per call (`updated_allocs=N`):

    TF_CPP_VMODULE=command_buffer_thunk=3 TF_CPP_MIN_LOG_LEVEL=0 \\
      PYTHONPATH=. python3 benchmarks/cmdbuf_micro.py 2> cmdbuf.log

Each variant's calls sit between `=== NAME start` and `=== NAME end` lines on stderr.
Results: benchmarks/RESULTS_v2_sessions_5-8.md (session 6).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

L, D, R, N = 24, 1024, 4, 64   # layers, width, ring slots, per-call input length


def layers(w: jax.Array, kv: jax.Array, tok: jax.Array, inp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w: bf16[L, D, D], kv: bf16[L, 64, D], tok: int32 scalar, inp: f32[N] (every layer reads
    it, as every layer reads the engine's step buffer) -> (kv, next token)."""
    x = jnp.zeros((1, D), jnp.bfloat16).at[0, tok % D].set(1)
    for i in range(L):
        h = jnp.tanh(x @ w[i]) * 1.01 + inp[i].astype(jnp.bfloat16)
        kv = kv.at[i, (tok + inp[L + i].astype(jnp.int32)) % 64].set(h[0])
        x = h + jnp.sum(kv[i], 0, keepdims=True) * 1e-3
    return kv, jnp.argmax(x[0]).astype(jnp.int32)


def fresh_tokens(w, kv, prev, inp):
    """The pre-session-6 contract: the previous tokens come in, new tokens go out fresh."""
    kv, t = layers(w, kv, prev[0], inp)
    return kv, jnp.full((8,), t)


def in_place(w, kv, ring, inp):
    """Tokens kept in a donated buffer (same address every call) + a fresh copy for the host."""
    kv, t = layers(w, kv, ring[0, 0], inp)
    return kv, ring.at[0].set(jnp.full((8,), t)), jnp.full((8,), t)


def staged(w, kv, ring, stage, inp):
    """As ``in_place``, and the per-call input first copied into a donated stage buffer at an
    offset the compiler cannot see (always 0), so the layers read a fixed address."""
    off = ring[1, 0]
    stage = jax.lax.dynamic_update_slice(stage, inp, (off,))
    kv, t = layers(w, kv, ring[0, 0], jax.lax.dynamic_slice(stage, (off,), (N,)))
    return kv, ring.at[0].set(jnp.full((8,), t)), stage, jnp.full((8,), t)


def pinned_in(w, kv, ring, inp):
    """As ``in_place``, the per-call input handed over in pinned host memory: the program copies
    it to the device itself (an in-stream copy), so the call takes no host-buffer transfer."""
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="device")
    return in_place(w, kv, ring, jax.device_put(inp, dev))


def timeit(name: str, call: Callable[[int], jax.Array], n: int = 40) -> None:
    out = None
    for i in range(5):
        out = call(i)
    jax.block_until_ready(out)
    sys.stderr.write(f"=== {name} start\n")
    sys.stderr.flush()
    idle = []
    for i in range(n):
        jax.block_until_ready(out)
        t0 = time.perf_counter()
        out = call(i)
        idle.append(time.perf_counter() - t0)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for i in range(n):
        out = call(i)
    jax.block_until_ready(out)
    b2b = (time.perf_counter() - t0) / n
    sys.stderr.write(f"=== {name} end\n")
    sys.stderr.flush()
    print(f"| {name} | {np.median(idle) * 1e3:.3f} | {b2b * 1e3:.3f} |", flush=True)


def main() -> None:
    w = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((L, D, D)) * 0.03, jnp.bfloat16))
    f_fresh = jax.jit(fresh_tokens, donate_argnums=(1,))
    f_place = jax.jit(in_place, donate_argnums=(1, 2))
    f_staged = jax.jit(staged, donate_argnums=(1, 2, 3))
    pinned = jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind="pinned_host")
    rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    f_pinned = jax.jit(pinned_in, donate_argnums=(1, 2), in_shardings=(rep, rep, rep, pinned),
                       out_shardings=(rep, rep, rep))
    host = [np.full((N,), i, np.float32) for i in range(3)]
    fixed = jax.device_put(host[0])
    st = {"kv": jnp.zeros((L, 64, D), jnp.bfloat16), "prev": jnp.zeros((8,), jnp.int32),
          "ring": jnp.zeros((R, 8), jnp.int32), "stage": jnp.zeros((N + 1,), jnp.float32)}

    def fresh_call(inp):
        def call(i):
            st["kv"], st["prev"] = f_fresh(w, st["kv"], st["prev"], inp(i))
            return st["prev"]
        return call

    def place_call(inp):
        def call(i):
            st["kv"], st["ring"], out = f_place(w, st["kv"], st["ring"], inp(i))
            return out
        return call

    def pinned_call(inp):
        def call(i):
            st["kv"], st["ring"], out = f_pinned(w, st["kv"], st["ring"], inp(i))
            return out
        return call

    def staged_call(inp):
        def call(i):
            st["kv"], st["ring"], st["stage"], out = f_staged(w, st["kv"], st["ring"], st["stage"], inp(i))
            return out
        return call

    print(f"## {jax.devices()[0].device_kind}: {L}-layer toy step\n")
    print("| variant | host ms of one call, idle device | ms per step back to back |\n|---|---|---|")
    timeit("tokens fed back fresh, fixed input", fresh_call(lambda i: fixed))
    timeit("tokens fed back fresh, device_put input", fresh_call(lambda i: jax.device_put(host[i % 3])))
    timeit("tokens in place, fixed input", place_call(lambda i: fixed))
    timeit("tokens in place, device_put input", place_call(lambda i: jax.device_put(host[i % 3])))
    timeit("tokens in place, numpy input", place_call(lambda i: host[i % 3]))
    timeit("tokens in place, numpy input staged in the step", staged_call(lambda i: host[i % 3]))
    fixed_pinned = jax.device_put(host[0], pinned)
    timeit("tokens in place, fixed pinned-host input copied in by the step",
           pinned_call(lambda i: fixed_pinned))
    timeit("tokens in place, numpy input put in pinned host, copied in by the step",
           pinned_call(lambda i: jax.device_put(host[i % 3], pinned)))
    t0 = time.perf_counter()
    for i in range(200):
        jax.device_put(host[i % 3], pinned)
    print(f"| device_put of the numpy input into pinned host alone | "
          f"{(time.perf_counter() - t0) / 200 * 1e3:.3f} | |", flush=True)
    t0 = time.perf_counter()
    for i in range(200):
        jax.block_until_ready(jax.device_put(host[i % 3], rep))
    print(f"| device_put of the numpy input to the device alone (each waited) | "
          f"{(time.perf_counter() - t0) / 200 * 1e3:.3f} | |", flush=True)


if __name__ == "__main__":
    main()
