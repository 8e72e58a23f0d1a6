"""The draft's decode forward through the fused decode layer against the unfused layers, on the GPU.

Where it sits: the A/B that decides whether ``pallas_kernels.decode_layer`` replaces the draft
model's decode layers (issue 12, batch 1: the speculative step is bound by its kernel count).
It does not yet: session 27 (H200) measured it 0.1-0.57x the unfused forward (RESULTS.md).
One jit runs ``--reps`` decode forwards back to back (unrolled, each feeding the next its K/V
pool), so the time per forward is the device's including its launch gaps, as inside the
speculative step. Columns: kernels per forward (``hlo_kernels.census`` of the optimized
program / reps) and us per forward, fused and unfused, per row count and context length.
Random weights of the model's real shapes (default: the bundled ``code-draft``). ``--sweep``
times the GPU kernel alone (one layer, one row) per launch configuration instead: Triton's
warps and stages and the widest weight tile::

    PYTHONPATH=. python3 benchmarks/decode_layer.py --rows 1,2,8 --contexts 64,300,1000
    PYTHONPATH=. python3 benchmarks/decode_layer.py --sweep --contexts 0,64,1000
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import pallas_kernels
from benchmarks.hlo_kernels import census
from jserve.builder import DEFAULT_MODELS, default_model_path
from jserve.config import ModelConfig
from jserve.kv_cache import allocate_kv_cache
from jserve.model.decoder import hidden_states, rms_norm
from jserve.model.params import random_params
from jserve.model.rope import inv_frequencies, rope_cos_sin
from jserve.step_input import StepInput
from pallas_kernels.decode_layer import gpu
from sharding import make_mesh


def _step(rows: int, context: int, ps: int, pages_per_seq: int) -> StepInput:
    """Each row's next token at ``context``, its pages consecutive from page 1 + row * pages."""
    b = StepInput.empty(rows, rows, pages_per_seq)
    for r in range(rows):
        b.page_table[r] = 1 + r * pages_per_seq + np.arange(pages_per_seq)
        b.token_ids[r], b.positions[r] = 100 + r, context
        b.slot_mapping[r] = b.page_table[r, context // ps] * ps + context % ps
        b.seq_lens[r] = context + 1
        b.query_start_loc[r + 1] = r + 1
        b.logits_indices[r] = r
    b.num_seqs[0] = rows
    return b


def fused_forward(cfg: ModelConfig, params: dict, kv: list, step: StepInput) -> tuple[jax.Array, list]:
    """The decode forward with one ``pallas_kernels.decode_layer`` launch per layer ->
    (final-normed hidden [T, H], kv)."""
    x = params["embed"][step.token_ids]
    cos, sin = rope_cos_sin(step.positions, inv_frequencies(cfg))
    w = [params[n] for n in ("ln_attn", "wqkv", "wo", "ln_mlp", "wgu", "wd")]
    new_kv = []
    for i, (k_pages, v_pages) in enumerate(kv):
        x, k_pages, v_pages = pallas_kernels.decode_layer(
            x, w[0], w[1], params["bqkv"] if cfg.qkv_bias else None, w[2], w[3], w[4], w[5], cos,
            sin, k_pages, v_pages, step.page_table, step.query_start_loc, step.positions,
            step.slot_mapping, step.num_seqs, layer=i, eps=cfg.rms_norm_eps,
            sm_scale=cfg.head_dim ** -0.5)
        new_kv.append((k_pages, v_pages))
    return rms_norm(x, params["norm"], cfg.rms_norm_eps), new_kv


def _timed(compiled, kv, *rest, iters: int, reps: int) -> float:
    """Median seconds per rep of ``compiled(kv, *rest) -> (out, kv)``, kv fed back."""
    out, kv = compiled(kv, *rest)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out, kv = compiled(kv, *rest)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times)


