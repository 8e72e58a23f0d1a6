"""Quantized projection weights: quantize-on-load from a float checkpoint, or read a
pre-quantized one, into the stacked, fused, output-major layout ``linear()`` takes.

Where it sits: start-up, called by ``params.load_params`` (and ``random_params`` for benchmarks)
when ``LLM(quantization=...)`` is set or the checkpoint carries a ``quantization_config``
(``checkpoints.checkpoint_scheme``). The four projections become ``QuantizedWeight`` s
(jserve/model/linear.py); embeddings, norms, biases and the lm_head stay in the model dtype
(the lm_head too is 8-bit under ``quantize_lm_head``: ``quantize_head``)::

    wqkv  q [L, Nkv, Gp + 2, d, H]   scale [L, Nkv, Gp + 2, d]     (per kv head: its q heads,
                                                                      zero heads up to Gp, k, v)
    wo    q [L, H, Nkv * Gp * d]     scale [L, H]
    wgu   q [L, 2, I, H]             scale [L, 2, I]
    wd    q [L, H, I]                scale [L, H]
          (+ a trailing [ceil(K / bk)] on each scale for block-scaled checkpoints;
           input_scale [L] for static activation scales: the max over the fused projections,
           so every part's activations stay in range)

Streaming: projections are loaded a chunk of layers at a time (``CHUNK_BYTES`` of float
weights), each device reading its shard (``checkpoints.load_stacked``), fused and quantized on
the device, and written into the preallocated 8-bit stack, so the float copy of a whole
projection never exists. Scales are symmetric absmax per output channel over K (``pallas_kernels
.quant_matmul.reference.quantize_weight``): zero-padded query heads get a finite scale and
quantize to exact zeros.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from checkpoints import (
    ON_LOAD_METHODS,
    CheckpointError,
    HFModelDir,
    QuantScheme,
    checkpoint_scheme,
    load_quantized,
    load_stacked,
    on_load_scheme,
)
from jserve.config import ModelConfig
from jserve.model.linear import QuantizedWeight, mesh_axes_of
from pallas_kernels.quant_matmul.reference import quantize_weight

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 30
PROJECTIONS = ("wqkv", "wo", "wgu", "wd")


def resolve_scheme(config: dict, quantization: str | None, source: str,
                   lm_head: bool = False) -> QuantScheme | None:
    """The checkpoint's own scheme, else quantize-on-load by ``quantization``, else None;
    ``lm_head`` (``quantize_lm_head``) marks the lm_head for quantize-on-load too. ValueError
    when the user asks for a method other than the one a checkpoint carries, or for the lm_head
    alone."""
    ckpt = checkpoint_scheme(config, source)
    if ckpt is not None:
        if quantization is not None and quantization != ckpt.method:
            raise ValueError(f"quantization={quantization!r}, but {source} is a pre-quantized "
                             f"checkpoint ({ckpt.describe()}); leave quantization unset")
        scheme = ckpt
    else:
        scheme = None if quantization is None else on_load_scheme(quantization)
    if not lm_head:
        return scheme
    if scheme is None:
        raise ValueError("quantize_lm_head: quantizes the lm_head in the projections' 8-bit format; "
                         f"set quantization ({', '.join(ON_LOAD_METHODS)}) or load a pre-quantized "
                         "checkpoint")
    return dataclasses.replace(scheme, lm_head=True)


def _parts(cfg: ModelConfig) -> dict[str, list[tuple[str, int, int, tuple]]]:
    """Per projection: the HF modules fused into it, each (module suffix, out, in, load axes)."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    q, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "wqkv": [("self_attn.q_proj", q, h, ("heads", "embed")),
                 ("self_attn.k_proj", kvd, h, ("kv_heads", "embed")),
                 ("self_attn.v_proj", kvd, h, ("kv_heads", "embed"))],
        "wo": [("self_attn.o_proj", h, q, ("embed", "heads"))],
        "wgu": [("mlp.gate_proj", inter, h, ("mlp", "embed")), ("mlp.up_proj", inter, h, ("mlp", "embed"))],
        "wd": [("mlp.down_proj", h, inter, ("embed", "mlp"))],
    }


