"""Flash attention for long prefill: reference (``reference``), GPU and TPU Pallas kernels.

The dispatching entry point is ``pallas_kernels.flash_attention`` (``api.py``).
"""
