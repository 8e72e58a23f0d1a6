"""Kernel benchmark: jserve's Pallas attention kernels vs same-run ceilings and peers.

Shapes of Llama-3.1-8B attention (32 q heads, 8 kv heads, d=128, bf16, page 16):
decode at batch x context 1x8192, 64x2048, 256x512; a mixed batch (8 prefill chunks of 512 +
248 decodes at context 2048) next to its decode-only and prefill-only parts; causal prefill
1x2048 and 1x8192. Peers run in the same process: JAX's own Pallas paged-attention op
(best of its k_splits x pages_per_compute_block), cuDNN through jax.nn.dot_product_attention,
JAX's Pallas Triton flash op. Ceilings: HBM read+write of a 2 GiB elementwise op, bf16 matmul.

Timing: each op runs ``iters`` times inside one jitted, unrolled ``fori_loop`` (device time plus
launch gaps, no Python dispatch, no XLA while-loop), median of ``reps``; the decode table rows
are medians of ``--rounds`` rounds that interleave ours and the peer's best config; decode inputs rotate
over 4 page tables into a pool 4x the KV footprint so that repeated iterations do not read
from L2.

    PYTHONPATH=. python3 benchmarks/kernels.py [--quick] [--sweep]

Prints JSON lines, then a table; writes kernels.json under $OUT when set.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.flash_attention import api as flash_api
from pallas_kernels.flash_attention import gpu as fa_gpu
from pallas_kernels.flash_attention import reference as fa_ref
from pallas_kernels.ragged_paged_attention import gpu as rpa_gpu
from pallas_kernels.ragged_paged_attention import reference as rpa_ref

HQ, HKV, D, PAGE = 32, 8, 128, 16
DT = jnp.bfloat16
ROT = 4
RESULTS: list[dict] = []


def emit(**kw) -> None:
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)


def loop_time(op, args, *, iters: int = 20, reps: int = 5, rotate: int | None = None) -> float:
    """Median seconds per call of ``op(i, *args)`` run ``iters`` times inside one jit.

    Each iteration perturbs one element of ``args[0]`` by ``0 * (running sum of all outputs)``
    so XLA can neither hoist the op out of the loop nor drop any of its output.
    """

    @jax.jit
    def many(*a):
        def body(i, state):
            acc, first = state
            first = first.at[(0,) * first.ndim].add((acc * 0).astype(first.dtype))
            out = op(i if rotate is None else i % rotate, first, *a[1:])
            return acc + jnp.sum(out.astype(jnp.float32)), first

        # Unrolled: an XLA while loop on GPU costs ~25 us per iteration (predicate read back to the
        # host; measured as harness_floor in run 3, KERNEL_NOTES_runs_1-9.md).
        return jax.lax.fori_loop(0, iters, body, (jnp.float32(0), a[0]), unroll=True)[0]

    jax.block_until_ready(many(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(many(*args))
        ts.append((time.perf_counter() - t) / iters)
    return statistics.median(ts)


def rel(a, b) -> float:
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def ceilings() -> dict:
    n = 1 << 30
    x = jax.random.normal(jax.random.key(0), (n,), DT)
    f = jax.jit(lambda x: x * 2)
    jax.block_until_ready(f(x))
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            y = f(x)
        jax.block_until_ready(y)
        ts.append((time.perf_counter() - t) / 10)
    hbm = 2 * n * 2 / statistics.median(ts) / 1e9
    del y
    m = 8192
    a = jax.random.normal(jax.random.key(1), (m, m), DT)
    b = jax.random.normal(jax.random.key(2), (m, m), DT)
    g = jax.jit(lambda a, b: jax.lax.fori_loop(0, 10, lambda i, a: (a @ b) * (1 / 90), a))
    jax.block_until_ready(g(a, b))
    t = time.perf_counter()
    jax.block_until_ready(g(a, b))
    mm = 2 * m**3 / ((time.perf_counter() - t) / 10) / 1e12
    emit(what="ceiling", hbm_gbps=round(hbm, 1), matmul_tflops=round(mm, 1))
    del x, a, b
    return {"hbm": hbm, "mm": mm}


def ragged_inputs(q_lens: list[int], ctx_lens: list[int], key: int):
    """Pool of ROT x the needed pages; ROT page tables with disjoint shuffled pages."""
    n = len(q_lens)
    pps = max(-(-c // PAGE) for c in ctx_lens)
    need = sum(-(-c // PAGE) for c in ctx_lens)
    num_pages = 1 + ROT * need
    ks = jax.random.split(jax.random.key(key), 4)
    kp = jax.random.normal(ks[0], (num_pages, PAGE, HKV, D), DT)
    vp = jax.random.normal(ks[1], (num_pages, PAGE, HKV, D), DT)
    perm = np.random.default_rng(key).permutation(np.arange(1, num_pages))
    pts = np.zeros((ROT, n, pps), np.int32)
    off = 0
    for r in range(ROT):
        for i, c in enumerate(ctx_lens):
            m = -(-c // PAGE)
            pts[r, i, :m] = perm[off : off + m]
            off += m
    qsl = np.zeros(n + 1, np.int32)
    qsl[1:] = np.cumsum(q_lens)
    q = jax.random.normal(ks[2], (int(qsl[-1]), HQ, D), DT)
    kv_bytes = 2 * sum(ctx_lens) * HKV * D * 2
    flops = sum(
        4 * HQ * D * (ql * (c - ql) + ql * (ql + 1) / 2) for ql, c in zip(q_lens, ctx_lens, strict=True)
    )
    meta = (jnp.asarray(pts), jnp.asarray(ctx_lens, jnp.int32), jnp.asarray(qsl), jnp.asarray([n], jnp.int32))
    return q, kp, vp, meta, kv_bytes, flops


def _cfg_str(c) -> str:
    if isinstance(c, rpa_gpu.GpuPlan):
        return f"plan[{_cfg_str(c.decode)} | {_cfg_str(c.prefill)}]"
    fused = "/fused" if c.fused_combine else ""
    return f"bq{c.block_q}/ppb{c.pages_per_block}/s{c.num_splits}/w{c.num_warps}/st{c.num_stages}{fused}"


def run_rpa(
    name: str, q_lens, ctx_lens, key: int, configs, check: bool = True, interpret: bool = False
) -> dict:
    q, kp, vp, (pts, sl, qsl, ns), kv_bytes, flops = ragged_inputs(q_lens, ctx_lens, key)
    best = None
    want = None
    if check:
        want = jax.jit(functools.partial(rpa_ref.ragged_paged_attention, sm_scale=D**-0.5))(
            q, kp, vp, pts[0], sl, qsl, ns
        )
    for cfg in configs:
        f = functools.partial(
            rpa_gpu.ragged_paged_attention, sm_scale=D**-0.5, config=cfg, interpret=interpret
        )
        try:
            t = loop_time(lambda i, q, kp, vp, pts, sl, qsl, ns, f=f: f(q, kp, vp, pts[i], sl, qsl, ns),
                          (q, kp, vp, pts, sl, qsl, ns), rotate=ROT)  # fmt: skip
            err = rel(jax.jit(f)(q, kp, vp, pts[0], sl, qsl, ns), want) if check else None
            c = cfg or rpa_gpu.default_config(q.shape[0], len(q_lens), HQ, HKV, PAGE, pts.shape[2])
            cfg_s = ("default:" if cfg is None else "") + _cfg_str(c)
            r = dict(what="rpa", case=name, cfg=cfg_s, us=round(t * 1e6, 1),
                     gbps=round(kv_bytes / t / 1e9, 1), tflops=round(flops / t / 1e12, 1),
                     rel_err=None if err is None else round(err, 5))  # fmt: skip
            emit(**r)
            if best is None or r["us"] < best["us"]:
                best = r
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
            emit(what="rpa", case=name, cfg=str(cfg), error=repr(e)[:400])
    return best or {}


def harness_floor() -> float:
    """The loop harness alone (perturb one element, sum a [1, 32, 128] output): subtract-free
    context for the smallest cases, where it is a visible share of the time."""
    q = jax.random.normal(jax.random.key(3), (1, HQ, D), DT)
    t = loop_time(lambda i, q: q * 1, (q,))
    emit(what="harness_floor", us=round(t * 1e6, 2))
    return t


def kv_write_bench(num_tokens: int) -> dict:
    """XLA's in-place scatter vs the Pallas kernel, pools carried through a fori_loop (donated)."""
    from pallas_kernels.kv_write import gpu as kv_gpu
    from pallas_kernels.kv_write import reference as kv_ref

    pages = 20_000
    shape = (pages, PAGE, HKV, D)
    k = jax.random.normal(jax.random.key(4), shape, DT)
    v = jax.random.normal(jax.random.key(5), shape, DT)
    kn = jax.random.normal(jax.random.key(6), (num_tokens, HKV, D), DT)
    slots = jax.random.permutation(jax.random.key(7), pages * PAGE)[:num_tokens].astype(jnp.int32)
    res = {}
    for name, fn in (("xla_scatter", kv_ref.write_kv), ("pallas", kv_gpu.write_kv)):
        f = jax.jit(
            lambda k, v, kn, slots, fn=fn: jax.lax.fori_loop(
                0, 50, lambda i, kv: fn(kv[0], kv[1], kn, kn, (slots + i) % (pages * PAGE)), (k, v)
            ),
            donate_argnums=(0, 1),
        )
        k, v = jax.block_until_ready(f(k, v, kn, slots))
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            k, v = jax.block_until_ready(f(k, v, kn, slots))
            ts.append((time.perf_counter() - t) / 50)
        res[name] = round(statistics.median(ts) * 1e6, 2)
    emit(what="kv_write", tokens=num_tokens, **res)
    return res


