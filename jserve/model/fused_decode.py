"""The draft model's forwards over short rows: one ``pallas_kernels.decode_layer`` launch per layer.

Where it sits: inside the speculative step executable, ``spec.draft.draft_step`` calls
``fused_decode_hidden`` instead of ``decoder.hidden_states`` when ``fused_decode_fits``
(decided at trace time from the shapes and the backend) for its forwards whose rows are all
short: the K - 1 decodes (one token per row) and, in the greedy variants, the first forward
over the verify rows (at most 1 + k tokens per row). Same inputs and outputs: the step's
``StepInput`` (ragged rows, rows past ``num_seqs`` idle) -> (final-normed hidden [T, H], kv
with each token's K/V written at its slot).

Why: at batch 1 the speculative step is bound by its kernel count (host launch ~2.7 us per CUDA
graph node, H200 census, benchmarks/RESULTS.md session 26); each draft layer instance was ~13
kernels, one per layer here. The kernel runs one program per row that streams the whole layer's
weights once per token, so it is kept to small layers and few rows, where that costs less than
the launches it removes (``FUSED_MAX_LAYER_BYTES``, ``FUSED_MAX_ROWS``). Its numerics differ
from the unfused layer's by summation order only; the draft only proposes (the target
verifies), so greedy output is unchanged either way. GPU only: on TPU the unfused layer is
XLA-fused anyway, and on CPU the reference would only repeat the unfused math.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh

import pallas_kernels
from jserve.config import ModelConfig
from jserve.kv_cache import KVCache
from jserve.model.decoder import rms_norm
from jserve.model.rope import inv_frequencies, rope_cos_sin
from jserve.step_input import StepInput
from pallas_kernels.decode_layer import gpu as decode_layer_gpu

# Largest layer (weight bytes) fused: one SM streams it per row. code-draft's layers are 0.4 MiB.
FUSED_MAX_LAYER_BYTES = 2 << 20
# Most decode rows fused: every row's program re-reads the layer (from L2 past the first).
FUSED_MAX_ROWS = 8
_WEIGHTS = ("ln_attn", "wqkv", "wo", "ln_mlp", "wgu", "wd")


def fused_decode_fits(cfg: ModelConfig, params: dict[str, Any], kv: KVCache, mesh: Mesh | None,
                      rows: int, backend: str | None = None) -> bool:
    """Whether a forward over ``rows`` short rows runs the fused layers: a GPU backend (``backend``,
    default ``jax.default_backend()``), one device, dense weights, unquantized pools, no
    sliding window, shapes the kernel takes, layers of at most ``FUSED_MAX_LAYER_BYTES`` and
    at most ``FUSED_MAX_ROWS`` rows."""
    if (backend or jax.default_backend()) != "gpu" or rows > FUSED_MAX_ROWS:
        return False
    if mesh is not None and mesh.devices.size > 1:
        return False
    arrays = [params.get(n) for n in (*_WEIGHTS, "bqkv") if n in params]
    if not all(isinstance(a, jax.Array) for a in arrays) or any(len(pool) != 2 for pool in kv):
        return False
    if any(w is not None for w in cfg.sliding_windows):
        return False
    layer_bytes = sum(a.size * a.dtype.itemsize for a in arrays) // cfg.num_layers
    pool = kv[0][0]
    why = decode_layer_gpu.unsupported(cfg.hidden_size, cfg.head_dim, cfg.q_per_kv_padded,
                                       params["wgu"].shape[-1], pool.shape[1], pool.dtype)
    return why is None and layer_bytes <= FUSED_MAX_LAYER_BYTES


def fused_decode_hidden(cfg: ModelConfig, params: dict[str, Any], kv: KVCache, step: StepInput
                        ) -> tuple[jax.Array, KVCache]:
    """Inside jit: every layer over the step's short rows (the caller's promise: few tokens per
    row), one ``pallas_kernels.decode_layer`` launch each -> (final-normed hidden [T, H],
    updated kv)."""
    x = params["embed"][step.token_ids]
    cos, sin = rope_cos_sin(step.positions, inv_frequencies(cfg))
    w = [params[n] for n in _WEIGHTS]
    bias = params["bqkv"] if cfg.qkv_bias else None
    new_kv = []
    for i, (k_pages, v_pages) in enumerate(kv):
        x, k_pages, v_pages = pallas_kernels.decode_layer(
            x, w[0], w[1], bias, w[2], w[3], w[4], w[5], cos, sin, k_pages, v_pages,
            step.page_table, step.query_start_loc, step.positions, step.slot_mapping,
            step.num_seqs, layer=i,
            eps=cfg.rms_norm_eps, sm_scale=cfg.head_dim ** -0.5)
        new_kv.append((k_pages, v_pages))
    return rms_norm(x, params["norm"], cfg.rms_norm_eps), new_kv
