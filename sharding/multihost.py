"""Multi-process start-up: join this process to a JAX distributed job before any device is touched.

Where it sits: the very first thing engine start-up does, before ``make_mesh``. After it,
``jax.devices()`` lists every process's devices, so one mesh spans processes (and hosts), and
the loaders fill only the shards this process's devices hold.

Single-process runs (nothing given, or ``num_processes=1``) are a no-op, so the same launch path
serves a laptop and a pod. The three launch values come from the caller (CLI flags, ``LLM``
keywords) or, for cluster launchers that set environment variables per task, from
``JSERVE_COORDINATOR_ADDRESS`` / ``JSERVE_NUM_PROCESSES`` / ``JSERVE_PROCESS_ID``
(``launch_values``; an explicit value wins). A half-specified job is an error, never a guess.

Bad launches fail fast and by name: a missing value or ``process_id >= num_processes`` before
anything starts; an unreachable coordinator (process > 0) or a taken port (process 0) within
``timeout_s`` with the address in the message, instead of JAX's abort after its own timeout.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import Sharding

ENV_COORDINATOR = "JSERVE_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JSERVE_NUM_PROCESSES"
ENV_PROCESS_ID = "JSERVE_PROCESS_ID"


class LaunchError(ValueError):
    """A multi-process job that cannot start as launched (unreachable coordinator, taken port)."""


def _validate_coordinator(address: object) -> tuple[str, int]:
    if not isinstance(address, str) or not address:
        raise ValueError(f"coordinator_address must be a 'host:port' string, got {address!r}")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"coordinator_address must be 'host:port' with a port in 1..65535, got {address!r}")
    return host.strip("[]"), int(port)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None


def launch_values(coordinator_address: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None, environ: Mapping[str, str] | None = None
                  ) -> tuple[str | None, int | None, int | None]:
    """The job's (coordinator_address, num_processes, process_id): each given value, else its
    ``JSERVE_*`` environment variable, else None."""
    env = os.environ if environ is None else environ
    if coordinator_address is None:
        coordinator_address = env.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _env_int(env, ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _env_int(env, ENV_PROCESS_ID)
    return coordinator_address, num_processes, process_id


def check_launch(coordinator_address: str | None, num_processes: int | None,
                 process_id: int | None) -> bool:
    """Validate the launch values together; -> whether this is a multi-process job."""
    if coordinator_address is None and num_processes is None and process_id is None:
        return False
    if num_processes is None:
        raise ValueError("num_processes is required when coordinator_address or process_id is given "
                         f"(--num-processes, or {ENV_NUM_PROCESSES})")
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
    if process_id is not None and (isinstance(process_id, bool) or not isinstance(process_id, int)
                                   or not 0 <= process_id < num_processes):
        raise ValueError(f"process_id must be an integer in [0, {num_processes}) for num_processes="
                         f"{num_processes}, got {process_id!r}")
    if coordinator_address is not None:
        _validate_coordinator(coordinator_address)
    if num_processes == 1:
        return False
    missing = [f"{name} (--{name.replace('_', '-')} or {env})" for name, env, v in (
        ("coordinator_address", ENV_COORDINATOR, coordinator_address),
        ("process_id", ENV_PROCESS_ID, process_id)) if v is None]
    if missing:
        raise ValueError(f"num_processes={num_processes} also needs {' and '.join(missing)}")
    return True


def _wait_reachable(host: str, port: int, timeout_s: float) -> None:
    """Connect to the coordinator until it answers; LaunchError naming it after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise LaunchError(
                f"coordinator {host}:{port} is not reachable after {timeout_s:g} s ({last}): is "
                f"process 0 running, and is the address one this host can reach?")
        time.sleep(0.2)


def _check_port_free(port: int) -> None:
    for family, addr in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((addr, port))
                return
        except OSError as e:
            if family == socket.AF_INET6 and e.errno in (97, 99):   # no IPv6 on this host
                continue
            raise LaunchError(f"coordinator port {port} cannot be bound on this host (process 0 "
                                  f"runs the coordinator): {e}") from None


def initialize_multihost(coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None, timeout_s: float = 60.0) -> bool:
    """Initialize ``jax.distributed`` for a multi-process job; returns whether it did.

    - all None, or ``num_processes == 1``: single process, nothing to do -> False.
    - ``num_processes > 1``: ``coordinator_address`` ("host:port" of process 0's coordinator)
      and ``process_id`` in ``[0, num_processes)`` are required -> True.
    ``timeout_s`` bounds joining (and JAX's heartbeat timeout: a peer silent that long is
    declared dead and every process of the job stops). Must run before any JAX computation.
    """
    if not check_launch(coordinator_address, num_processes, process_id):
        return False
    if jax.distributed.is_initialized():
        raise RuntimeError("initialize_multihost: jax.distributed is already initialized in this process")
    host, port = _validate_coordinator(coordinator_address)
    if process_id == 0:
        _check_port_free(port)
    else:
        _wait_reachable(host, port, timeout_s)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=max(1, int(timeout_s)),
                               heartbeat_timeout_seconds=max(1, int(timeout_s)))
    return True


def host_to_global(x: Any, sharding: Sharding) -> Any:
    """``jax.device_put(x, sharding)`` for host arrays (one, or a pytree of them, e.g. a tuple:
    one batched transfer) every process holds the same copy of.

    On a mesh spanning processes, ``device_put`` of a host value first checks that every process
    passed the same value (an all-gather and a compile per call); the engine's per-step inputs
    are identical by construction (every process packs the same plan), so each process fills
    its own shards from its copy instead."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.tree.map(
        lambda a: jax.make_array_from_callback(a.shape, sharding, lambda index: a[index]), x)
