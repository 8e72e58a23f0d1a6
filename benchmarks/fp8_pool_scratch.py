"""Which ways of writing into (and reading from) an fp8 KV pool run in place: compiled scratch.

Where it sits: a diagnosis for issue 13's fp8 KV (session 23). The 8B with an fp8 pool ran out of
memory in a page move's ``jit__scatter`` (a pool layer array's size, 1.48 GiB) and the GPU test
of ``scatter_rows``'s byte view failed: its bitcasts are not free on the GPU either. Each row is
one jitted function with the pool donated; the table gives XLA's compiled temporary bytes
(``memory_analysis``) against one pool array's bytes: "in place" means the scratch is far
below the array.

    PYTHONPATH=. python3 benchmarks/fp8_pool_scratch.py [--pages 4096]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.kv_write import gpu as kv_gpu
from pallas_kernels.kv_write import reference as kv_ref

FP8 = jnp.float8_e4m3fn


def temp_bytes(f: Callable, *args: jax.ShapeDtypeStruct) -> int | str:
    try:
        c = jax.jit(f, donate_argnums=0).lower(*args).compile()
    except Exception as e:   # noqa: BLE001 - a variant the backend cannot compile is a table row
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return c.memory_analysis().temp_size_in_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=64, help="rows written by the scatter variants")
    a = ap.parse_args()
    kvh, d, ps = 8, 128, 16
    sds = jax.ShapeDtypeStruct
    flat8, flatu = sds((a.pages * ps, kvh, d), FP8), sds((a.pages * ps, kvh, d), jnp.uint8)
    pool8 = sds((a.pages, ps, kvh, d), FP8)
    poolu = sds((a.pages, ps, kvh, d), jnp.uint8)
    ids = sds((a.tokens,), jnp.int32)
    pids = sds((a.tokens // 4,), jnp.int32)
    rows8, rowsu = sds((a.tokens, kvh, d), FP8), sds((a.tokens, kvh, d), jnp.uint8)
    rowsb = sds((a.tokens, kvh, d), jnp.bfloat16)
    big = sds((1024, kvh, d), jnp.bfloat16)
    bigids = sds((1024,), jnp.int32)
    scales = sds((a.pages, kvh), jnp.float32)

    def pair(f: Callable) -> Callable:
        return lambda k, v, *rest: f(k, v, *rest)

    def as_fp8(p: jax.Array) -> jax.Array:
        return jax.lax.bitcast_convert_type(p, FP8)

    variants: list[tuple[str, Callable, tuple]] = [
        ("fp8 flat pool: .at[].set (XLA's own fp8 scatter)",
         lambda p, i, r: p.at[i].set(r, mode="drop"), (flat8, ids, rows8)),
        ("fp8 flat pool: scatter_rows (uint8 view, bitcast both ways)",
         kv_ref.scatter_rows, (flat8, ids, rows8)),
        ("uint8 flat pool: .at[].set (uint8 rows)",
         lambda p, i, r: p.at[i].set(r, mode="drop"), (flatu, ids, rowsu)),
        ("uint8 flat pool: bf16 rows -> fp8 -> uint8 bits, .at[].set",
         lambda p, i, r: p.at[i].set(jax.lax.bitcast_convert_type(r.astype(FP8), jnp.uint8),
                                     mode="drop"), (flatu, ids, rowsb)),
        ("fp8 pages: page copy via scatter_rows",
         lambda p, s, t: kv_ref.scatter_rows(p, t, p[s]), (pool8, pids, pids)),
        ("uint8 pages: page copy .at[].set",
         lambda p, s, t: p.at[t].set(p[s], mode="drop"), (poolu, pids, pids)),
        ("uint8 pages: read pages as fp8 (bitcast, gather, f32 sum)",
         lambda p, s: (p, as_fp8(p)[s].astype(jnp.float32).sum()), (poolu, pids)),
        ("fp8 pages: reference.write_kv (decode-sized, scales)",
         lambda k, v, kn, vn, sl, ks, vs: kv_ref.write_kv(k, v, kn, vn, sl, k_scales=ks, v_scales=vs),
         (pool8, pool8, rowsb, rowsb, ids, scales, scales)),
        ("fp8 pages: Pallas GPU write_kv (1024 tokens, scales)",
         lambda k, v, kn, vn, sl, ks, vs: kv_gpu.write_kv(k, v, kn, vn, sl, k_scales=ks, v_scales=vs),
         (pool8, pool8, big, big, bigids, scales, scales)),
    ]
    array = a.pages * ps * kvh * d
    print(f"## {jax.devices()[0].device_kind}, jax {jax.__version__}: one pool array {array / 2**20:.1f} "
          f"MiB ({a.pages} pages x {ps} x {kvh} x {d}, 1 byte), {a.tokens} rows written")
    print("| variant | temp MiB | temp / array | in place |")
    print("|---|---|---|---|")
    for name, f, args in variants:
        t = temp_bytes(f, *args)
        if isinstance(t, str):
            print(f"| {name} | {t} | | |")
        else:
            print(f"| {name} | {t / 2**20:.2f} | {t / array:.2f} | {'yes' if t < array / 8 else 'NO'} |")


if __name__ == "__main__":
    main()
