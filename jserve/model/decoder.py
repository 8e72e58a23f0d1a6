"""Llama-family decoder forward over one ragged step (Llama, Qwen2, Mistral).

Where it sits: inside the jitted ``step_fn``: (params, kv pool, StepInput) -> (kv pool with this
step's K/V written in place, logits for each request row). One code path for every
architecture: Qwen2's qkv bias, tied embeddings and sliding windows are config switches read
at trace time, never forks; tensor parallelism comes from the params' shardings, pipeline
parallelism runs the same layer loop per stage (``_pipelined``). Every
projection goes through ``linear`` (jserve/model/linear.py), the one seam where dense and
quantized (int8 / fp8) weights part ways.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jserve.config import ModelConfig
from jserve.kv_cache import KVCache
from jserve.model.attention import fresh_prefill_attention, paged_attention, write_kv
from jserve.model.linear import (
    QuantizedWeight,
    linear,
    linear_residual_norm,
    linear_rope_write,
    linear_silu_gate,
    rms_norm,
)
from jserve.model.microbatch import bubble, split_microbatches
from jserve.model.rope import apply_rope, inv_frequencies, rope_cos_sin
from jserve.step_input import StepInput, advance_decode
from sharding import gpipe, gpipe_cycle, num_stages

_LAYER_WEIGHTS = ("ln_attn", "wqkv", "bqkv", "wo", "ln_mlp", "wgu", "wd")
# Pipeline micro-batches: 1 per step, doubled while each keeps at least this many tokens (up to
# 4S). Every tick reads the stage's weights once, so a step costs (M + S - 1) weight reads: more
# micro-batches only pay while each is compute bound (on an H100/H200 in bf16 a matmul turns
# compute bound at ~200 tokens: ~800 TFLOP/s over ~4 TB/s, 1 FLOP per weight byte per token).
MICROBATCH_MIN_TOKENS = 256


def _attention_block(cfg: ModelConfig, w: dict[str, Any], h: jax.Array, pool: tuple[jax.Array, ...],
                     batch: StepInput, cos: jax.Array, sin: jax.Array, window: int | None,
                     fresh_prefill: bool, mesh: Mesh | None, decode_only: bool
                     ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """One layer's attention (``w``: its weights, stacked with one layer) over its normed input
    h [T, H]: one fused QKV matmul, RoPE, KV write, attention -> (its output [T, Hq * d],
    before wo; pool). ``pool``: the layer's ``(k_pages, v_pages)`` (+ ``(k_scales,
    v_scales)`` when int8/fp8)."""
    t, g, nq = h.shape[0], cfg.q_per_kv_padded, cfg.num_q_heads_padded
    bias = w["bqkv"][0] if cfg.qkv_bias else None
    fused = None if fresh_prefill else linear_rope_write(h, w["wqkv"], 0, bias, cos, sin,
                                                         batch.slot_mapping, pool, g, mesh)
    if fused is not None:   # one kernel: the projection's epilogue, RoPE, the K/V write
        q, pool = fused
    else:
        qkv = linear(h, w["wqkv"], 0, mesh)                             # [T, Nkv, Gp + 2, d]
        if bias is not None:
            qkv = qkv + bias
        # Gp query heads per kv head (zero-padded heads included: they add exactly 0 through wo).
        q = apply_rope(qkv[:, :, :g].reshape(t, nq, cfg.head_dim), cos, sin)
        k = apply_rope(qkv[:, :, g], cos, sin)
        v = qkv[:, :, g + 1]
        pool = write_kv(pool, k, v, batch.slot_mapping, mesh)
    scale = cfg.head_dim ** -0.5
    if fresh_prefill:
        o = fresh_prefill_attention(q, k, v, batch, sm_scale=scale, sliding_window=window, mesh=mesh)
    else:
        o = paged_attention(q, pool, batch, sm_scale=scale, sliding_window=window, mesh=mesh,
                            decode_only=decode_only)
    return o.reshape(t, nq * cfg.head_dim), pool


@functools.partial(jax.jit, static_argnums=(0, 8, 9, 10, 11))
def _layer(cfg: ModelConfig, w: dict[str, Any], x: jax.Array, h: jax.Array, next_ln: jax.Array | None,
           pool: tuple[jax.Array, ...], batch: StepInput, rope: tuple[jax.Array, jax.Array],
           window: int | None, fresh_prefill: bool, mesh: Mesh | None, decode_only: bool
           ) -> tuple[jax.Array, jax.Array | None, tuple[jax.Array, ...]]:
    """One decoder layer over the residual stream x [T, H] and its normed form h (``ln_attn``'s)
    -> (x, the new x normed by ``next_ln`` or None without it, pool): attention, wo joined to
    the stream and normed for the MLP, gate/up, SiLU-gate, down joined and normed for what comes
    next (``linear_residual_norm``). A nested jit: every layer with the same static arguments
    shares one trace and one lowered function (the step's StableHLO calls it once per layer and
    XLA inlines the calls), so tracing and Pallas lowering run once per step variant instead of
    once per layer."""
    eps = cfg.rms_norm_eps
    attn, pool = _attention_block(cfg, w, h, pool, batch, *rope, window, fresh_prefill, mesh,
                                  decode_only)
    x, h = linear_residual_norm(attn, w["wo"], 0, x, w["ln_mlp"][0], eps, mesh)
    gated = linear_silu_gate(h, w["wgu"], 0, mesh)                  # SiLU(gate) * up: [T, I]
    x, h = linear_residual_norm(gated, w["wd"], 0, x, next_ln, eps, mesh)
    return x, h, pool


def _layers(cfg: ModelConfig, weights: dict[str, Any], x: jax.Array, kv: KVCache, batch: StepInput,
            rope: tuple[jax.Array, jax.Array], windows: tuple[int | None, ...], fresh_prefill: bool,
            mesh: Mesh | None, decode_only: bool, final_ln: jax.Array | None = None
            ) -> tuple[jax.Array, KVCache]:
    """Run the layers whose stacked weights are ``weights`` ([n, ...] each) and whose pools are
    ``kv`` (n entries) over x [T, H]: the unrolled loop over static slices, each layer one call
    of the nested-jit ``_layer``, which also norms its output for the next layer -> (the last
    layer's output, normed by ``final_ln`` when given, else as is; kv)."""
    new_kv, n = [], len(kv)
    h = rms_norm(x, weights["ln_attn"][0], cfg.rms_norm_eps)
    for i in range(n):
        # Layer i's weights, stacked with one layer (dense arrays and QuantizedWeight alike).
        w = {name: a.one_layer(i) if isinstance(a, QuantizedWeight) else a[i:i + 1]
             for name, a in weights.items()}
        next_ln = weights["ln_attn"][i + 1] if i + 1 < n else final_ln
        x, h, pool = _layer(cfg, w, x, h, next_ln, tuple(kv[i]), batch, rope, windows[i],
                            fresh_prefill, mesh, decode_only)
        new_kv.append(pool)
    if final_ln is None:
        return x, new_kv
    # The last layer's residual output is unused past here; a barrier keeps it an output, so
    # that layer stays the one traced and lowered function every layer calls, not a pruned copy.
    _, h = jax.lax.optimization_barrier((x, h))
    return h, new_kv


def num_microbatches(num_tokens: int, stages: int, fresh_prefill: bool = False) -> int:
    """Micro-batches of a pipelined step of ``num_tokens`` (a bucket) over ``stages`` stages:
    1 for fresh-prompt steps (flash prefill reads a prompt's own K/V, so it must not be cut),
    else 1 doubled while each keeps ``MICROBATCH_MIN_TOKENS`` (at most 4S). Per device a step
    of M micro-batches reads its weights M + S - 1 times, so weight-bound steps (decode) run
    M = 1: S ticks, one weight read per stage, against 1.5 reads at M = S = 2."""
    if fresh_prefill or stages == 1:
        return 1
    m = 1
    while m < 4 * stages and num_tokens % (2 * m) == 0 and num_tokens // (2 * m) >= MICROBATCH_MIN_TOKENS:
        m *= 2
    return m


def _pipelined(cfg: ModelConfig, weights: dict[str, Any], x: jax.Array, kv: KVCache,
               batch: StepInput, rope: tuple[jax.Array, jax.Array], fresh_prefill: bool,
               mesh: Mesh, decode_only: bool) -> tuple[jax.Array, KVCache]:
    """The same ``_layers`` per pipeline stage under ``sharding.gpipe``: stage s runs layers
    [s*L/S, (s+1)*L/S) (its slice of the weights; its slice ``[:, s]`` of every pool entry
    [N, S, ...], see ``kv_cache``) on micro-batches of the step (``microbatch``). A step of fresh
    prompts keeps M = 1 (``num_microbatches``)."""
    stages, t = num_stages(mesh), x.shape[0]
    m_count = num_microbatches(t, stages, fresh_prefill)
    windows = cfg.sliding_windows[:cfg.num_layers // stages]   # same on every stage (config check)
    mbs = split_microbatches(batch, m_count) if m_count > 1 else jax.tree.map(lambda a: a[None], batch)
    cos, sin = (a.reshape(m_count, t // m_count, *a.shape[1:]) for a in rope)

    def stage_fn(w: dict[str, Any], pools: KVCache, x: jax.Array, mb: tuple, valid: jax.Array
                 ) -> tuple[jax.Array, KVCache]:
        step, rope_mb = mb
        # [N, 1, ...] -> [N, ...] and back: reshapes of a size-1 axis (bitcasts, no copy).
        local = [tuple(jax.lax.squeeze(a, (1,)) for a in layer) for layer in pools]
        x, local = _layers(cfg, w, x, local, bubble(step, valid), rope_mb, windows, fresh_prefill,
                           mesh, decode_only)
        return x, [tuple(jnp.expand_dims(a, 1) for a in layer) for layer in local]

    xs = x.reshape(m_count, t // m_count, x.shape[-1])
    ys, kv = gpipe(stage_fn, mesh, weights, kv, xs, (mbs, (cos, sin)), state_axis=1)
    return ys.reshape(t, x.shape[-1]), kv


def pipelined_burst(cfg: ModelConfig, params: dict[str, Any], kv: KVCache, batch: StepInput,
                    steps: int, page_size: int, mesh: Mesh, sample: Callable | None = None,
                    sample_inputs: Any = None, sample_state: Any = None) -> tuple[KVCache, jax.Array]:
    """``steps`` decode steps of a decode-only step (token r = row r) at S > 1 pipeline stages,
    under ``sharding.gpipe_cycle``: the rows cut into S groups (``split_microbatches``)
    circling through the stages, so every stage works on every tick. Group step i is the
    step's input at positions + i (slots from the page rows; rows beyond the group's count
    unchanged, their K/V to the slots packed for them); each output is normed and projected on
    stage 0, its token drawn (argmax, or ``sample(sample_inputs, state, logits f32[Tg, V],
    first row int32[], i, fed) -> (tokens int32[Tg], state)`` with ``sample_state`` carried
    from draw to draw; the inputs enter the stages' program as arguments, not closures),
    and the token's embedding is the group's next input. The groups cut the R rows (tokens
    past them are padding) when S divides R, else the T tokens -> (kv, tokens int32[steps, R
    or T])."""
    stages, t = num_stages(mesh), batch.num_tokens
    if batch.num_rows % stages == 0 and batch.num_rows < t:
        t = batch.num_rows
        batch = dataclasses.replace(batch, token_ids=batch.token_ids[:t],
                                    positions=batch.positions[:t], slot_mapping=batch.slot_mapping[:t])
    groups = split_microbatches(batch, stages)          # leaves [S, ...]: t / S tokens each
    tg = t // stages
    windows = cfg.sliding_windows[:cfg.num_layers // stages]
    inv = inv_frequencies(cfg)
    weights = {name: params[name] for name in _LAYER_WEIGHTS if name in params}
    head = ({name: params[name] for name in ("embed", "norm", "lm_head") if name in params},
            sample_inputs)

    def stage_fn(w: dict[str, Any], pools: KVCache, x: jax.Array, g: jax.Array, i: jax.Array,
                 valid: jax.Array) -> tuple[jax.Array, KVCache]:
        step = advance_decode(jax.tree.map(lambda a: a[g], groups), i, page_size)
        local = [tuple(jax.lax.squeeze(a, (1,)) for a in layer) for layer in pools]
        x, local = _layers(cfg, w, x, local, bubble(step, valid), rope_cos_sin(step.positions, inv),
                           windows, False, mesh, True)
        return x, [tuple(jnp.expand_dims(a, 1) for a in layer) for layer in local]

    def feed_fn(head: tuple, state: Any, y: jax.Array, g: jax.Array, i: jax.Array,
                fed: jax.Array) -> tuple[jax.Array, jax.Array, Any]:
        w, inputs = head
        logits = logits_from_hidden(cfg, w, rms_norm(y, w["norm"], cfg.rms_norm_eps), mesh)
        if sample is None:
            tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            tokens, state = sample(inputs, state, logits, g * tg, i, fed)
        return w["embed"][tokens], tokens, state

    x0 = params["embed"][groups.token_ids]              # [S, T / S, H]
    outs, kv = gpipe_cycle(stage_fn, feed_fn, mesh, weights, kv, head, sample_state, x0, steps,
                           state_axis=1)
    return kv, outs.reshape(steps, t)


def hidden_states(cfg: ModelConfig, params: dict[str, Any], kv: KVCache, batch: StepInput,
                  fresh_prefill: bool = False, mesh: Mesh | None = None,
                  decode_only: bool = False) -> tuple[jax.Array, KVCache]:
    """Run every layer over the step's tokens: -> (final-normed hidden [T, H], updated kv).

    The layer loop is unrolled over static slices of the stacked weights (``params`` module
    docstring), each layer one call of the nested-jit ``_layer``. ``fresh_prefill`` (static):
    every row is a fresh prompt, so attention runs over the step's own K/V (flash) instead of
    the pages; the K/V are written to the pages either way. ``mesh`` (static): the device mesh,
    for the per-device attention calls under tensor parallelism; a mesh with several pipeline
    stages runs the same layers per stage over micro-batches (``_pipelined``). ``decode_only``
    (static): no request row has more tokens than ``batch.decode_rows`` (1 in a decode step,
    1 + k in a speculative step of verify rows only)."""
    x = params["embed"][batch.token_ids]
    rope = rope_cos_sin(batch.positions, inv_frequencies(cfg))
    weights = {name: params[name] for name in _LAYER_WEIGHTS if name in params}
    if num_stages(mesh) > 1:
        x, new_kv = _pipelined(cfg, weights, x, kv, batch, rope, fresh_prefill, mesh, decode_only)
        return rms_norm(x, params["norm"], cfg.rms_norm_eps), new_kv
    return _layers(cfg, weights, x, kv, batch, rope, cfg.sliding_windows, fresh_prefill, mesh,
                   decode_only, final_ln=params["norm"])


def logits_from_hidden(cfg: ModelConfig, params: dict[str, Any], h: jax.Array,
                       mesh: Mesh | None = None) -> jax.Array:
    """h: [R, H] -> float32 logits [R, V] (tied embeddings use embed^T; an 8-bit lm_head, tied
    or not, runs through ``linear``: ``quantize_lm_head``)."""
    head = params.get("lm_head")
    if isinstance(head, QuantizedWeight):
        return linear(h, head, 0, mesh, out_dtype=jnp.float32)
    w = params["embed"].T if cfg.tie_word_embeddings else head
    return jnp.dot(h, w, preferred_element_type=jnp.float32)


def forward(cfg: ModelConfig, params: dict[str, Any], kv: KVCache, batch: StepInput,
            fresh_prefill: bool = False, mesh: Mesh | None = None,
            decode_only: bool = False) -> tuple[KVCache, jax.Array]:
    """-> (kv with this step's K/V written, float32 logits [R, V] at ``batch.logits_indices``)."""
    h, kv = hidden_states(cfg, params, kv, batch, fresh_prefill, mesh, decode_only)
    return kv, logits_from_hidden(cfg, params, h[batch.logits_indices], mesh)