def quant_layout(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...], int]]:
    """Per projection: (shape of ``q``, its logical axes, K). Scales drop the last axis."""
    n, h, inter, d = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    nkv, gp = cfg.num_kv_heads, cfg.q_per_kv_padded
    return {
        "wqkv": ((n, nkv, gp + 2, d, h), ("layers", "kv_heads", None, "head_dim", "embed"), h),
        "wo": ((n, h, cfg.num_q_heads_padded * d), ("layers", "embed", "heads"), cfg.num_q_heads_padded * d),
        "wgu": ((n, 2, inter, h), ("layers", None, "mlp", "embed"), h),
        "wd": ((n, h, inter), ("layers", "embed", "mlp"), inter),
    }


def _fuse(cfg: ModelConfig, name: str) -> Callable[..., jax.Array]:
    """Parts [c, out_j, *rest] (weights: rest = [in]; scales: rest = [] or [groups]) -> the
    fused output-major layout [c, *out, *rest]."""
    nkv, g, gp, d = cfg.num_kv_heads, cfg.q_per_kv, cfg.q_per_kv_padded, cfg.head_dim

    def qkv(q, k, v):
        c, rest = q.shape[0], q.shape[2:]
        zeros = jnp.zeros((c, nkv, gp - g, d, *rest), q.dtype)
        return jnp.concatenate([q.reshape(c, nkv, g, d, *rest), zeros, k.reshape(c, nkv, 1, d, *rest),
                                v.reshape(c, nkv, 1, d, *rest)], axis=2)

    return {"wqkv": qkv, "wo": lambda o: o, "wgu": lambda a, b: jnp.stack([a, b], axis=1),
            "wd": lambda w: w}[name]


def _pad_wo_in(cfg: ModelConfig, w: jax.Array) -> jax.Array:
    """wo [c, H, Nq * d] -> [c, H, Nkv * Gp * d]: zero columns for the padded query heads."""
    nkv, g, gp, d = cfg.num_kv_heads, cfg.q_per_kv, cfg.q_per_kv_padded, cfg.head_dim
    if gp == g:
        return w
    c, h, _ = w.shape
    w = jnp.pad(w.reshape(c, h, nkv, g, d), ((0, 0), (0, 0), (0, 0), (0, gp - g), (0, 0)))
    return w.reshape(c, h, nkv * gp * d)


def _sharding(cfg: ModelConfig, mesh: Mesh, shape: tuple[int, ...], axes: tuple) -> NamedSharding:
    from jserve.model.params import ParamSpec, spec_sharding  # params imports this module
    return spec_sharding(cfg, mesh, ParamSpec(shape, axes))


def _check_ignore(scheme: QuantScheme, cfg: ModelConfig, source: str) -> None:
    """A checkpoint that left some projection unquantized is refused (the stacked layout holds
    one format per projection); ignoring only the lm_head (the usual case) is fine."""
    modules = [f"model.layers.{i}.{m}" for i in range(cfg.num_layers) for parts in _parts(cfg).values()
               for m, *_ in parts]
    for pattern in scheme.ignore:
        rx = re.compile(pattern[3:]) if pattern.startswith("re:") else None
        hit = next((m for m in modules if (rx.fullmatch(m) if rx else m == pattern
                                            or m.endswith("." + pattern))), None)
        if hit is not None:
            raise CheckpointError(f"{source}: quantization_config leaves {hit!r} unquantized ({pattern!r}); "
                                  "only checkpoints whose every layer projection is quantized are supported")


