"""Multi-host start-up: join this process to a JAX distributed job before any device is touched.

Where it sits: the very first thing a multi-host launch script does, before ``make_mesh``. After
it, ``jax.devices()`` lists every process's devices, so one mesh spans hosts, and the loader
(``checkpoints.load_tensor``) fills only the shards this process's devices hold.

Single-process runs (all arguments None, or ``num_processes=1``) are a no-op, so the same launch
path serves a laptop and a pod. Cluster auto-detection is not used: a multi-process job passes
all three values explicitly, and a half-specified job is an error rather than a guess.
"""

from __future__ import annotations

import jax


def _validate_coordinator(address: object) -> str:
    if not isinstance(address, str) or not address:
        raise ValueError(f"coordinator_address must be a 'host:port' string, got {address!r}")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"coordinator_address must be 'host:port' with a port in 1..65535, got {address!r}")
    return address


def initialize_multihost(coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None) -> bool:
    """Initialize ``jax.distributed`` for a multi-process job; returns whether it did.

    - all None, or ``num_processes == 1``: single process, nothing to do -> False.
    - ``num_processes > 1``: ``coordinator_address`` ("host:port" of process 0's coordinator)
      and ``process_id`` in ``[0, num_processes)`` are required -> True.
    Must run before any JAX computation in this process (JAX raises otherwise).
    """
    if coordinator_address is None and num_processes is None and process_id is None:
        return False
    if num_processes is None:
        raise ValueError("initialize_multihost: num_processes is required when coordinator_address "
                         "or process_id is given")
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if process_id is not None and (isinstance(process_id, bool) or not isinstance(process_id, int)
                                   or not 0 <= process_id < num_processes):
        raise ValueError(f"process_id must be an integer in [0, {num_processes}), got {process_id!r}")
    if coordinator_address is not None:
        _validate_coordinator(coordinator_address)
    if num_processes == 1:
        return False
    missing = [n for n, v in (("coordinator_address", coordinator_address), ("process_id", process_id))
               if v is None]
    if missing:
        raise ValueError(f"initialize_multihost: num_processes={num_processes} also needs "
                         f"{' and '.join(missing)}")
    if jax.distributed.is_initialized():
        raise RuntimeError("initialize_multihost: jax.distributed is already initialized in this process")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True
