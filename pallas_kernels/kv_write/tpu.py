"""KV write on TPUs: one DMA per new token row into the (aliased, donated) pool in HBM.

Where it sits: ``pallas_kernels.write_kv`` dispatches here on TPU, once per attention layer
inside the jitted step. Semantics are ``reference.py``'s.

The pool stays in HBM (``pltpu.HBM``, never staged through VMEM: it is gigabytes). Each grid
step handles ``block_t`` tokens: it starts ``block_t`` row DMAs for K and V (``kvh * d``
contiguous elements each: 2 KiB for Llama-3.1-8B bf16), then waits for them, so up to
``2 * block_t`` small DMAs are in flight. Slots come in through scalar prefetch (SMEM).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.kv_write import reference


def _kernel(slots_ref, kn_hbm, vn_hbm, k_in, v_in, k_out, v_out, sem, *, num_tokens: int, block_t: int):
    del k_in, v_in  # aliased to k_out / v_out
    base = pl.program_id(0) * block_t
    copies = []
    for j in range(block_t):
        t = jnp.minimum(base + j, num_tokens - 1)  # the tail re-writes the last row: same bytes, harmless
        slot = slots_ref[t]
        copies.append(pltpu.make_async_copy(kn_hbm.at[pl.ds(t, 1)], k_out.at[pl.ds(slot, 1)], sem.at[0]))
        copies.append(pltpu.make_async_copy(vn_hbm.at[pl.ds(t, 1)], v_out.at[pl.ds(slot, 1)], sem.at[1]))
    for cp in copies:
        cp.start()
    for cp in copies:
        cp.wait()


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
    block_t: int = 16,
) -> tuple[jax.Array, jax.Array]:
    """Same contract as ``reference.write_kv``; ``block_t`` token rows (DMAs) per grid step."""
    reference.validate_inputs(k_pages, v_pages, k_new, v_new, slot_mapping, k_scales, v_scales)
    num_pages, page_size, kvh, d = k_pages.shape
    num_tokens = k_new.shape[0]
    if num_tokens == 0:
        return k_pages, v_pages
    k_new, v_new = reference.rows_in_pool_dtype(k_pages, v_pages, k_new, v_new, slot_mapping,
                                                 k_scales, v_scales)
    width = kvh * d
    flat = (num_pages * page_size, width)
    hbm = pl.BlockSpec(memory_space=pltpu.HBM)
    k_out, v_out = pl.pallas_call(
        functools.partial(_kernel, num_tokens=num_tokens, block_t=block_t),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(-(-num_tokens // block_t),),
            in_specs=[hbm] * 4,
            out_specs=[hbm, hbm],
            scratch_shapes=[pltpu.SemaphoreType.DMA((2,))],
        ),
        out_shape=(jax.ShapeDtypeStruct(flat, k_pages.dtype), jax.ShapeDtypeStruct(flat, v_pages.dtype)),
        input_output_aliases={3: 0, 4: 1},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="write_kv_tpu",
    )(
        slot_mapping,
        k_new.astype(k_pages.dtype).reshape(num_tokens, width),
        v_new.astype(v_pages.dtype).reshape(num_tokens, width),
        k_pages.reshape(flat),
        v_pages.reshape(flat),
    )
    return k_out.reshape(k_pages.shape), v_out.reshape(v_pages.shape)