def load_quantized_projections(model_dir: HFModelDir, cfg: ModelConfig, mesh: Mesh,
                               scheme: QuantScheme) -> dict[str, QuantizedWeight]:
    """The four projections of ``model_dir`` as ``QuantizedWeight`` s (module docstring)."""
    source = str(model_dir.path / "config.json")
    _check_ignore(scheme, cfg, source)
    if scheme.block is not None and cfg.q_per_kv_padded != cfg.q_per_kv:
        raise CheckpointError(f"{source}: block-scaled fp8 with {cfg.q_per_kv} query heads per kv head "
                              "(not a power of two) is not supported")
    layout = quant_layout(cfg)
    out: dict[str, QuantizedWeight] = {}
    for name, parts in _parts(cfg).items():
        shape, _, k = layout[name]
        groups = () if scheme.block is None else (-(-k // scheme.block[1]),)
        s_shape = (*shape[:-1], *groups)
        q_shard = _chunk_sharding(cfg, mesh, name, cfg.num_layers, scheme, scale=False)
        s_shard = _chunk_sharding(cfg, mesh, name, cfg.num_layers, scheme, scale=True)
        layer_bytes = sum(o * i for _, o, i, _ in parts) * jnp.dtype(cfg.dtype).itemsize
        per_chunk = max(1, min(cfg.num_layers, CHUNK_BYTES // max(layer_bytes, 1)))
        q_full = s_full = None
        input_scales = []
        for l0 in range(0, cfg.num_layers, per_chunk):
            layers = range(l0, min(cfg.num_layers, l0 + per_chunk))
            q, s, ins = _load_chunk(model_dir, cfg, mesh, scheme, name, parts, layers)
            if ins is not None:
                input_scales.append(ins)
            if len(layers) == cfg.num_layers:
                q_full, s_full = q, s
                break
            if q_full is None:
                zeros = jax.jit(jnp.zeros, static_argnums=(0, 1), out_shardings=q_shard)
                q_full = zeros(shape, q.dtype)
                zeros = jax.jit(jnp.zeros, static_argnums=(0, 1), out_shardings=s_shard)
                s_full = zeros(s_shape, jnp.float32)
            q_full, s_full = _put(q_full, s_full, q, s, l0)
        input_scale = None
        if input_scales:
            input_scale = jax.device_put(np.concatenate(input_scales), NamedSharding(mesh, PartitionSpec()))
        out[name] = QuantizedWeight(q_full, s_full, input_scale,
                                    act_quant=scheme.activations is not None and scheme.block is None,
                                    group=None if scheme.block is None else scheme.block[1],
                                    spec=mesh_axes_of(q_shard, len(shape)))
    log.info("quantized projections: %s", scheme.describe())
    return out


def _put_impl(q_full, s_full, q, s, l0):
    return (jax.lax.dynamic_update_slice_in_dim(q_full, q, l0, axis=0),
            jax.lax.dynamic_update_slice_in_dim(s_full, s, l0, axis=0))


_put = jax.jit(_put_impl, donate_argnums=(0, 1))


def _chunk_sharding(cfg: ModelConfig, mesh: Mesh, name: str, c: int, scheme: QuantScheme,
                    scale: bool) -> NamedSharding:
    """Sharding of ``c`` layers of projection ``name``'s q (or, ``scale``, its scales)."""
    shape, axes, k = quant_layout(cfg)[name]
    if scale:
        groups = () if scheme.block is None else (-(-k // scheme.block[1]),)
        shape, axes = (*shape[:-1], *groups), (*axes[:-1], *(None,) * len(groups))
    return _sharding(cfg, mesh, (c, *shape[1:]), axes)


def _load_chunk(model_dir: HFModelDir, cfg: ModelConfig, mesh: Mesh, scheme: QuantScheme, name: str,
                parts: Sequence[tuple], layers: range) -> tuple[jax.Array, jax.Array, np.ndarray | None]:
    """One chunk of layers of projection ``name`` -> (q [c, *out, K], scale [c, *out(, G)],
    static input scales [c] or None)."""
    c = len(layers)
    fuse = _fuse(cfg, name)
    pad = (lambda w: _pad_wo_in(cfg, w)) if name == "wo" else (lambda w: w)
    q_sh = _chunk_sharding(cfg, mesh, name, c, scheme, scale=False)
    s_sh = _chunk_sharding(cfg, mesh, name, c, scheme, scale=True)
    loaded = []
    for module, o, i, axes in parts:
        names = [f"model.layers.{li}.{module}" for li in layers]
        sharding = _sharding(cfg, mesh, (c, o, i), ("layers", *axes))
        if scheme.prequantized:
            loaded.append(load_quantized(model_dir, names, scheme, out=o, inp=i, sharding=sharding))
        else:
            loaded.append(load_stacked(model_dir, [n + ".weight" for n in names], sharding=sharding,
                                       dtype=jnp.dtype(cfg.dtype), expected_shape=(o, i)))
    if scheme.prequantized:
        qs, scales, ins = zip(*loaded, strict=True)
        q = jax.jit(lambda *a: pad(fuse(*a)), out_shardings=q_sh)(*qs)
        s = jax.jit(lambda *a: fuse(*a), out_shardings=s_sh)(*[jnp.asarray(x) for x in scales])
        static = None if ins[0] is None else np.max(np.stack(ins), axis=0)
        return q, s, static
    dtype = jnp.dtype(scheme.weight_dtype)
    q, s = jax.jit(lambda *a: quantize_weight(pad(fuse(*a)), dtype), out_shardings=(q_sh, s_sh))(*loaded)
    return q, s, None


def quantize_head(params: dict, cfg: ModelConfig, mesh: Mesh, scheme: QuantScheme) -> dict:
    """``params`` with ``lm_head`` an 8-bit ``QuantizedWeight`` (``scheme.lm_head``): q [1, V, H]
    in the scheme's weight dtype, scale [1, V] per vocabulary row, weight-only (w8a16 whatever
    the projections' activations: logits keep the activations' precision); from the dense
    lm_head [H, V] (dropped), or a copy of the tied embedding [V, H] (kept: the step gathers
    its rows). Why: at batch 1 a decode step streams every weight once, and the 8B's bf16
    lm_head (1.05 GB) is a tenth of its int8 step (benchmarks/RESULTS_v2_sessions_30-32.md, session 31)."""
    out = dict(params)
    w = out["embed"] if cfg.tie_word_embeddings else out.pop("lm_head")
    shape = (1, cfg.vocab_size, cfg.hidden_size)
    q_sh = _sharding(cfg, mesh, shape, (None, "vocab", "embed"))
    s_sh = _sharding(cfg, mesh, shape[:2], (None, "vocab"))
    dtype, tied = jnp.dtype(scheme.weight_dtype), cfg.tie_word_embeddings
    q, s = jax.jit(lambda w: quantize_weight((w if tied else w.T)[None], dtype),
                   out_shardings=(q_sh, s_sh))(w)
    del w
    out["lm_head"] = QuantizedWeight(q, s, spec=mesh_axes_of(q_sh, q.ndim))
    return out


def quantize_dense(params: dict, cfg: ModelConfig, mesh: Mesh, scheme: QuantScheme) -> dict:
    """A dense param tree (params.py layout, ``[L, K, *out]``) with its four projections
    quantized (``[L, *out, K]`` + per-channel scales), and the lm_head under ``scheme.lm_head``
    (``quantize_head``); the dense arrays are dropped one at a time."""
    out = dict(params)
    dtype = jnp.dtype(scheme.weight_dtype)
    for name in PROJECTIONS:
        q_sh = _chunk_sharding(cfg, mesh, name, cfg.num_layers, scheme, scale=False)
        s_sh = _chunk_sharding(cfg, mesh, name, cfg.num_layers, scheme, scale=True)
        dense = out.pop(name)
        q, s = jax.jit(lambda w: quantize_weight(jnp.moveaxis(w, 1, -1), dtype),
                       out_shardings=(q_sh, s_sh))(dense)
        del dense
        out[name] = QuantizedWeight(q, s, act_quant=scheme.activations is not None,
                                    spec=mesh_axes_of(q_sh, q.ndim))
    return quantize_head(out, cfg, mesh, scheme) if scheme.lm_head else out


def weight_bytes(cfg: ModelConfig, scheme: QuantScheme | None) -> int:
    """Bytes of every weight as the engine holds them (what ``params_bytes`` of the loaded
    tree gives): ``cfg.dtype`` for all but the quantized projections, which take 1 byte per
    element plus their float32 scales (and static input scales); a quantized lm_head likewise
    (tied: an 8-bit copy beside the embedding)."""
    itemsize = jnp.dtype(cfg.dtype).itemsize
    total = cfg.num_weight_elements() * itemsize
    if scheme is None:
        return total
    if scheme.lm_head:
        head = cfg.vocab_size * cfg.hidden_size
        total += head * (1 if cfg.tie_word_embeddings else 1 - itemsize) + 4 * cfg.vocab_size
    for shape, _, k in quant_layout(cfg).values():
        elems = math.prod(shape)
        groups = 1 if scheme.block is None else -(-k // scheme.block[1])
        scales = elems // k * groups
        total += elems * (1 - itemsize) + 4 * scales
        total += 4 * cfg.num_layers if scheme.activations == "static" else 0
    return total
