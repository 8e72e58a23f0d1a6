"""KV write into the page pool: pure-jnp reference (``reference``) and Pallas kernels.

The dispatching entry point is ``pallas_kernels.write_kv`` (``api.py``); ``scatter_rows`` is
the pool scatter every page move uses too (in place for fp8 pools: see its docstring).
"""

from pallas_kernels.kv_write.reference import scatter_rows

__all__ = ["scatter_rows"]
