"""Load time of a model: HF safetensors streaming vs orbax restore, same shape, same mesh.

Writes a random-valued HF directory of a named shape (Llama-3.1-8B by default: 16 GB of bf16 in
5 GB shards, HF names and layout), converts it with ``jserve convert``'s function, then times
``load_params`` (safetensors -> stacked, fused, sharded params) against ``restore_params``
(orbax -> the same params), each ``--repeats`` times, alternating, and prints one table.
Values are random (a reused random block): load time does not depend on them.

    PYTHONPATH=. python benchmarks/orbax_load.py --dir /tmp/jserve_load_bench [--tp 1] [--drop-caches]

``--drop-caches`` writes /proc/sys/vm/drop_caches before each load (needs root) so both read
from disk; without it both read from the page cache (the directory was just written).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from checkpoints import HFModelDir
from checkpoints.orbax_dir import OrbaxModelDir
from jserve.config import ModelConfig
from jserve.convert import convert
from jserve.model.orbax_params import restore_params
from jserve.model.params import load_params
from jserve.model.shapes import NAMED_SHAPES
from sharding import make_mesh

SHARD_BYTES = 5 * 2**30


def hf_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape (torch layout: Linear weights are [out, in])."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    out = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        out.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                    p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i)})
        if cfg.qkv_bias:
            out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,)})
    return out


def write_hf_dir(path: Path, shape: str) -> ModelConfig:
    config = NAMED_SHAPES[shape]
    cfg = ModelConfig.from_hf_config(config, dtype="bfloat16")
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    tensors = hf_tensors(cfg)
    biggest = max(int(np.prod(s)) for s in tensors.values())
    block = (np.random.default_rng(0).standard_normal(biggest, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, shp in tensors.items():
        n = int(np.prod(shp))
        if size + 2 * n > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = block[:n].reshape(shp)
        size += 2 * n
    weight_map = {}
    for k, tensors_k in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors_k, str(path / file))
        weight_map.update({name: file for name in tensors_k})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return cfg


def _drop_caches() -> None:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise SystemExit(f"--drop-caches: cannot write /proc/sys/vm/drop_caches ({e}); run as root") from e


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="scratch directory (needs ~2x the model's bytes)")
    ap.add_argument("--shape", default="llama3.1-8b", choices=sorted(NAMED_SHAPES))
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--dtype", default="bfloat16",
                    help="the model dtype load_params casts the bf16 checkpoint to (orbax: bfloat16 only)")
    ap.add_argument("--keep", action="store_true", help="keep the written directories")
    ap.add_argument("--reuse", action="store_true", help="reuse directories a --keep run left")
    ns = ap.parse_args()
    root = Path(ns.dir)
    hf, orbax = root / "hf", root / "orbax"
    write_s = convert_s = 0.0
    if ns.reuse and (orbax / "jserve_checkpoint.json").is_file():
        cfg = ModelConfig.from_hf_config(NAMED_SHAPES[ns.shape], dtype="bfloat16")
    else:
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        cfg = write_hf_dir(hf, ns.shape)
        write_s = time.perf_counter() - t
        t = time.perf_counter()
        convert(str(hf), str(orbax), dtype="bfloat16", tensor_parallel_size=ns.tp)
        convert_s = time.perf_counter() - t
    mesh = make_mesh(ns.tp)
    as_dtype = dataclasses.replace(cfg, dtype=ns.dtype)
    loaders = {f"safetensors (load_params) as {ns.dtype}":
               lambda: load_params(HFModelDir(hf), as_dtype, mesh)}
    if ns.dtype == "bfloat16":
        loaders["orbax (restore_params)"] = lambda: restore_params(OrbaxModelDir(orbax), cfg, mesh)
    times: dict[str, list[float]] = {k: [] for k in loaders}
    for _ in range(ns.repeats):
        for name, load in loaders.items():
            if ns.drop_caches:
                _drop_caches()
            t = time.perf_counter()
            params = load()
            jax.block_until_ready(params)
            times[name].append(time.perf_counter() - t)
            del params
    gb = sum(int(np.prod(s)) for s in hf_tensors(cfg).values()) * 2 / 1e9
    dev = jax.devices()[0]
    print(f"\n{ns.shape} ({gb:.1f} GB bf16) on {getattr(dev, 'device_kind', dev)} x tp={ns.tp}, "
          f"{'cold (drop_caches)' if ns.drop_caches else 'page cache warm'}; "
          f"wrote HF in {write_s:.1f} s, converted in {convert_s:.1f} s")
    print("\n| loader | best s | all runs s | GB/s |\n|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {min(ts):.2f} | {', '.join(f'{x:.2f}' for x in ts)} | {gb / min(ts):.1f} |")
    if not ns.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
