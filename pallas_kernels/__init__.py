"""Pallas kernels for jserve and their pure-jnp references. Depends on jax only.

Entry points (each dispatches by ``jax.default_backend()``: cpu -> pure-jnp reference,
gpu -> Pallas Triton-lowered kernel, tpu -> Pallas Mosaic TPU kernel):
  ragged_paged_attention  ragged batch of query chunks over the paged KV pool
  flash_attention         causal attention over packed segments (long fresh prompts)
  write_kv                new K/V rows into their slots of the pool (in place under donation)
  write_kv_quantized      the same into an int8 / fp8 pool, setting the started pages' scales
  quant_matmul            x @ 8-bit weight (int8 / fp8, per-channel scales), w8a16 or fp8 w8a8
                          (gpu: Mosaic GPU kernel on Hopper)
  quant_matmul_residual_norm  the same (w8a16) added to the residual stream, then RMSNorm
  quant_matmul_rope_write     the same (w8a16, a fused QKV projection), RoPE and the K/V write
  quant_matmul_silu_gate      the same (w8a16, the MLP's fused gate/up) and its SiLU gate
                              (``quant_rope_write_fuses``: whether one kernel does the epilogue)
  write_rope                  a dense fused QKV projection's bias, RoPE and K/V write
                              (``rope_write_fuses``: whether one kernel does them)
  write_rope_quantized        the same into an int8 / fp8 pool, with its pages' scales
                              (``rope_write_quant_fuses``: whether one kernel does them)

Sub-packages (``ragged_paged_attention/``, ``flash_attention/``, ``kv_write/``,
``quant_matmul/``) hold
``reference.py``, ``gpu.py``, ``tpu.py`` and ``api.py``. The names above are the functions, which
shadow the sub-package attributes: import modules as
``from pallas_kernels.ragged_paged_attention import reference``.
"""

from pallas_kernels.flash_attention.api import flash_attention
from pallas_kernels.kv_write.api import (
    rope_write_fuses,
    rope_write_quant_fuses,
    write_kv,
    write_kv_quantized,
    write_rope,
    write_rope_quantized,
)
from pallas_kernels.quant_matmul.api import (
    quant_matmul,
    quant_matmul_residual_norm,
    quant_matmul_rope_write,
    quant_matmul_silu_gate,
    quant_rope_write_fuses,
)
from pallas_kernels.ragged_paged_attention.api import ragged_paged_attention

__all__ = ["flash_attention", "quant_matmul", "quant_matmul_residual_norm", "quant_matmul_rope_write",
           "quant_matmul_silu_gate", "quant_rope_write_fuses", "ragged_paged_attention",
           "rope_write_fuses", "rope_write_quant_fuses", "write_kv", "write_kv_quantized", "write_rope",
           "write_rope_quantized"]
