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


def scratch(f: Callable, *args: jax.ShapeDtypeStruct, donate: tuple[int, ...] = (0,)
            ) -> tuple[int, int] | str:
    """-> (temp bytes, output bytes not aliased to a donated input) of ``f`` compiled."""
    try:
        c = jax.jit(f, donate_argnums=donate).lower(*args).compile()
    except Exception as e:   # noqa: BLE001 - a variant the backend cannot compile is a table row
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    m = c.memory_analysis()
    return m.temp_size_in_bytes, m.output_size_in_bytes - m.alias_size_in_bytes


def byte_view_scatter(pool: jax.Array, index: jax.Array, rows: jax.Array) -> jax.Array:
    """Session 22's ``scatter_rows`` for an fp8-typed pool: the scatter through uint8 views."""
    raw = jax.lax.bitcast_convert_type(pool, jnp.uint8).at[index].set(
        jax.lax.bitcast_convert_type(rows, jnp.uint8), mode="drop")
    return jax.lax.bitcast_convert_type(raw, pool.dtype)


def mover_scatter(kv: list, ids: jax.Array, pages: tuple, scatter: Callable) -> list:
    """``jserve/kv_transfer._scatter``'s quantized branch (host pages -> pool pages ``ids``)."""
    data = jnp.stack([p[0] for p in pages])
    sc = jnp.stack([p[1] for p in pages])
    return [(scatter(k, ids, data[:, i, 0]), scatter(v, ids, data[:, i, 1]),
             ks.at[ids].set(sc[:, i, 0]), vs.at[ids].set(sc[:, i, 1]))
            for i, (k, v, ks, vs) in enumerate(kv)]


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
        ("fp8 flat pool: uint8 view, bitcast both ways (session 22)",
         byte_view_scatter, (flat8, ids, rows8)),
        ("uint8 flat pool: .at[].set (uint8 rows)",
         lambda p, i, r: p.at[i].set(r, mode="drop"), (flatu, ids, rowsu)),
        ("uint8 flat pool: bf16 rows -> fp8 -> uint8 bits, .at[].set",
         lambda p, i, r: p.at[i].set(jax.lax.bitcast_convert_type(r.astype(FP8), jnp.uint8),
                                     mode="drop"), (flatu, ids, rowsb)),
        ("fp8 pages: page copy via the uint8 view",
         lambda p, s, t: byte_view_scatter(p, t, p[s]), (pool8, pids, pids)),
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
    nb = a.tokens // 4   # pages a host -> device move brings
    for name, dt, sc_fn in (("fp8-typed pool, uint8 view", FP8, byte_view_scatter),
                            ("fp8-typed pool, plain", FP8, lambda p, i, r: p.at[i].set(r, mode="drop")),
                            ("uint8 pool (kv_format)", jnp.uint8, kv_ref.scatter_rows)):
        layer = (sds((a.pages, ps, kvh, d), dt),) * 2 + (scales,) * 2
        page = (sds((2, 2, ps, kvh, d), dt), sds((2, 2, kvh), jnp.float32))
        variants.append((f"page mover's host->device scatter, 2 layers: {name}",
                         lambda kv, i, pg, f=sc_fn: mover_scatter(kv, i, pg, f),
                         ([layer, layer], pids, (page,) * nb)))
    array = a.pages * ps * kvh * d
    print(f"## {jax.devices()[0].device_kind}, jax {jax.__version__}: one pool array {array / 2**20:.1f} "
          f"MiB ({a.pages} pages x {ps} x {kvh} x {d}, 1 byte), {a.tokens} rows written")
    print("| variant | temp MiB | temp / array | outputs not aliased, MiB | in place |")
    print("|---|---|---|---|---|")
    for name, f, args in variants:
        donate = (0, 1) if "write_kv" in name else (0,)
        r = scratch(f, *args, donate=donate)
        if isinstance(r, str):
            print(f"| {name} | {r} | | | |")
            continue
        t, fresh = r
        ok = t < array / 8 and fresh < array / 8
        print(f"| {name} | {t / 2**20:.2f} | {t / array:.2f} | {fresh / 2**20:.2f} "
              f"| {'yes' if ok else 'NO'} |")


if __name__ == "__main__":
    main()
