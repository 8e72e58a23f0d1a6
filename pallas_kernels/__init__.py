"""Pallas kernels for jserve and their pure-jnp references. Depends on jax only.

Entry points (each dispatches by backend: CPU -> reference, GPU/TPU -> Pallas kernel):
  ragged_paged_attention  ragged batch of query chunks over the paged KV pool
  write_kv                new K/V rows into their slots of the pool (in place under donation)

Sub-packages (``ragged_paged_attention/``, ``kv_write/``) hold ``reference.py`` and the kernels.
Note: the names ``ragged_paged_attention`` / ``write_kv`` on this package are the functions;
import a sub-package's modules by their full path (``pallas_kernels.ragged_paged_attention.reference``).
"""

from pallas_kernels.kv_write.api import write_kv
from pallas_kernels.ragged_paged_attention.api import ragged_paged_attention

__all__ = ["ragged_paged_attention", "write_kv"]
