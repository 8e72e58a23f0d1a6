"""Which GPU generation runs the kernels: the Mosaic GPU kernels (``quant_matmul``, ``kv_write``'s
``rope_write``) are written for Hopper (sm_90: TMA, wgmma) and dispatched only there."""

from __future__ import annotations

import jax


def on_hopper() -> bool:
    """Whether the default device is a Hopper GPU (compute capability 9.x)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")
