"""Dispatching entry point for writing new K/V into the page pool.

Where it sits: called once per attention layer inside the jitted step, before attention, with
the layer's donated pool. cpu and gpu -> ``reference`` (XLA scatter, in place under donation),
tpu -> ``tpu``; ``interpret=True`` runs the backend's kernel (the GPU one on CPU) interpreted.

On the H200 the Pallas GPU kernel (``gpu.write_kv``) wrote 4096 tokens in 15.6 us against the
scatter's 83.4 us (tie at 256 tokens; KERNEL_NOTES.md), but its hardware correctness test
(tests/gpu/test_kernels_gpu.py::test_write_kv_gpu) has not run on a GPU yet, so the GPU default
stays on the scatter until it has: correctness of the pool beats 70 us per layer.
"""

from __future__ import annotations

import jax

from pallas_kernels.kv_write import gpu, reference, tpu


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
    if interpret:
        return gpu.write_kv(*args, k_scales=k_scales, v_scales=v_scales, interpret=True)
    return reference.write_kv(*args, k_scales=k_scales, v_scales=v_scales)