def _jax_paged_op(ksp: int, ppcb: int):
    """``op(i, q, kp, vp, bt, lens)``: JAX's own Pallas GPU paged_attention op on page table i."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.pallas.ops.gpu import paged_attention as pa
    f = functools.partial(pa.paged_attention, k_splits=ksp, pages_per_compute_block=ppcb)
    return lambda i, q, kp, vp, bt, lens: f(q, kp, vp, bt[i], lens)


def _jax_op_inputs(B: int, ctx: int, key: int) -> tuple:
    ppseq = ctx // PAGE
    total = ROT * B * ppseq
    ks = jax.random.split(jax.random.key(key), 4)
    q = jax.random.normal(ks[0], (B, HQ, D), DT)
    kp = jax.random.normal(ks[1], (HKV, total, PAGE, D), DT)
    vp = jax.random.normal(ks[2], (HKV, total, PAGE, D), DT)
    bt = jax.random.permutation(ks[3], total).reshape(ROT, B, ppseq).astype(jnp.int32)
    return q, kp, vp, bt, jnp.full((B,), ctx, jnp.int32)


def decode_ab(B: int, ctx: int, key: int, peer_cfg: str, rounds: int) -> tuple[dict, dict]:
    """Our default kernel and the peer's best config timed in ``rounds`` interleaved rounds
    (median of each): the GPU's clocks drift by +-20% between runs of these ~40 us cases, and
    interleaving keeps the ratio honest."""
    q, kp, vp, meta, kv_bytes, _ = ragged_inputs([1] * B, [ctx] * B, key)
    f = functools.partial(rpa_gpu.ragged_paged_attention, sm_scale=D**-0.5)
    ours = (lambda i, q, kp, vp, pts, sl, qsl, ns: f(q, kp, vp, pts[i], sl, qsl, ns), (q, kp, vp, *meta))
    ksp, ppcb = (int(x) for x in peer_cfg.replace("ks", "").replace("ppcb", "").split("/"))
    peer = (_jax_paged_op(ksp, ppcb), _jax_op_inputs(B, ctx, key))
    ts = {"ours": [], "peer": []}
    for _ in range(rounds):
        for name, (op, args) in (("ours", ours), ("peer", peer)):
            ts[name].append(loop_time(op, args, rotate=ROT))
    out = []
    for name, cfg in (("ours", "default"), ("peer", peer_cfg)):
        t = statistics.median(ts[name])
        r = dict(us=round(t * 1e6, 1), gbps=round(kv_bytes / t / 1e9, 1), cfg=cfg,
                 rounds_us=[round(x * 1e6, 1) for x in ts[name]])  # fmt: skip
        emit(what="decode_ab", who=name, B=B, ctx=ctx, **r)
        out.append(r)
    return out[0], out[1]


def jax_paged_op(B: int, ctx: int, key: int) -> dict:
    """JAX's own Pallas GPU paged_attention op, best of its k_splits x pages_per_compute_block."""
    q, kp, vp, bt, lens = _jax_op_inputs(B, ctx, key)
    kv_bytes = 2 * B * ctx * HKV * D * 2
    best = None
    for ksp in (1, 4, 16):
        for ppcb in (4, 8):
            try:
                op = _jax_paged_op(ksp, ppcb)
                t = loop_time(op, (q, kp, vp, bt, lens), rotate=ROT)
                r = dict(us=round(t * 1e6, 1), gbps=round(kv_bytes / t / 1e9, 1), cfg=f"ks{ksp}/ppcb{ppcb}")
                if best is None or r["us"] < best["us"]:
                    best = r
            except Exception as e:  # noqa: BLE001
                emit(what="jax_paged_op", B=B, ctx=ctx, k_splits=ksp, ppcb=ppcb, error=repr(e)[:200])
    emit(what="jax_paged_op", B=B, ctx=ctx, **(best or {}))
    return best or {}


