"""Tensor parallelism beyond the KV-head count: replicate KV heads so every device has its own.

Where it sits: start-up, between the checkpoint and the serving mesh. ``make_engine_config``
turns the checkpoint's ``ModelConfig`` into the *served* one (``serving_model_config``); the
loaders (HF safetensors, orbax) read the params in the checkpoint's layout and
``replicate_kv_heads`` rewrites them into the served layout on the mesh. Everything after that
(KV pool, attention under ``shard_map``, ``jserve plan``) sees an ordinary model whose KV heads
divide the tensor axis: no branch in model code.

With ``Nkv`` KV heads, ``G = Nq / Nkv`` query heads per KV head and ``tp = r * Nkv`` devices,
each KV head is copied ``r`` times and its ``G`` query heads are dealt out ``G / r`` per copy::

    checkpoint (Nkv=2, G=2)                  served on tp=4 (Nkv'=4, G'=1)
    kv0: q0 q1 | k0 v0                       kv0': q0 | k0 v0   -> device 0
    kv1: q2 q3 | k1 v1                       kv1': q1 | k0 v0   -> device 1
                                             kv2': q2 | k1 v1   -> device 2
                                             kv3': q3 | k1 v1   -> device 3

The query-head order is unchanged (q head h still reads the K/V of checkpoint head h // G), so
``wo`` only loses the old padding and gains the new one (``ModelConfig.q_per_kv_padded``). The
KV pool holds ``Nkv'`` heads, one per device: the same per-device bytes as a model with ``tp``
KV heads, and every device writes the copy it reads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jserve.config import ModelConfig
from jserve.model.params import Params, param_shardings


def kv_head_replicas(cfg: ModelConfig, tensor_parallel_size: int) -> int:
    """How many copies of each KV head ``tensor_parallel_size`` devices need (1: none).

    ValueError naming the fields when the head counts cannot be dealt out evenly."""
    tp, nkv, nq = tensor_parallel_size, cfg.num_kv_heads, cfg.num_heads
    if tp <= nkv:
        return 1
    if tp % nkv or nq % tp:
        raise ValueError(
            f"tensor_parallel_size ({tp}) is larger than num_key_value_heads ({nkv}): it must be "
            f"a multiple of num_key_value_heads and divide num_attention_heads ({nq}) so that each "
            f"device gets whole query heads and one copy of their KV head")
    return tp // nkv


def serving_model_config(cfg: ModelConfig, tensor_parallel_size: int) -> ModelConfig:
    """The model as served on ``tensor_parallel_size`` devices: ``num_kv_heads`` multiplied by
    ``kv_head_replicas`` (the same config when no replication is needed)."""
    r = kv_head_replicas(cfg, tensor_parallel_size)
    return cfg if r == 1 else dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * r)


def _expand_qkv(x: jax.Array, base: ModelConfig, served: ModelConfig) -> jax.Array:
    """[..., Nkv, Gp + 2, d] -> [..., Nkv * r, Gp' + 2, d]."""
    g, gp = base.q_per_kv, base.q_per_kv_padded
    g2, gp2 = served.q_per_kv, served.q_per_kv_padded
    r = served.num_kv_heads // base.num_kv_heads
    lead, d = x.shape[:-3], x.shape[-1]
    q = x[..., :g, :].reshape(*lead, base.num_kv_heads * r, g2, d)
    q = jnp.concatenate([q, jnp.zeros((*lead, q.shape[-3], gp2 - g2, d), x.dtype)], axis=-2)
    kv = jnp.repeat(x[..., gp:gp + 2, :], r, axis=-3)
    return jnp.concatenate([q, kv], axis=-2)


def _expand_wo(wo: jax.Array, base: ModelConfig, served: ModelConfig) -> jax.Array:
    """[L, Nkv * Gp * d, H] -> [L, Nkv' * Gp' * d, H] (padded heads' rows zero)."""
    n, _, h = wo.shape
    d, g, gp2 = base.head_dim, base.q_per_kv, served.q_per_kv_padded
    w = wo.reshape(n, base.num_kv_heads, base.q_per_kv_padded, d, h)[:, :, :g]
    w = w.reshape(n, served.num_kv_heads, served.q_per_kv, d, h)
    w = jnp.pad(w, ((0, 0), (0, 0), (0, gp2 - served.q_per_kv), (0, 0), (0, 0)))
    return w.reshape(n, served.num_kv_heads * gp2 * d, h)


def replicate_kv_heads(params: Params, base: ModelConfig, served: ModelConfig, mesh: Mesh) -> Params:
    """Params in ``base``'s layout -> ``served``'s layout, laid out by ``served``'s shardings on
    ``mesh``. The input arrays are released (the result replaces them)."""
    if served.num_kv_heads == base.num_kv_heads:
        return params
    if not isinstance(params["wqkv"], jax.Array):
        raise ValueError(f"tensor_parallel_size above the checkpoint's {base.num_kv_heads} KV heads "
                         "(replicated KV heads) is not supported with quantized weights yet")
    if served.num_kv_heads % base.num_kv_heads:
        raise ValueError(f"served num_kv_heads ({served.num_kv_heads}) is not a multiple of the "
                         f"checkpoint's ({base.num_kv_heads})")
    shardings = param_shardings(served, mesh)
    out = dict(params)
    out["wqkv"] = jax.jit(lambda x: _expand_qkv(x, base, served),
                          out_shardings=shardings["wqkv"])(params["wqkv"])
    out["wo"] = jax.jit(lambda x: _expand_wo(x, base, served), out_shardings=shardings["wo"])(params["wo"])
    if "bqkv" in params:
        out["bqkv"] = jax.jit(lambda x: _expand_qkv(x, base, served),
                              out_shardings=shardings["bqkv"])(params["bqkv"])
    return out
