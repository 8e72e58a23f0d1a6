"""Fused decode layer: pure-jnp reference (``reference``) and the GPU Pallas kernel (``gpu``).

The dispatching entry point is ``pallas_kernels.decode_layer`` (``api.py``).
"""
