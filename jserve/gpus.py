"""Named accelerators and how much of their memory XLA hands to jserve, for ``jserve plan``.

Where it sits: beside the engine, never on the data path. At start-up the engine sizes its KV
pool from ``device.memory_stats()["bytes_limit"]`` (``kv_cache.device_memory_budget``); the
planner has no device, so it derives that same limit from a chip's memory::

    bytes_limit = memory_bytes x allocator_fraction

``memory_bytes`` is the per-chip memory nvidia-smi reports (TPUs: HBM). On GPUs XLA's
allocator takes ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (JAX's default 0.75) of the memory CUDA
reports, which is a little less than nvidia-smi's total: on an H200 (measured with jax 0.11.2)
nvidia-smi says 143,771 MiB, CUDA 150,109,880,320 B (143,156 MiB), and ``bytes_limit`` is
112,583,507,968 B, so a named GPU plans about 0.4% more memory than the card gives. A plain
byte count instead of a name is taken as ``bytes_limit`` itself (what
``jax.devices()[0].memory_stats()["bytes_limit"]`` prints on the machine you plan for): then
the plan is exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIB, GIB = 2**20, 2**30
JAX_GPU_MEM_FRACTION = 0.75  # XLA_PYTHON_CLIENT_MEM_FRACTION when unset


@dataclass(frozen=True)
class Accelerator:
    """One chip: its memory and the share of it XLA's allocator reports as ``bytes_limit``."""

    name: str
    platform: str                 # "gpu", "tpu" or "bytes" (a raw byte count)
    memory_bytes: int             # per chip
    allocator_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.memory_bytes < 1:
            raise ValueError(f"gpu: memory must be a positive byte count, got {self.memory_bytes}")
        if not 0.0 < self.allocator_fraction <= 1.0:
            raise ValueError(f"gpu: allocator_fraction must be in (0, 1], got {self.allocator_fraction}")

    @property
    def bytes_limit(self) -> int:
        """What ``memory_stats()["bytes_limit"]`` reports on this chip."""
        return int(self.memory_bytes * self.allocator_fraction)


def _gpu(name: str, mib: int) -> Accelerator:
    return Accelerator(name, "gpu", mib * MIB, JAX_GPU_MEM_FRACTION)


def _tpu(name: str, gib: int) -> Accelerator:
    return Accelerator(name, "tpu", gib * GIB, 1.0)


ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    _gpu("H100-80GB", 81559),     # nvidia-smi totals (MiB)
    _gpu("H200", 143771),
    _gpu("A100-40GB", 40960),
    _gpu("A100-80GB", 81920),
    _gpu("L4", 23034),
    _gpu("RTX-4090", 24564),
    _tpu("TPU-v5e", 16),          # HBM per chip
    _tpu("TPU-v6e", 32),
)}

_ALIASES = {"h100": "H100-80GB", "h100-80g": "H100-80GB", "h200-141gb": "H200", "a100": "A100-80GB",
            "4090": "RTX-4090", "v5e": "TPU-v5e", "tpu-v5e": "TPU-v5e", "tpuv5e": "TPU-v5e",
            "v6e": "TPU-v6e", "tpu-v6e": "TPU-v6e", "tpuv6e": "TPU-v6e"}
_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": MIB, "gib": GIB, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def lookup_accelerator(spec: str | int) -> Accelerator:
    """A chip name (``H100-80GB``, ``TPU v5e``, ...; case and spaces ignored) or a byte count
    (``85899345920``, ``80GiB``, ``24GB``) taken as the allocator limit."""
    if isinstance(spec, int):
        return Accelerator(f"{spec} B", "bytes", spec)
    key = _key(spec)
    by_key = {_key(n): a for n, a in ACCELERATORS.items()}
    if key in by_key:
        return by_key[key]
    if key in _ALIASES:
        return ACCELERATORS[_ALIASES[key]]
    m = re.fullmatch(r"(\d+(?:\.\d+)?)-?([kmg]i?b|b)?", key)
    if m:
        n = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
        return Accelerator(f"{n:,} B", "bytes", n)
    raise ValueError(f"gpu: unknown accelerator {spec!r}; known: {', '.join(ACCELERATORS)}, "
                     f"or a byte count such as 85899345920 or 80GiB")
