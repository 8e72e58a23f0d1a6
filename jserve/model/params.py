"""Parameter layout of the Llama-family decoder: few stacked, fused arrays; HF names; axes.

Where it sits: ``LLM`` start-up -> ``load_params`` (streams an HF checkpoint through
``checkpoints``) or ``random_params`` (benchmarks: real shapes, random values) -> the param
tree every jitted step reads. Logical axes go through ``sharding`` rules, so the same tree
runs at tp=1 and tp=N (kv heads replicate when they don't divide the tensor axis).

Why stacked and fused: the host cost of calling a jitted function grows with the number of
arrays passed (~5 us each on an H200; 290 per-layer weights cost ~1 ms per step). Every
per-layer weight is one ``[L, ...]`` array the decoder slices statically inside the jit (the
layer loop stays unrolled: a ``lax.scan`` over layers measured 2.2x slower on the 8B decode),
and the projections that read the same input are fused into one matmul each (fewer kernels)::

    embed [V, H]   norm [H]   lm_head [H, V] (absent when tied; 8-bit [1, V, H] under
                                                quantize_lm_head: quant_params.quantize_head)
    ln_attn, ln_mlp [L, H]
    wqkv  [L, H, Nkv, Gp + 2, d]  per kv head j: its G query heads (zero-padded to Gp), k_j, v_j
    bqkv  [L, Nkv, Gp + 2, d]     (qkv_bias only)
    wo    [L, Nkv * Gp * d, H]    (zero rows for the padded heads)
    wgu   [L, H, 2, I]            gate, up
    wd    [L, I, H]

Grouping the query heads by their kv head keeps the fused QKV shardable over kv heads: device
i's slice holds exactly the q, k and v heads its attention needs (G = Nq / Nkv). Gp is G
rounded up to a power of two (``ModelConfig.q_per_kv_padded``: the GPU kernel's tile): the
padded heads have zero weights and zero output rows, so they add exactly nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from checkpoints import HFModelDir, load_stacked, load_tensor
from jserve.config import ModelConfig
from jserve.model.quant_params import (
    load_quantized_projections,
    quantize_dense,
    quantize_head,
    resolve_scheme,
)
from sharding import TENSOR_AXIS, logical_sharding_for_shape

Params = dict[str, jax.Array]


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    is_norm: bool = False


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """The spec of every array, same keys as the param tree."""
    h, inter, d, n = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_layers
    nkv, g = cfg.num_kv_heads, cfg.q_per_kv_padded
    specs = {
        "embed": ParamSpec((cfg.vocab_size, h), ("vocab", "embed")),
        "norm": ParamSpec((h,), ("embed",), is_norm=True),
        "ln_attn": ParamSpec((n, h), ("layers", "embed"), is_norm=True),
        "ln_mlp": ParamSpec((n, h), ("layers", "embed"), is_norm=True),
        "wqkv": ParamSpec((n, h, nkv, g + 2, d), ("layers", "embed", "kv_heads", None, "head_dim")),
        "wo": ParamSpec((n, cfg.num_q_heads_padded * d, h), ("layers", "heads", "embed")),
        "wgu": ParamSpec((n, h, 2, inter), ("layers", "embed", None, "mlp")),
        "wd": ParamSpec((n, inter, h), ("layers", "mlp", "embed")),
    }
    if cfg.qkv_bias:
        specs["bqkv"] = ParamSpec((n, nkv, g + 2, d), ("layers", "kv_heads", None, "head_dim"))
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((h, cfg.vocab_size), ("embed", "vocab"))
    return specs


def spec_sharding(cfg: ModelConfig, mesh: Mesh, spec: ParamSpec) -> NamedSharding:
    """Sharding of one param. Head axes split only when the head count divides the tensor axis
    (a flat ``Nq*d`` axis must not split a head across devices); else they replicate."""
    tp = mesh.shape[TENSOR_AXIS]
    whole = {"heads": cfg.num_q_heads_padded % tp == 0, "kv_heads": cfg.num_kv_heads % tp == 0}
    axes = tuple(None if whole.get(a, True) is False else a for a in spec.logical_axes)
    return logical_sharding_for_shape(mesh, spec.shape, axes)


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict[str, NamedSharding]:
    return {k: spec_sharding(cfg, mesh, s) for k, s in param_specs(cfg).items()}


def _fuse_qkv(cfg: ModelConfig) -> Callable[..., jax.Array]:
    """q [..., Nq*d], k/v [..., Nkv*d] -> [..., Nkv, Gp + 2, d] (per kv head: its q heads, zero
    heads up to Gp, k, v)."""
    nkv, g, gp, d = cfg.num_kv_heads, cfg.q_per_kv, cfg.q_per_kv_padded, cfg.head_dim

    def fuse(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        lead = q.shape[:-1]
        zeros = jnp.zeros((*lead, nkv, gp - g, d), q.dtype)
        return jnp.concatenate([q.reshape(*lead, nkv, g, d), zeros, k.reshape(*lead, nkv, 1, d),
                                v.reshape(*lead, nkv, 1, d)], axis=-2)
    return fuse


def _pad_wo(cfg: ModelConfig) -> Callable[[jax.Array], jax.Array]:
    """wo [L, Nq*d, H] -> [L, Nkv*Gp*d, H] with zero rows for the padded heads."""
    nkv, g, gp, d = cfg.num_kv_heads, cfg.q_per_kv, cfg.q_per_kv_padded, cfg.head_dim

    def pad(wo: jax.Array) -> jax.Array:
        n, _, h = wo.shape
        w = jnp.pad(wo.reshape(n, nkv, g, d, h), ((0, 0), (0, 0), (0, gp - g), (0, 0), (0, 0)))
        return w.reshape(n, nkv * gp * d, h)
    return pad


def load_params(model_dir: HFModelDir, cfg: ModelConfig, mesh: Mesh,
                quantization: str | None = None, quantize_lm_head: bool = False) -> Params:
    """Stream every tensor of an HF checkpoint into the stacked, sharded layout, in ``cfg.dtype``.

    Per-layer tensors are read stacked (each device reads its slice), then fused on device.
    Tensors the model does not use (e.g. ``rotary_emb.inv_freq``) are ignored; a missing or
    misshapen tensor raises ``CheckpointError`` naming the file and tensor. With
    ``quantization`` ("int8", "fp8", "fp8_w8a8") or a checkpoint that carries a
    ``quantization_config``, the four projections are 8-bit ``QuantizedWeight`` s instead
    (jserve/model/quant_params.py); an unsupported ``quantization_config`` is a CheckpointError.
    ``quantize_lm_head`` quantizes the lm_head too (``quant_params.quantize_head``).
    """
    scheme = resolve_scheme(model_dir.config, quantization, str(model_dir.path / "config.json"),
                            quantize_lm_head)
    dtype = jnp.dtype(cfg.dtype)
    specs = param_specs(cfg)
    shard = {k: spec_sharding(cfg, mesh, s) for k, s in specs.items()}
    h, inter, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim

    def layers(name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
               transpose: bool = True) -> jax.Array:
        names = [f"model.layers.{i}.{name}" for i in range(n)]
        sharding = spec_sharding(cfg, mesh, ParamSpec((n, *shape), ("layers", *axes)))
        return load_stacked(model_dir, names, sharding=sharding, dtype=dtype,
                            expected_shape=shape, transpose=transpose)

    def one(name: str, key: str, transpose: bool = False) -> jax.Array:
        return load_tensor(model_dir, name, sharding=shard[key], dtype=dtype,
                           expected_shape=specs[key].shape, transpose=transpose)

    fuse = _fuse_qkv(cfg)
    p: Params = {
        "embed": one("model.embed_tokens.weight", "embed"),
        "norm": one("model.norm.weight", "norm"),
        "ln_attn": layers("input_layernorm.weight", (h,), ("embed",), transpose=False),
        "ln_mlp": layers("post_attention_layernorm.weight", (h,), ("embed",), transpose=False),
    }
    if cfg.qkv_bias:
        bq = layers("self_attn.q_proj.bias", (q,), ("heads",), transpose=False)
        bk = layers("self_attn.k_proj.bias", (kvd,), ("kv_heads",), transpose=False)
        bv = layers("self_attn.v_proj.bias", (kvd,), ("kv_heads",), transpose=False)
        p["bqkv"] = jax.jit(fuse, out_shardings=shard["bqkv"])(bq, bk, bv)
    if not cfg.tie_word_embeddings:
        p["lm_head"] = one("lm_head.weight", "lm_head", transpose=True)
    if scheme is not None:
        p.update(load_quantized_projections(model_dir, cfg, mesh, scheme))
        return quantize_head(p, cfg, mesh, scheme) if scheme.lm_head else p
    p["wd"] = layers("mlp.down_proj.weight", (inter, h), ("mlp", "embed"))
    wo = layers("self_attn.o_proj.weight", (q, h), ("heads", "embed"))
    p["wo"] = wo if cfg.q_per_kv_padded == cfg.q_per_kv else jax.jit(
        _pad_wo(cfg), out_shardings=shard["wo"])(wo)
    wq = layers("self_attn.q_proj.weight", (h, q), ("embed", "heads"))
    wk = layers("self_attn.k_proj.weight", (h, kvd), ("embed", "kv_heads"))
    wv = layers("self_attn.v_proj.weight", (h, kvd), ("embed", "kv_heads"))
    p["wqkv"] = jax.jit(fuse, out_shardings=shard["wqkv"])(wq, wk, wv)
    wg = layers("mlp.gate_proj.weight", (h, inter), ("embed", "mlp"))
    wu = layers("mlp.up_proj.weight", (h, inter), ("embed", "mlp"))
    p["wgu"] = jax.jit(lambda a, b: jnp.stack([a, b], axis=2), out_shardings=shard["wgu"])(wg, wu)
    return p


def random_params(cfg: ModelConfig, mesh: Mesh, seed: int = 0, scale: float = 0.02,
                  quantization: str | None = None, quantize_lm_head: bool = False) -> Params:
    """Random weights of the real shapes, generated on device already sharded (benchmarks);
    ``quantization`` quantizes the four projections (``quantize_dense``), and the lm_head with
    ``quantize_lm_head``."""
    dtype = jnp.dtype(cfg.dtype)
    out: Params = {}
    for i, (name, spec) in enumerate(sorted(param_specs(cfg).items())):
        sharding = spec_sharding(cfg, mesh, spec)
        if spec.is_norm:
            fn = lambda k, shape=spec.shape: jnp.ones(shape, dtype)
        else:
            fn = lambda k, shape=spec.shape: (jax.random.normal(k, shape, jnp.float32)
                                              * scale).astype(dtype)
        out[name] = jax.jit(fn, out_shardings=sharding)(jax.random.key(seed * 100003 + i))
    scheme = resolve_scheme({}, quantization, "random weights", quantize_lm_head)
    return out if scheme is None else quantize_dense(out, cfg, mesh, scheme)


def params_bytes(params: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
