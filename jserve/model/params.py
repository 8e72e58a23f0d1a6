"""Parameter layout of the Llama-family decoder: HF tensor names, shapes, logical axes.

Where it sits: ``LLM`` start-up -> ``load_params`` (streams an HF checkpoint through
``checkpoints``) or ``random_params`` (benchmarks: real shapes, random values) -> the param
pytree the jitted step reads. Logical axes go through ``sharding`` rules, so the same tree
runs at tp=1 and tp=N (kv heads replicate when they don't divide the tensor axis).

Tree (H hidden, I intermediate, V vocab, Nq/Nkv heads, d head_dim)::

    {"embed": [V, H], "norm": [H], "lm_head": [H, V] (absent when tied),
     "layers": [ {"ln_attn": [H], "wq": [H, Nq*d], "wk": [H, Nkv*d], "wv": [H, Nkv*d],
                  "bq"/"bk"/"bv" (qkv_bias only), "wo": [Nq*d, H], "ln_mlp": [H],
                  "wg": [H, I], "wu": [H, I], "wd": [I, H]}, ... ]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from checkpoints import HFModelDir, load_tensor
from jserve.config import ModelConfig
from sharding import TENSOR_AXIS, logical_sharding_for_shape

Params = dict[str, Any]


@dataclass(frozen=True)
class ParamSpec:
    hf_name: str
    shape: tuple[int, ...]
    logical_axes: tuple[str | None, ...]
    transpose: bool = False  # HF Linear weights are [out, in]; we keep [in, out]
    is_norm: bool = False


def _layer_specs(cfg: ModelConfig, i: int) -> dict[str, ParamSpec]:
    h, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    p = f"model.layers.{i}."
    specs = {
        "ln_attn": ParamSpec(p + "input_layernorm.weight", (h,), ("embed",), is_norm=True),
        "wq": ParamSpec(p + "self_attn.q_proj.weight", (h, q), ("embed", "heads"), True),
        "wk": ParamSpec(p + "self_attn.k_proj.weight", (h, kv), ("embed", "kv_heads"), True),
        "wv": ParamSpec(p + "self_attn.v_proj.weight", (h, kv), ("embed", "kv_heads"), True),
        "wo": ParamSpec(p + "self_attn.o_proj.weight", (q, h), ("heads", "embed"), True),
        "ln_mlp": ParamSpec(p + "post_attention_layernorm.weight", (h,), ("embed",), is_norm=True),
        "wg": ParamSpec(p + "mlp.gate_proj.weight", (h, inter), ("embed", "mlp"), True),
        "wu": ParamSpec(p + "mlp.up_proj.weight", (h, inter), ("embed", "mlp"), True),
        "wd": ParamSpec(p + "mlp.down_proj.weight", (inter, h), ("mlp", "embed"), True),
    }
    if cfg.qkv_bias:
        specs["bq"] = ParamSpec(p + "self_attn.q_proj.bias", (q,), ("heads",))
        specs["bk"] = ParamSpec(p + "self_attn.k_proj.bias", (kv,), ("kv_heads",))
        specs["bv"] = ParamSpec(p + "self_attn.v_proj.bias", (kv,), ("kv_heads",))
    return specs


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """The spec tree, same structure as the param tree."""
    top: dict[str, Any] = {
        "embed": ParamSpec("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size),
                           ("vocab", "embed")),
        "norm": ParamSpec("model.norm.weight", (cfg.hidden_size,), ("embed",), is_norm=True),
        "layers": [_layer_specs(cfg, i) for i in range(cfg.num_layers)],
    }
    if not cfg.tie_word_embeddings:
        top["lm_head"] = ParamSpec("lm_head.weight", (cfg.hidden_size, cfg.vocab_size),
                                   ("embed", "vocab"), True)
    return top


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec)


def spec_sharding(cfg: ModelConfig, mesh: Mesh, spec: ParamSpec) -> NamedSharding:
    """Sharding of one param. Head axes are flattened (``Nq*d``), so whether they split is
    decided by the head count, not the flat size: kv heads that don't divide the tensor axis
    replicate instead of splitting a head across devices."""
    tp = mesh.shape[TENSOR_AXIS]
    whole = {"heads": cfg.num_heads % tp == 0, "kv_heads": cfg.num_kv_heads % tp == 0}
    axes = tuple(None if whole.get(a, True) is False else a for a in spec.logical_axes)
    return logical_sharding_for_shape(mesh, spec.shape, axes)


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    return jax.tree.map(lambda s: spec_sharding(cfg, mesh, s), param_specs(cfg), is_leaf=_is_spec)


def load_params(model_dir: HFModelDir, cfg: ModelConfig, mesh: Mesh) -> Params:
    """Stream every tensor of an HF checkpoint into sharded device arrays of ``cfg.dtype``.

    Tensors the model does not use (e.g. ``rotary_emb.inv_freq``) are ignored; a missing or
    misshapen tensor raises ``CheckpointError`` naming the file and tensor.
    """
    dtype = jnp.dtype(cfg.dtype)

    def one(spec: ParamSpec) -> jax.Array:
        sharding = spec_sharding(cfg, mesh, spec)
        return load_tensor(model_dir, spec.hf_name, sharding=sharding, dtype=dtype,
                           expected_shape=spec.shape, transpose=spec.transpose)

    return jax.tree.map(one, param_specs(cfg), is_leaf=_is_spec)


def random_params(cfg: ModelConfig, mesh: Mesh, seed: int = 0, scale: float = 0.02) -> Params:
    """Random weights of the real shapes, generated on device already sharded (benchmarks)."""
    dtype = jnp.dtype(cfg.dtype)
    specs, treedef = jax.tree.flatten(param_specs(cfg), is_leaf=_is_spec)
    cache: dict[tuple, Any] = {}
    out = []
    for i, spec in enumerate(specs):
        sharding = spec_sharding(cfg, mesh, spec)
        key = (spec.shape, spec.is_norm, sharding)
        if key not in cache:
            if spec.is_norm:
                fn = lambda k, shape=spec.shape: jnp.ones(shape, dtype)
            else:
                fn = lambda k, shape=spec.shape: (jax.random.normal(k, shape, jnp.float32)
                                                  * scale).astype(dtype)
            cache[key] = jax.jit(fn, out_shardings=sharding)
        out.append(cache[key](jax.random.key(seed * 100003 + i)))
    return jax.tree.unflatten(treedef, out)


def params_bytes(params: Params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
