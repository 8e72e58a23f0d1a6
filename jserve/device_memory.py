"""How much device memory the engine may use: ``gpu_memory_utilization`` and JAX's allocator.

Where it sits: start-up, before anything touches a device. ``build_engine`` calls
``allow_device_memory`` first thing, so JAX's GPU allocator is created with the share of the
device the user asked for; the KV pool is sized later from ``usable_device_bytes``::

    allow_device_memory(u)     GPU backend not started yet: XLA_CLIENT_MEM_FRACTION = u (what
                               jaxlib's GPU client reads when it starts), unless the user set it
    ... load weights, measure the activation peak (jserve/activation_peak.py) ...
    usable_device_bytes(d, u)  = min(bytes_limit, u x device memory), device memory being
                               bytes_limit / the fraction the allocator was created with

JAX's GPU allocator takes a fixed share of the device (``XLA_CLIENT_MEM_FRACTION``, formerly
``XLA_PYTHON_CLIENT_MEM_FRACTION``, default 0.75) when its backend starts, once per process; that
share is ``memory_stats()["bytes_limit"]``, and no allocation can pass it. So the fraction must
be set before the first JAX device call. Where JAX already started (a notebook that ran JAX
first) or the user set a smaller fraction, the engine warns and uses what the allocator allows.
TPUs and CPUs report their whole memory (or none); ``u`` of it is used.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

FRACTION_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")  # jaxlib reads these
JAX_GPU_DEFAULT_FRACTION = 0.75   # jaxlib's GPU allocator share when neither is set
_SLACK = 1 << 20                  # bytes: the allocator rounds its limit


def _backends_started() -> bool:
    # No public API says whether JAX created its backends; this is the one jax.devices() sets.
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()


def _user_fraction() -> float | None:
    """The allocator fraction set through jaxlib's variables or ``jax_pjrt_client_create_options``."""
    for name in FRACTION_VARS:
        if os.environ.get(name):
            return float(os.environ[name])
    opts = jax.config.jax_pjrt_client_create_options
    if isinstance(opts, dict) and "memory_fraction" in opts:
        return float(opts["memory_fraction"])
    if isinstance(opts, str):
        for item in filter(None, opts.split(";")):
            key, _, value = item.partition(":")
            if key == "memory_fraction":
                return float(value)
    return None


def allow_device_memory(utilization: float) -> None:
    """Before JAX starts its backends: make its GPU allocator's share ``utilization`` (a no-op
    when they already started, or when the user set the share; ``usable_device_bytes`` warns
    then if it is smaller)."""
    if _backends_started() or _user_fraction() is not None:
        return
    os.environ[FRACTION_VARS[0]] = repr(float(utilization))


def allocator_fraction(platform: str) -> float:
    """The share of a device's memory its allocator's ``bytes_limit`` is (GPU: the configured
    fraction, else JAX's 0.75; other platforms report their whole memory)."""
    if platform not in ("gpu", "cuda", "rocm"):
        return 1.0
    fraction = _user_fraction()
    return JAX_GPU_DEFAULT_FRACTION if fraction is None else fraction


def allowed_bytes(bytes_limit: int, fraction: float, utilization: float) -> tuple[int, str | None]:
    """``utilization`` of the device (``bytes_limit / fraction`` bytes), capped at the
    allocator's ``bytes_limit`` -> (bytes, a warning when the cap binds, else None)."""
    device = bytes_limit / fraction
    want = int(device * utilization)
    if want <= bytes_limit + _SLACK:
        return min(want, bytes_limit), None
    return bytes_limit, (
        f"gpu_memory_utilization={utilization} asks for {want:,} B of the device's {int(device):,} B, "
        f"but JAX's allocator was created with a share of {fraction} ({bytes_limit:,} B): JAX started "
        f"before the engine (e.g. an earlier JAX call in this notebook), or {FRACTION_VARS[0]} / "
        f"{FRACTION_VARS[1]} is set. Using {bytes_limit:,} B. To use more, build the engine before any "
        f"other JAX call, or set {FRACTION_VARS[0]}={utilization} before starting Python.")


def allocator_limited(device: jax.Device) -> bool:
    """Whether ``device``'s allocator reports a memory limit (GPU, TPU; not CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return bool(stats) and "bytes_limit" in stats


def usable_device_bytes(device: jax.Device, utilization: float) -> int | None:
    """Bytes the engine may use on ``device`` (weights, activations and KV), or None when the
    backend reports no memory limit (CPU). Logs a warning when the allocator allows less."""
    if not allocator_limited(device):
        return None
    stats = device.memory_stats()
    usable, warning = allowed_bytes(int(stats["bytes_limit"]), allocator_fraction(device.platform),
                                    utilization)
    if warning:
        log.warning(warning)
    return usable


def allocator_report(device: jax.Device) -> str:
    """The allocator's state for a start-up warning: bytes in use, of them the live arrays' in
    ``device``'s memory (the rest is held by no array: compiled programs' buffers, the allocator's own),
    and the largest free block (a pool array larger than it finds no room: fragmentation).
    Empty where the backend reports no statistics (CPU)."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return ""
    arrays = [s.data for a in jax.live_arrays() for s in a.addressable_shards
              if s.device == device and a.sharding.memory_kind in (None, "device")]   # (not host memory)
    live = sum(a.nbytes for a in arrays)
    gib = 2**30
    return (f"{int(stats.get('bytes_in_use', 0)) / gib:.2f} GiB in use ({live / gib:.2f} GiB in "
            f"{len(arrays)} live arrays), largest free block "
            f"{int(stats.get('largest_free_block_bytes', 0)) / gib:.2f} GiB, "
            f"{int(stats.get('num_allocs', 0))} allocations, limit {int(stats['bytes_limit']) / gib:.2f} GiB")
