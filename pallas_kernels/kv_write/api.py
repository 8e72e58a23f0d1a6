"""Dispatching entry point for writing new K/V into the page pool.

Where it sits: called once per attention layer inside the jitted step, before attention, with
the layer's donated pool. cpu -> ``reference`` (XLA scatter, in place under donation), tpu ->
``tpu``, gpu -> ``gpu`` for steps of at least ``GPU_KERNEL_MIN_TOKENS`` new tokens and the
scatter below that; ``interpret=True`` runs the backend's kernel (the GPU one on CPU) interpreted.

Quantized pools (int8, fp8 as uint8) write through ``write_kv_quantized``, which also sets the
scales of the pages the step starts: on GPU one fused kernel at every token count
(``gpu_quant``: it replaces 16 XLA kernels per layer), elsewhere ``scales.page_scales`` and then
the backend's ``write_kv`` (``reference.write_kv_quantized``).

``write_rope_quantized`` (the same into an int8 / fp8 pool) runs ``gpu_rope_quant``'s one Triton
kernel where ``rope_write_quant_fuses`` (decode-sized steps on a GPU, ``ROPE_WRITE_QUANT_ON_GPU``),
else XLA's RoPE and ``write_kv_quantized``.

``write_rope`` (a dense fused QKV projection's output: bias, RoPE, then the write) and
``quant_matmul.api.quant_matmul_rope_write`` (the same from a w8a16 projection's partials) run
``rope_write``'s one Mosaic GPU kernel where ``rope_write_fuses`` (decode-sized steps on Hopper,
``ROPE_WRITE_ON_HOPPER`` / ``ROPE_WRITE_DENSE_ON_HOPPER``), else XLA's RoPE and ``write_kv``.

Why the split on GPU (H200, same run, pools of 20000 pages, KERNEL_NOTES_runs_1-9.md run 4): 4096 tokens
take 20.3 us through the Pallas kernel and 76.5 us through XLA's scatter, 256 tokens 18.3 us
against 14.9 us: the kernel's fixed cost loses on decode-sized steps. The kernel passes its
hardware test (tests/gpu/test_kernels_gpu.py::test_write_kv_gpu) on the H200.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import hopper
from pallas_kernels.kv_write import gpu, gpu_quant, gpu_rope_quant, reference, rope_write, tpu

GPU_KERNEL_MIN_TOKENS = 1024
# A fused QKV projection's epilogue, RoPE and K/V write in one kernel (``rope_write``) on decode
# steps, after a w8a16 projection's decode kernel. H200, 2026-12-05, the 8B's int8 + lm_head
# batch-1 step, three calls: 3.283 -> 3.169, 3.286 -> 3.164, 3.285 -> 3.168 ms, 400 -> 337
# kernels (the A/B's other arm: benchmarks/step_floor.py --ab rope-write-off). After a dense
# one's XLA GEMM: ``_DENSE`` (--ab rope-write-dense-off), same day, bf16 batch-1 steps recompiled
# both ways in one call: the 8B 4.538 -> 4.468 ms (463 -> 432 kernels), Qwen2.5-0.5B 0.992 ->
# 0.961 ms (327 -> 304).
ROPE_WRITE_ON_HOPPER = True
ROPE_WRITE_DENSE_ON_HOPPER = True
ROPE_WRITE_MAX_TOKENS = 64   # the steps it serves: decode-sized (the persistent decode matmul's)
# The same for an int8 / fp8 pool: RoPE and the quantizing write in one Triton kernel
# (``gpu_rope_quant``) after the finished projection, where XLA runs RoPE, K's and V's slices and
# ``gpu_quant``'s write. Off until the device times it (benchmarks/kv_dtype_step.py --ab
# rope-write-quant-on, benchmarks/owed_gpu_runs.sh kq).
ROPE_WRITE_QUANT_ON_GPU = False


def write_kv(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
    *,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``k_new/v_new: [num_tokens, num_kv_heads, head_dim]`` -> slots of ``[num_pages, page_size, kvh, d]``.

    Returns the updated ``(k_pages, v_pages)``; see ``reference.write_kv``.
    """
    args = (k_pages, v_pages, k_new, v_new, slot_mapping)
    backend = jax.default_backend()
    if backend == "tpu":
        return tpu.write_kv(*args, k_scales=k_scales, v_scales=v_scales, interpret=interpret)
    if interpret or (backend == "gpu" and k_new.shape[0] >= GPU_KERNEL_MIN_TOKENS):
        return gpu.write_kv(*args, k_scales=k_scales, v_scales=v_scales, interpret=interpret)
    return reference.write_kv(*args, k_scales=k_scales, v_scales=v_scales)


