"""Device meshes: the ``("data", "tensor")`` grid every parameter and activation is laid out on.

Where it sits: engine start-up builds one mesh from ``tensor_parallel_size``; parameters are
loaded onto it (``checkpoints.load_tensor`` with a ``NamedSharding`` from ``sharding.rules``),
the KV pool is allocated on it, and the jitted step function runs over it. Model code never
branches on the mesh size: tp=1 and tp=N run the same code with different annotations.

Mesh shape is ``(data=1, tensor=tp)``. The data axis is there so data parallelism can be added
without changing any partition rule; today it always has size 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

DATA_AXIS = "data"
TENSOR_AXIS = "tensor"
MESH_AXES = (DATA_AXIS, TENSOR_AXIS)


def make_mesh(tensor_parallel_size: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a ``(data=1, tensor=tensor_parallel_size)`` mesh over the first ``tp`` devices.

    ``devices`` defaults to ``jax.devices()`` (all devices of the default backend, every process).
    Device order within the tensor axis follows ``jax.make_mesh`` (topology-aware on TPU).
    Axis types are ``Auto``: shardings come from ``NamedSharding`` annotations and GSPMD
    propagation, not explicit-sharding types.
    """
    tp = tensor_parallel_size
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: the device list is empty")
    if tp > len(devices):
        platform = devices[0].platform
        raise ValueError(
            f"tensor_parallel_size={tp} needs {tp} devices but only {len(devices)} {platform} "
            f"device(s) are available")
    return jax.make_mesh((1, tp), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[:tp])
