"""The model's attention entry: KV write + attention over the page pool (or the chunk itself).

Where it sits: called once per layer by ``decoder``. It adapts the packed ``StepInput`` to the
kernel signatures of ``pallas_kernels`` (which picks the Pallas kernel on GPU/TPU and the
pure-jnp reference on CPU). A step made only of fresh prompts (the runner's ``fresh_prefill``
variant) attends over the chunk's own K/V with flash attention (packed segments =
``query_start_loc``); every other step reads the context back from the pages.

Tensor parallelism: a Pallas call is opaque to XLA's partitioner, which would gather its sharded
operands (the whole KV pool) onto every device. When the KV heads divide the tensor axis, each
call therefore runs under ``shard_map``, one head slice per device::

    q [T, Hq, d]            P(None, tensor, None)    device i: q heads  i*Hq/tp  ... (i+1)*Hq/tp
    k, v [T, Hkv, d]        P(None, tensor, None)    device i: kv heads i*Hkv/tp ... (i+1)*Hkv/tp
    pages [N, ps, Hkv, d]   P(None, None, tensor, None)
    scales [N, Hkv]         P(None, tensor)              (int8 / fp8 pools)
    StepInput               P()  (replicated)

GQA maps q head h to kv head h // G, and h // G of device i's q heads are exactly its kv heads,
so no communication is needed. With fewer KV heads than devices (replicated pool) the calls stay
under the partitioner.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import pallas_kernels
from jserve.step_input import StepInput
from sharding import TENSOR_AXIS, nested_mesh

_HEADS = P(None, TENSOR_AXIS, None)
_POOL = P(None, None, TENSOR_AXIS, None)
_SCALES = P(None, TENSOR_AXIS)


def head_parallel(mesh: Mesh | None, num_kv_heads: int) -> bool:
    """Whether the attention calls run per device on a head slice (see the module docstring)."""
    if mesh is None:
        return False
    tp = mesh.shape[TENSOR_AXIS]
    return tp > 1 and num_kv_heads % tp == 0


def _per_device(fn: Callable[..., Any], mesh: Mesh | None, num_kv_heads: int, in_specs: tuple,
                out_specs: Any) -> Callable[..., Any]:
    if not head_parallel(mesh, num_kv_heads):
        return fn
    return jax.shard_map(fn, mesh=nested_mesh(mesh), in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


def write_kv(pool: tuple[jax.Array, ...], k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
             mesh: Mesh | None = None) -> tuple[jax.Array, ...]:
    """k/v: [T, Nkv, d] into one layer's pool ``(k_pages, v_pages)`` [num_pages, page_size, Nkv, d]
    at ``slot_mapping`` int32[T]. A quantized pool ``(k_pages, v_pages, k_scales, v_scales)``
    also sets the scales of the pages this step starts (``pallas_kernels.write_kv_quantized``);
    -> the updated pool tuple."""
    if len(pool) == 2:
        fn = _per_device(pallas_kernels.write_kv, mesh, k.shape[1],
                         (_POOL, _POOL, _HEADS, _HEADS, P()), (_POOL, _POOL))
        return fn(pool[0], pool[1], k, v, slot_mapping)

    fn = _per_device(pallas_kernels.write_kv_quantized, mesh, k.shape[1],
                     (_POOL, _POOL, _SCALES, _SCALES, _HEADS, _HEADS, P()), (_POOL, _POOL, _SCALES, _SCALES))
    return fn(*pool, k, v, slot_mapping)


def fresh_prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, batch: StepInput, *,
                            sm_scale: float, sliding_window: int | None,
                            mesh: Mesh | None = None) -> jax.Array:
    """q: [T, Nq, d], k/v: [T, Nkv, d] of a step whose every row is a fresh prompt (its whole
    context is this chunk) -> [T, Nq, d]; causal within each row's segment, padding rows zero."""

    def attend(q, k, v, cu_seqlens):
        return pallas_kernels.flash_attention(q, k, v, cu_seqlens, sm_scale=sm_scale,
                                              sliding_window=sliding_window)

    fn = _per_device(attend, mesh, k.shape[1], (_HEADS, _HEADS, _HEADS, P()), _HEADS)
    return fn(q, k, v, batch.query_start_loc)


def paged_attention(q: jax.Array, pool: tuple[jax.Array, ...], batch: StepInput, *,
                    sm_scale: float, sliding_window: int | None,
                    mesh: Mesh | None = None, decode_only: bool = False) -> jax.Array:
    """q: [T, Nq, d] -> [T, Nq, d], each token attending causally to its request's pages
    (``pool``: one layer's ``(k_pages, v_pages[, k_scales, v_scales])``). ``decode_only``
    (static): no request has more query tokens than ``batch.decode_rows`` (1, or 1 + k in a
    speculative step made only of verify rows); the GPU kernel then runs its decode launch only
    (no prefill tiles, no work list)."""

    def attend(q, k_pages, v_pages, batch, *scales):
        k_scales, v_scales = scales if scales else (None, None)
        return pallas_kernels.ragged_paged_attention(
            q, k_pages, v_pages, batch.page_table, batch.seq_lens, batch.query_start_loc,
            batch.num_seqs, sm_scale=sm_scale, sliding_window=sliding_window,
            k_scales=k_scales, v_scales=v_scales, max_q_len=batch.decode_rows if decode_only else None,
            decode_rows=batch.decode_rows)

    k_pages, v_pages, *scales = pool
    specs = (_HEADS, _POOL, _POOL, P(), *(_SCALES,) * len(scales))
    fn = _per_device(attend, mesh, k_pages.shape[2], specs, _HEADS)
    return fn(q, k_pages, v_pages, batch, *scales)
