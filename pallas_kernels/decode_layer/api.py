"""Dispatching entry point for the fused decode layer: picks reference or kernel by backend.

Where it sits: not called by the engine yet. It was built to replace the draft model's layers
in its forwards over short rows (one launch per layer instead of ~13: the batch-1 speculative
step is bound by its kernel count), and on an H200 (session 27) it ran 0.1-0.57x the unfused
layers' device time (one SM per row streams the layer and walks the pages serially), more than
the ~2.7 us of host launch saved per kernel; ``benchmarks/decode_layer.py`` is the A/B any
faster version must pass before it is wired in. Dispatch: cpu (and tpu: no TPU kernel, the
layer's XLA ops are what a TPU fuses anyway) -> ``reference.py``; gpu -> ``gpu.py`` (Pallas,
Triton lowering). ``interpret=True`` runs the GPU kernel in Pallas interpret mode.
"""

from __future__ import annotations

import jax

from pallas_kernels.decode_layer import gpu, reference


def decode_layer(x: jax.Array, ln_attn: jax.Array, wqkv: jax.Array, bqkv: jax.Array | None,
                 wo: jax.Array, ln_mlp: jax.Array, wgu: jax.Array, wd: jax.Array,
                 cos: jax.Array, sin: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                 page_table: jax.Array, query_start_loc: jax.Array, positions: jax.Array,
                 slot_mapping: jax.Array, num_rows: jax.Array, *, layer: int, eps: float,
                 sm_scale: float, interpret: bool = False
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder layer over short ragged rows; shapes and semantics in ``reference``'s
    docstring: x [T, H], every layer's weights stacked ([L, ...]; ``layer`` picks one) and the
    layer's ``(k_pages, v_pages)`` [N, ps, Nkv, d] -> (x [T, H], k_pages, v_pages). The GPU
    kernel takes the shapes ``gpu.unsupported`` accepts; others run the reference."""
    args = (x, ln_attn, wqkv, bqkv, wo, ln_mlp, wgu, wd, cos, sin, k_pages, v_pages, page_table,
            query_start_loc, positions, slot_mapping, num_rows)
    fits = gpu.unsupported(x.shape[1], wqkv.shape[4], wqkv.shape[3] - 2, wgu.shape[3],
                           k_pages.shape[1], k_pages.dtype) is None
    if fits and (interpret or jax.default_backend() == "gpu"):
        return gpu.decode_layer(*args, layer=layer, eps=eps, sm_scale=sm_scale, interpret=interpret)
    return reference.decode_layer(*args, layer=layer, eps=eps, sm_scale=sm_scale)
