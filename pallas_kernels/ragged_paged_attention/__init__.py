"""Ragged paged attention: pure-jnp reference (``reference``), GPU and TPU Pallas kernels.

The dispatching entry point is ``pallas_kernels.ragged_paged_attention`` (``api.py``).
"""