def write_kv_quantized(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_scales: jax.Array,
    v_scales: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
    *,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """A quantized pool's write (``reference.write_kv_quantized``): pools ``[num_pages, page_size,
    kvh, d]``, scales ``float32[num_pages, kvh]``, ``k_new/v_new: [T, kvh, d]`` -> all four updated."""
    backend = jax.default_backend()
    if interpret or backend == "gpu":
        return gpu_quant.write_kv_quantized(k_pages, v_pages, k_scales, v_scales, k_new, v_new,
                                            slot_mapping, interpret=interpret)
    return reference.write_kv_quantized(k_pages, v_pages, k_scales, v_scales, k_new, v_new,
                                        slot_mapping, write=write_kv)


def rope_write_fuses(t: int, split_k: int, groups: int, head_dim: int, bias: bool, scaled: bool, *,
                     interpret: bool = False, backend: str | None = None) -> bool:
    """Whether ``rope_write``'s kernel takes a step of T tokens whose projection comes as S
    partials (``scaled``: float32, per-channel scales to apply; else the projection itself, S
    = 1): on a Hopper GPU (or interpreted) with ``ROPE_WRITE_ON_HOPPER`` (``scaled``) or
    ``ROPE_WRITE_DENSE_ON_HOPPER``."""
    backend = backend or jax.default_backend()
    switch = ROPE_WRITE_ON_HOPPER if scaled else ROPE_WRITE_DENSE_ON_HOPPER
    return (switch and t <= ROPE_WRITE_MAX_TOKENS and backend != "tpu"
            and (interpret or (backend == "gpu" and hopper.on_hopper()))
            and rope_write.supports(split_k, groups, head_dim, bias, scaled))


def write_rope(qkv: jax.Array, bias: jax.Array | None, cos: jax.Array, sin: jax.Array,
               slot_mapping: jax.Array, k_pages: jax.Array, v_pages: jax.Array, *, groups: int,
               interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A dense fused QKV projection's output qkv [T, Nkv * (G + 2) * d] in the pools' dtype, its
    bias ([N] or None), RoPE (cos / sin float32 [T, d]) and the K / V write into the unquantized
    pools -> (q [T, Nkv * G, d], k_pages, v_pages), as ``reference.rope_write`` of qkv + bias:
    one kernel after XLA's GEMM where ``rope_write_fuses``, else XLA's RoPE and ``write_kv``."""
    t, d = qkv.shape[0], k_pages.shape[-1]
    if rope_write_fuses(t, 1, groups, d, bias is not None, False, interpret=interpret):
        return rope_write.rope_write(qkv[None], None, bias, cos, sin, slot_mapping, k_pages, v_pages,
                                     groups=groups, interpret=interpret)
    return reference.rope_write(qkv if bias is None else qkv + bias, cos, sin, slot_mapping, k_pages,
                                v_pages, groups, write=functools.partial(write_kv, interpret=interpret))


def rope_write_quant_fuses(t: int, head_dim: int, *, interpret: bool = False,
                           backend: str | None = None) -> bool:
    """Whether ``write_rope_quantized`` takes a step of T tokens with heads of ``head_dim`` in its
    one kernel: on a GPU (or interpreted) with ``ROPE_WRITE_QUANT_ON_GPU``, decode-sized steps."""
    backend = backend or jax.default_backend()
    return (ROPE_WRITE_QUANT_ON_GPU and 0 < t <= ROPE_WRITE_MAX_TOKENS and gpu_rope_quant.supports(head_dim)
            and (interpret or backend == "gpu"))


def write_rope_quantized(qkv: jax.Array, bias: jax.Array | None, cos: jax.Array, sin: jax.Array,
                         slot_mapping: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                         k_scales: jax.Array, v_scales: jax.Array, *, groups: int,
                         interpret: bool = False) -> tuple[jax.Array, ...]:
    """A fused QKV projection's output qkv [T, Nkv * (G + 2) * d] in the model's dtype, its bias
    ([N] or None), RoPE (cos / sin float32 [T, d]) and the K / V write into an int8 / fp8 pool
    with its per-page scales -> (q [T, Nkv * G, d], k_pages, v_pages, k_scales, v_scales), as
    ``reference.write_kv_quantized`` of ``reference.split_rope(qkv + bias)``: one kernel where
    ``rope_write_quant_fuses``, else XLA's RoPE and ``write_kv_quantized``."""
    qkv = qkv if bias is None else qkv + bias   # (XLA fuses the add into the projection's kernel)
    if rope_write_quant_fuses(qkv.shape[0], k_pages.shape[-1], interpret=interpret):
        return gpu_rope_quant.rope_write_quantized(qkv, cos, sin, slot_mapping, k_pages, v_pages, k_scales,
                                                   v_scales, groups=groups, interpret=interpret)
    q, k, v = reference.split_rope(qkv, cos, sin, k_pages.shape[2], groups)
    return (q, *write_kv_quantized(k_pages, v_pages, k_scales, v_scales, k, v, slot_mapping,
                                   interpret=interpret))