def _sweep(ns: argparse.Namespace, cfg: ModelConfig, params: dict, kv0: list, contexts: list[int],
           ps: int, per_seq: int) -> None:
    """One layer's kernel, one row, ``reps`` launches per call, per configuration and context."""
    rope = jax.numpy.ones((1, cfg.head_dim), jax.numpy.float32)
    w = [params[n] for n in ("ln_attn", "wqkv", "wo", "ln_mlp", "wgu", "wd")]
    print("| warps:stages:widest | " + " | ".join(f"us at {c}" for c in contexts) + " |")
    print("|---|" + "---|" * len(contexts))
    for conf in ns.configs.split(","):
        warps, stages, widest = (int(v) for v in conf.split(":"))
        cells = []
        for context in contexts:
            st = jax.device_put(_step(1, context, ps, per_seq))

            def run(pool, st=st, warps=warps, stages=stages, widest=widest):
                x = params["embed"][st.token_ids]
                for _ in range(ns.reps):
                    x, k, v = gpu.decode_layer(
                        x, w[0], w[1], None, w[2], w[3], w[4], w[5], rope, rope, pool[0], pool[1],
                        st.page_table, st.query_start_loc, st.positions, st.slot_mapping,
                        st.num_seqs, layer=0, eps=cfg.rms_norm_eps, sm_scale=0.125,
                        num_warps=warps, num_stages=stages, widest=widest)
                    pool = (k, v)
                return x, pool

            fn = jax.jit(run, donate_argnums=0)
            pool = tuple(a.copy() for a in kv0[0])
            cells.append(f"{_timed(fn, pool, iters=ns.iters, reps=ns.reps) * 1e6:.1f}")
        print(f"| {conf} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="code-draft")
    ap.add_argument("--rows", default="1,2,8")
    ap.add_argument("--contexts", default="64,300,1000")
    ap.add_argument("--reps", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="the kernel alone per launch configuration")
    ap.add_argument("--configs", default="4:2:64,2:2:64,1:2:64,1:1:64,1:3:64,1:2:128,2:2:128",
                    help="with --sweep: num_warps:num_stages:widest, comma separated")
    ns = ap.parse_args()
    from checkpoints import HFModelDir
    path = default_model_path(ns.model) if ns.model in DEFAULT_MODELS else ns.model
    cfg = ModelConfig.from_hf_config(HFModelDir(str(path)).config, dtype="bfloat16")
    mesh = make_mesh(1)
    params = random_params(cfg, mesh)
    ps, contexts = 16, [int(c) for c in ns.contexts.split(",")]
    per_seq = -(-(max(contexts) + 1) // ps)
    rows_list = [int(r) for r in ns.rows.split(",")]
    kv0 = allocate_kv_cache(cfg, 1 + max(rows_list) * per_seq, ps, "bfloat16", mesh)
    print(f"{ns.model} on {jax.devices()[0].device_kind}: {ns.reps} decode forwards per call, "
          f"median of {ns.iters}")
    print("| rows | context | kernels fused | kernels unfused | us fused | us unfused | x |")
    print("|---|---|---|---|---|---|---|")

    def chain(forward):
        def run(kv, step):
            h = None
            for _ in range(ns.reps):
                h, kv = forward(kv, step)
            return h, kv
        return jax.jit(run, donate_argnums=0)

    if ns.sweep:
        _sweep(ns, cfg, params, kv0, contexts, ps, per_seq)
        return
    arms = {"fused": lambda kv, s: fused_forward(cfg, params, kv, s),
            "unfused": lambda kv, s: hidden_states(cfg, params, kv, s, decode_only=True)}
    for rows in rows_list:
        for context in contexts:
            step = jax.device_put(_step(rows, context, ps, per_seq))
            res = {}
            for name, fwd in arms.items():
                fn = chain(fwd)
                compiled = fn.lower(kv0, step).compile()
                kernels = sum(census(compiled.as_text()).values()) / ns.reps
                kv = jax.tree.map(lambda a: a.copy(), kv0)
                h, kv = compiled(kv, step)
                h.block_until_ready()
                times = []
                for _ in range(ns.iters):
                    t0 = time.perf_counter()
                    h, kv = compiled(kv, step)
                    h.block_until_ready()
                    times.append((time.perf_counter() - t0) / ns.reps)
                res[name] = (kernels, statistics.median(times))
                del kv
            (kf, tf), (ku, tu) = res["fused"], res["unfused"]
            print(f"| {rows} | {context} | {kf:.1f} | {ku:.1f} | {tf * 1e6:.1f} | {tu * 1e6:.1f} | "
                  f"{tu / tf:.2f} |", flush=True)


if __name__ == "__main__":
    main()
