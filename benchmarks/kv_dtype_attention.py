"""Decode attention over a bf16 pool against fp8 (uint8 e4m3) and int8 pools: the GPU kernel's configs.

Where it sits: issue 13's fp8 KV step-time target (<= 3% over bf16 at 8k context). Session 23
measured the engine's decode step +28.8% with an fp8 pool (Qwen2.5-0.5B shape, 16 x 8k:
``kv_dtype_step.py``), though the attention reads half the bytes. This times the attention
kernel alone, per layer call, for the pool formats and the kernel options that bear on the
per-key work: ``GpuConfig.kv_compute`` ("float16": K/V convert to f16 only, not on to bf16,
the default for quantized pools since session 24; "float8": the QK dot in e4m3 against K as
stored), more keys per inner step (``pages_per_block``, 1-byte pages: the same bytes per step
as bf16's default) or fewer (half: fewer registers per program, more programs per SM; session
47, ``offline_attention.py``) and, where the call splits, splits down to one block each
(``min_blocks_per_split`` 1, not the default 2: a short context's splits matter at small
batch). Each call is the engine's decode-only call (``max_q_len=1``: the direct decode launch,
its split twin if it has one, and the split merge); ``--bucket`` and ``--max-model-len`` shape
it like the engine's token bucket and page tables, which size the launch's static split count
(session 43: a 1-token call with 19-page tables, 4 splits, is not the engine's batch-1 decode,
16 splits in its 16-row bucket). Timing as ``benchmarks/kernels.py`` (``loop_time``: one jit,
unrolled calls, median of 5; page tables rotate over a pool 4x the footprint).

    PYTHONPATH=. python3 benchmarks/kv_dtype_attention.py [--layouts qwen,8b] [--batch 16]
        [--context 8192] [--bucket 16 --max-model-len 1024] [--pools bf16,fp8,int8]
    PYTHONPATH=. python3 benchmarks/kv_dtype_attention.py --smoke   # CPU, interpret mode
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import loop_time
from benchmarks.step_floor import module_constant
from pallas_kernels import kv_format
from pallas_kernels.ragged_paged_attention import gpu as rpa_gpu
from pallas_kernels.ragged_paged_attention import gpu_splits as rpa_splits
from pallas_kernels.ragged_paged_attention import reference as rpa_ref

LAYOUTS = {"qwen": (14, 2, 64), "8b": (32, 8, 128), "mha": (32, 32, 128)}   # q heads, kv heads, head_dim
PAGE, ROT = 16, 4
POOL_LABELS = {"bf16": "bf16", "fp8": "fp8 (uint8)", "int8": "int8"}


def programs_target(target: int | None = None) -> contextlib.AbstractContextManager:
    """``gpu_splits.TARGET_PROGRAMS`` set to ``target`` while tracing (None: left as it is)."""
    if target is None:
        return contextlib.nullcontext()
    return module_constant(rpa_splits, "TARGET_PROGRAMS", target)


def inputs(hq: int, hkv: int, d: int, batch: int, context: int, pool: str, key: int,
           bucket: int = 0, max_model_len: int = 0) -> tuple:
    """(q, k pool, v pool, page tables [R, rows, P], (seq_lens, query_start_loc, num_seqs),
    scales kwargs): one decode row per sequence; a ``pool`` pool (bf16, fp8, int8) as the engine
    stores it. ``bucket``
    (0: ``batch``): q rows and page-table rows as in the engine's token bucket, the rows past
    ``batch`` padding (no sequence); ``max_model_len`` (0: ``context``): the page tables' width
    P, as the engine's (the kernel's static split count is sized by both). R = ``ROT`` page
    tables, fewer where ROT's pool would be a 1-byte array the kernels cannot address (session
    44: the 8B layout's fp8 pool of 64 x 8k x 4 was one page past 2 GiB, an illegal address)."""
    rows = bucket or batch
    pps = -(-context // PAGE)
    width = -(-(max_model_len or context) // PAGE)
    if rows < batch or width < pps:
        raise ValueError(f"--bucket {bucket} / --max-model-len {max_model_len} do not hold {batch} "
                         f"sequences of {context} tokens")
    per_page = PAGE * hkv * d
    rot = ROT   # as many rotations as the kernels address in a 1-byte pool

    def pages(r: int) -> int:
        return 1 + r * batch * pps

    while rot > 1 and kv_format.addressable_pages(pages(rot), per_page, jnp.uint8) < pages(rot):
        rot -= 1
    num_pages = pages(rot)
    ks = jax.random.split(jax.random.key(key), 3)
    shape = (num_pages, PAGE, hkv, d)
    kp = jax.random.normal(ks[0], shape, jnp.float32)
    vp = jax.random.normal(ks[1], shape, jnp.float32)
    scales = {}
    if pool == "fp8":
        kp = jax.lax.bitcast_convert_type((kp * 8).astype(kv_format.FP8), jnp.uint8)
        vp = jax.lax.bitcast_convert_type((vp * 8).astype(kv_format.FP8), jnp.uint8)
        one = jnp.full((num_pages, hkv), 0.125)
        scales = {"k_scales": one, "v_scales": one}
    elif pool == "int8":
        kp, vp = (jnp.clip(jnp.round(x * 24), -127, 127).astype(jnp.int8) for x in (kp, vp))
        one = jnp.full((num_pages, hkv), 1 / 24)
        scales = {"k_scales": one, "v_scales": one}
    else:
        kp, vp = kp.astype(jnp.bfloat16), vp.astype(jnp.bfloat16)
    perm = np.random.default_rng(key).permutation(np.arange(1, num_pages))
    pts = np.zeros((rot, rows, width), np.int32)   # page 0: the null page
    pts[:, :batch, :pps] = perm.reshape(rot, batch, pps)
    q = jax.random.normal(ks[2], (rows, hq, d), jnp.bfloat16)
    live = np.arange(rows) < batch
    meta = (jnp.asarray(np.where(live, context, 0).astype(np.int32)),
            jnp.asarray(np.minimum(np.arange(rows + 1), batch).astype(np.int32)),
            jnp.asarray([batch], jnp.int32))
    return q, kp, vp, jnp.asarray(pts), meta, scales


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default="qwen,8b", help=f"comma list of {', '.join(LAYOUTS)}")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--bucket", type=int, default=0,
                    help="q rows and page-table rows, as the engine's token bucket (0: --batch)")
    ap.add_argument("--max-model-len", type=int, default=0,
                    help="the page tables' width in tokens, as the engine's (0: --context)")
    ap.add_argument("--targets", default="",
                    help="comma list of gpu_splits.TARGET_PROGRAMS values to time the default config "
                         "under too (the KV splits are sized for that many programs; default 264)")
    ap.add_argument("--pools", default="bf16,fp8", help="comma list of bf16, fp8, int8 (bf16 first: the "
                    "ratio column's base is the first pool's default)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU check)")
    a = ap.parse_args()
    batch, context, interpret = (4, 64, True) if a.smoke else (a.batch, a.context, False)
    rows = a.bucket or batch
    print(f"## decode attention, {batch} sequences x {context} tokens in a {rows}-row bucket, "
          f"page tables of {a.max_model_len or context} tokens, page {PAGE} "
          f"({jax.devices()[0].device_kind}, jax {jax.__version__})")
    print("| layout (q / kv heads, d) | pool | config | us per call | vs bf16 | max abs err vs reference |")
    print("|---|---|---|---|---|---|")
    targets = [int(t) for t in a.targets.split(",") if t]
    for name in a.layouts.split(","):
        hq, hkv, d = LAYOUTS[name]
        base = None
        for pool in a.pools.split(","):
            kind = None if pool == "bf16" else pool
            q, kp, vp, pts, meta, sc = inputs(hq, hkv, d, batch, context, pool, 7, a.bucket, a.max_model_len)
            dflt = rpa_gpu.default_config(rows, rows, hq, hkv, PAGE, pts.shape[2], kv_pool=kind,
                                          head_dim=d)
            plan = isinstance(dflt, rpa_gpu.GpuPlan)   # every row decodes: its decode launch runs
            dec = dflt.decode if plan else dflt

            def launch(c, dflt=dflt, plan=plan):
                return dataclasses.replace(dflt, decode=c) if plan else c

            configs = [("default", dec)]
            for t in targets:   # the static config too is sized by the target: made under it
                with programs_target(t):
                    c = rpa_gpu.default_config(rows, rows, hq, hkv, PAGE, pts.shape[2], kv_pool=kind,
                                               head_dim=d)
                configs.append((f"default, {t} programs target", c.decode if plan else c, t))
            if dec.split_twin is not None:   # step_floor's attn-split-twin-off
                configs.append(("no split twin (step_floor's attn-split-twin-off)",
                                dataclasses.replace(dec, split_twin=None)))
            if dec.num_splits > 1:   # short contexts: two blocks of keys per split program, or one
                configs.append(("1 block per split at least",
                                dataclasses.replace(dec, min_blocks_per_split=1)))
            one = dataclasses.replace(dec, wide_pages_per_block=None)
            wide = dataclasses.replace(one, pages_per_block=2 * one.pages_per_block)
            if kind:   # one launch of N keys per step (step_floor's attn-quant-keys-N arms)
                for keys in (32, 64, 128):
                    c = dataclasses.replace(one, pages_per_block=keys // PAGE)
                    if c != dec:
                        configs.append((f"{keys} keys per step, one launch", c))
            if pool == "int8" and dec.int8_f16_bits:   # step_floor's attn-int8-f16-bits-off
                configs.append(("Triton's cvt, 128 keys (before session 49)",
                                dataclasses.replace(one, int8_f16_bits=False, pages_per_block=128 // PAGE)))
            if pool == "int8" and not dec.int8_f16_bits:
                bits = dataclasses.replace(one, int8_f16_bits=True)
                configs += [("f16 by bit assembly, the fp8 pair",
                             dataclasses.replace(bits, pages_per_block=64 // PAGE,
                                                 wide_pages_per_block=128 // PAGE)),
                            ("f16 by bit assembly, 64 keys",
                             dataclasses.replace(bits, pages_per_block=64 // PAGE)),
                            ("f16 by bit assembly, 128 keys",
                             dataclasses.replace(bits, pages_per_block=128 // PAGE))]
            if pool == "fp8":
                configs += [("bf16 dots (before session 24)", dataclasses.replace(dec, kv_compute=None)),
                            ("kv_compute float8", dataclasses.replace(dec, kv_compute="float8")),
                            ("float8, 2x keys", dataclasses.replace(wide, kv_compute="float8"))]
            want = rpa_ref.ragged_paged_attention(q, kp, vp, pts[0], *meta, sm_scale=d**-0.5, **sc)
            for label, cfg, *target in configs:
                if cfg.split_twin is not None:
                    label += f" (its split twin of {cfg.split_twin.num_splits} splits, below " \
                             f"{rpa_splits.TARGET_PROGRAMS} programs)"
                f = functools.partial(rpa_gpu.ragged_paged_attention, sm_scale=d**-0.5, max_q_len=1,
                                      config=launch(cfg), interpret=interpret, **sc)
                with programs_target(*target):   # (the split count is traced from it)
                    got = jax.jit(f)(q, kp, vp, pts[0], *meta)
                    sec = loop_time(lambda i, q, kp, vp, pts, f=f, meta=meta: f(q, kp, vp, pts[i], *meta),
                                    (q, kp, vp, pts), rotate=pts.shape[0], iters=2 if a.smoke else 20,
                                    reps=1 if a.smoke else 5)
                err = float(jnp.max(jnp.abs(got[:batch].astype(jnp.float32)
                                            - want[:batch].astype(jnp.float32))))
                base = sec if base is None else base
                ppb = cfg.pages_per_block if cfg.wide_pages_per_block is None else \
                    f"{cfg.pages_per_block} or {cfg.wide_pages_per_block} by live count"
                print(f"| {name} ({hq} / {hkv}, {d}) | {POOL_LABELS[pool]} | {label} "
                      f"(ppb {ppb}, splits {cfg.num_splits}, dots {cfg.kv_compute or 'q dtype'}) | "
                      f"{sec * 1e6:.1f} | {sec / base:.3f}x | {err:.4f} |")


if __name__ == "__main__":
    main()
