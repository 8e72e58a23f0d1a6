"""Dense matmuls of few tokens (decode steps) over a layer of stacked weights: pure-jnp
reference (``reference``) and the Hopper kernel (``mgpu``).

The dispatching entry point is ``pallas_kernels.small_m_matmul`` (``api.py``).
"""