def prefill(S: int, configs, key: int, interpret: bool = False) -> dict:
    ks = jax.random.split(jax.random.key(key), 3)
    q = jax.random.normal(ks[0], (S, HQ, D), DT)
    k = jax.random.normal(ks[1], (S, HKV, D), DT)
    v = jax.random.normal(ks[2], (S, HKV, D), DT)
    flops = 4 * S * S * D * HQ / 2
    res: dict = {}
    want = jax.jit(functools.partial(fa_ref.flash_attention, sm_scale=D**-0.5))(q, k, v)
    for cfg in configs:
        try:
            f = functools.partial(fa_gpu.flash_attention, sm_scale=D**-0.5, config=cfg, interpret=interpret)
            t = loop_time(lambda i, q, k, v, f=f: f(q, k, v), (q, k, v), iters=10)
            err = rel(jax.jit(f)(q, k, v), want)
            cs = (
                f"bq{cfg.block_q}/bk{cfg.block_k}/w{cfg.num_warps}/st{cfg.num_stages}/hf{int(cfg.heavy_first)}"
                if cfg
                else "default"
            )
            r = dict(what="prefill", impl="jserve_flash", cfg=cs, S=S, us=round(t * 1e6, 1),
                     tflops=round(flops / t / 1e12, 1), rel_err=round(err, 5))  # fmt: skip
            emit(**r)
            if "jserve_flash" not in res or r["tflops"] > res["jserve_flash"]["tflops"]:
                res["jserve_flash"] = r
        except Exception as e:  # noqa: BLE001
            emit(what="prefill", impl="jserve_flash", cfg=str(cfg), S=S, error=repr(e)[:400])
    if not interpret and jax.default_backend() == "gpu":  # what the engine dispatches (Mosaic on Hopper)
        f = functools.partial(flash_api.flash_attention, sm_scale=D**-0.5)
        impl = "mosaic" if flash_api.use_mosaic(q, k, v, None, None, None) else "triton"
        t = loop_time(lambda i, q, k, v, f=f: f(q, k, v), (q, k, v), iters=10)
        err = rel(jax.jit(f)(q, k, v), want)
        r = dict(what="prefill", impl=f"jserve_dispatch_{impl}", S=S, us=round(t * 1e6, 1),
                 tflops=round(flops / t / 1e12, 1), rel_err=round(err, 5))  # fmt: skip
        emit(**r)
        res["jserve_dispatch"] = r
    # Peers: cuDNN (GQA, same shapes), JAX's Pallas Triton mha op (MHA: k/v repeated to 32 heads).
    q4, k4, v4 = q[None], k[None], v[None]
    peers = {
        "cudnn": (
            lambda i, q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
            (q4, k4, v4),
        ),
    }  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.pallas.ops.gpu import attention as tri
    kr, vr = jnp.repeat(k4, HQ // HKV, axis=2), jnp.repeat(v4, HQ // HKV, axis=2)
    peers["jax_pallas_triton_mha"] = (
        lambda i, q, k, v: tri.mha(q, k, v, segment_ids=None, causal=True, sm_scale=D**-0.5),
        (q4, kr, vr),
    )
    for name, (f, args) in peers.items():
        try:
            t = loop_time(f, args, iters=10)
            err = rel(jax.jit(f)(0, *args)[0], want) if name == "cudnn" else None
            r = dict(what="prefill", impl=name, S=S, us=round(t * 1e6, 1), tflops=round(flops / t / 1e12, 1),
                     rel_err=None if err is None else round(err, 5))  # fmt: skip
            emit(**r)
            res[name] = r
        except Exception as e:  # noqa: BLE001
            emit(what="prefill", impl=name, S=S, error=repr(e)[:400])
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="try several kernel configs per case")
    ap.add_argument("--quick", action="store_true", help="skip peers and the mixed batch")
    ap.add_argument("--only", default="", help="comma list among ceil,decode,mixed,prefill,kvwrite")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved ours/peer rounds for decode")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny shapes in interpret mode (checks this script on CPU)"
    )
    a = ap.parse_args()
    if a.smoke:
        run_rpa("smoke decode", [1, 1], [40, 17], 0, [None], interpret=True)
        run_rpa("smoke mixed", [5, 1], [5, 17], 1, [None], interpret=True)
        prefill(64, [fa_gpu.FlashGpuConfig(32, 16, 4, 1)], 2, interpret=True)
        return
    only = set(a.only.split(",")) if a.only else {"ceil", "decode", "mixed", "prefill", "kvwrite"}
    emit(what="env", jax=jax.__version__, device=str(jax.devices()[0].device_kind))
    C = rpa_gpu.GpuConfig
    table = []
    ceil = ceilings() if "ceil" in only else {"hbm": float("nan"), "mm": float("nan")}
    if "kvwrite" in only:
        for n in (256, 4096):
            kv_write_bench(n)
    if "decode" in only:
        harness_floor()
        for B, ctx in ((1, 8192), (64, 2048), (256, 512)):
            cfgs = [None]
            if a.sweep:
                sweep = (
                    ((4, 16, 4, 2), (4, 64, 4, 2), (2, 64, 4, 2), (8, 32, 4, 2), (4, 32, 2, 2))
                    if B == 1
                    else ((4, 1, 4, 3), (2, 1, 4, 2), (8, 1, 4, 2))
                )
                cfgs += [C(block_q=4, pages_per_block=p, num_splits=s, num_warps=w, num_stages=st)
                         for p, s, w, st in sweep]  # fmt: skip
                if B == 1:
                    cfgs += [
                        C(4, p, s, 4, 2, fused_combine=True) for p, s in ((4, 32), (4, 64), (2, 64), (8, 16))
                    ]
            ours = run_rpa(f"decode {B}x{ctx}", [1] * B, [ctx] * B, B + ctx, cfgs)
            peer = {} if a.quick else jax_paged_op(B, ctx, B + ctx)
            if peer and a.rounds > 1:  # the table's numbers: interleaved rounds, default config
                ours, peer = decode_ab(B, ctx, B + ctx, peer["cfg"], a.rounds)
            table.append((f"decode {B}x{ctx}", ours, peer))
    if "mixed" in only:
        ql = [512] * 8 + [1] * 248
        cl = [512] * 8 + [2048] * 248
        P = rpa_gpu.GpuPlan
        cfgs = [None]
        if a.sweep:
            cfgs += [P(C(4, 4), C(32, 4, 1, 4, 2)), P(C(4, 4), C(16, 4, 1, 4, 3))]
        mixed = run_rpa("mixed 8x512+248x2048", ql, cl, 7, cfgs)
        dec = run_rpa("mixed part: 248 decodes @2048", [1] * 248, [2048] * 248, 8, cfgs)
        pre = run_rpa("mixed part: 8 prefill x512", [512] * 8, [512] * 8, 9, cfgs)
        table.append(("mixed (parts: " + f"{dec.get('us')} + {pre.get('us')} us)", mixed, {}))
    if "prefill" in only:
        for S in (2048, 8192):
            F = fa_gpu.FlashGpuConfig
            cfgs = [None] + (
                [F(128, 128, 8, 3, False), F(64, 128, 4, 3), F(128, 64, 4, 3)] if a.sweep else []
            )
            res = prefill(S, cfgs, S)
            ours = res.pop("jserve_dispatch", None) or res.pop("jserve_flash", {})
            table.append((f"prefill 1x{S} ({ours.get('impl', 'jserve_flash')})", ours, res))
            run_rpa(f"prefill 1x{S} via ragged kernel", [S], [S], S + 1, [None], check=False)
    print(f"\nceilings: HBM {ceil['hbm']:.0f} GB/s, bf16 matmul {ceil['mm']:.0f} TFLOP/s")
    print(f"{'case':44s} {'jserve us':>10s} {'GB/s':>7s} {'TFLOP/s':>8s} {'%HBM':>5s}  peers")
    for name, ours, peer in table:
        gb = ours.get("gbps")
        pct = f"{100 * gb / ceil['hbm']:.0f}" if gb else "-"
        peers = (
            "; ".join(f"{k}: {v.get('us')} us {v.get('tflops', v.get('gbps'))}" for k, v in peer.items()
                      if isinstance(v, dict))
            if "gbps" not in peer else f"jax op {peer['us']} us {peer['gbps']} GB/s ({peer['cfg']})"
        )  # fmt: skip
        print(f"{name:44s} {ours.get('us', '-')!s:>10s} {gb or '-'!s:>7s} {ours.get('tflops', '-')!s:>8s} "
              f"{pct:>5s}  {peers}")  # fmt: skip
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "kernels.json"), "w") as fh:
            json.dump(RESULTS, fh, indent=1)


if __name__ == "__main__":
    main()
