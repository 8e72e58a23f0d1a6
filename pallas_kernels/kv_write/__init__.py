"""KV write into the page pool: pure-jnp reference (``reference``) and Pallas kernels.

The dispatching entry point is ``pallas_kernels.write_kv`` (``api.py``).
"""
