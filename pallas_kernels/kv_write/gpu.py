"""KV write on CUDA GPUs: a Pallas (Triton lowering) row copy into the donated pool.

Where it sits: ``pallas_kernels.write_kv`` dispatches here on GPU, once per attention layer
inside the jitted step. Semantics are ``reference.py``'s.

One program copies ``block_t`` token rows of ``kvh * d`` contiguous elements (2 KiB for
Llama-3.1-8B bf16) to their slots; the pools are input/output aliased, so under donation
nothing but the new rows moves. XLA's scatter does the same job in place; the benchmark in
benchmarks/kernels.py times both (KERNEL_NOTES.md), and the dispatcher uses whichever measured
faster. Padding tokens carry slots inside page 0 (the null page); several may write there in
one launch, in any order, which is fine because nothing reads page 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.kv_write import reference


def _kernel(slots_ref, kn_ref, vn_ref, k_in, v_in, k_out, v_out, *, num_tokens: int, block_t: int):
    del k_in, v_in  # aliased to k_out / v_out
    t = pl.program_id(0) * block_t + jnp.arange(block_t, dtype=jnp.int32)
    ok = t < num_tokens
    tc = jnp.minimum(t, num_tokens - 1)
    slots = slots_ref[tc]
    width = kn_ref.shape[1]
    cols = jnp.arange(width, dtype=jnp.int32)[None, :]
    mask = ok[:, None]
    plgpu.store(k_out.at[slots[:, None], cols], kn_ref[tc[:, None], cols], mask=mask)
    plgpu.store(v_out.at[slots[:, None], cols], vn_ref[tc[:, None], cols], mask=mask)


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
    block_t: int = 8,
) -> tuple[jax.Array, jax.Array]:
    """Same contract as ``reference.write_kv``; ``block_t`` token rows per program."""
    reference.validate_inputs(k_pages, v_pages, k_new, v_new, slot_mapping, k_scales, v_scales)
    num_pages, page_size, kvh, d = k_pages.shape
    num_tokens = k_new.shape[0]
    if num_tokens == 0:
        return k_pages, v_pages
    if (kvh * d) & (kvh * d - 1):
        return reference.write_kv(
            k_pages, v_pages, k_new, v_new, slot_mapping, k_scales=k_scales, v_scales=v_scales
        )  # Triton tiles need a power-of-two row width; XLA's in-place scatter handles the rest
    k_new, v_new = reference.rows_in_pool_dtype(k_pages, v_pages, k_new, v_new, slot_mapping,
                                                 k_scales, v_scales)
    width = kvh * d
    flat = (num_pages * page_size, width)
    kernel = functools.partial(_kernel, num_tokens=num_tokens, block_t=block_t)
    k_out, v_out = pl.pallas_call(
        kernel,
        grid=(-(-num_tokens // block_t),),
        out_shape=(jax.ShapeDtypeStruct(flat, k_pages.dtype), jax.ShapeDtypeStruct(flat, v_pages.dtype)),
        input_output_aliases={3: 0, 4: 1},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="write_kv",
    )(
        slot_mapping,
        k_new.astype(k_pages.dtype).reshape(num_tokens, width),
        v_new.astype(v_pages.dtype).reshape(num_tokens, width),
        k_pages.reshape(flat),
        v_pages.reshape(flat),
    )
    return k_out.reshape(k_pages.shape), v_out.reshape(v_pages.shape)
