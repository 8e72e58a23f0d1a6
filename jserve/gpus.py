"""Named accelerators and how much of their memory the engine may use, for ``jserve plan``.

Where it sits: beside the engine, never on the data path. At start-up the engine sets JAX's GPU
allocator to ``gpu_memory_utilization`` of the device and sizes its KV pool from what that
allows (jserve/device_memory.py, ``kv_cache.MemoryBudget``); the planner has no device, so it
takes the same share of a chip's memory::

    usable = memory_bytes x gpu_memory_utilization

``memory_bytes`` is the per-chip memory nvidia-smi reports (TPUs: HBM). XLA's GPU allocator
takes its share of the memory CUDA reports, which is a little less than nvidia-smi's total: on
an H200 (measured with jax 0.11.2) nvidia-smi says 143,771 MiB and CUDA 150,109,880,320 B
(143,156 MiB), so a named GPU plans about 0.4% more memory than the card gives. A plain byte
count instead of a name is taken as the usable bytes themselves (what start-up logs as
``usable``, or ``jax.devices()[0].memory_stats()["bytes_limit"]`` prints in a process whose
allocator share is ``gpu_memory_utilization``): then the plan is exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIB, GIB = 2**20, 2**30


@dataclass(frozen=True)
class Accelerator:
    """One chip and its memory (``platform`` "bytes": a byte count that is the usable memory)."""

    name: str
    platform: str                 # "gpu", "tpu" or "bytes" (a raw byte count)
    memory_bytes: int             # per chip

    def __post_init__(self) -> None:
        if self.memory_bytes < 1:
            raise ValueError(f"gpu: memory must be a positive byte count, got {self.memory_bytes}")

    def usable_bytes(self, utilization: float) -> int:
        """What the engine may use per device at ``gpu_memory_utilization``: that share of the
        chip's memory; a byte count is taken as already the usable memory."""
        if self.platform == "bytes":
            return self.memory_bytes
        return int(self.memory_bytes * utilization)


def _gpu(name: str, mib: int) -> Accelerator:
    return Accelerator(name, "gpu", mib * MIB)


def _tpu(name: str, gib: int) -> Accelerator:
    return Accelerator(name, "tpu", gib * GIB)


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
    (``85899345920``, ``80GiB``, ``24GB``) taken as the usable memory per device."""
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
