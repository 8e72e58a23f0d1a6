"""Quantized matmuls (8-bit weights, optionally 8-bit activations): pure-jnp reference
(``reference``) and Pallas kernels (``mgpu`` for Hopper GPUs, ``tpu``).

The dispatching entry point is ``pallas_kernels.quant_matmul`` (``api.py``).
"""
