"""Device meshes: the ``("data", "stage", "tensor")`` grid every parameter and activation is laid out on.

Where it sits: engine start-up builds one mesh from ``pipeline_parallel_size`` and
``tensor_parallel_size``; parameters are loaded onto it (``checkpoints.load_tensor`` with a
``NamedSharding`` from ``sharding.rules``), the KV pool is allocated on it, and the jitted step
function runs over it. Model code never branches on the mesh size: tp=1 and tp=N run the same
code with different annotations; pp=N runs the same layer code per stage under the pipeline
schedule (``sharding.pipeline``).

Mesh shape is ``(data=1, stage=pp, tensor=tp)``; device ``s * tp + t`` is stage ``s``, tensor
rank ``t`` (a stage's tensor group is contiguous: on GPUs the fastest links join it). The data
axis is there so data parallelism can be added without changing any partition rule; today it
always has size 1 (``data_parallel_size`` builds separate engines).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

DATA_AXIS = "data"
STAGE_AXIS = "stage"
TENSOR_AXIS = "tensor"
MESH_AXES = (DATA_AXIS, STAGE_AXIS, TENSOR_AXIS)


def _positive(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


def make_mesh(tensor_parallel_size: int = 1, devices: Sequence[jax.Device] | None = None,
              pipeline_parallel_size: int = 1) -> Mesh:
    """Build a ``(data=1, stage=pp, tensor=tp)`` mesh over the first ``pp * tp`` devices.

    ``devices`` defaults to ``jax.devices()`` (all devices of the default backend, every process).
    Device order follows ``jax.make_mesh`` (topology-aware on TPU). Axis types are ``Auto``:
    shardings come from ``NamedSharding`` annotations and GSPMD propagation, not explicit-sharding
    types.
    """
    tp = _positive("tensor_parallel_size", tensor_parallel_size)
    pp = _positive("pipeline_parallel_size", pipeline_parallel_size)
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: the device list is empty")
    if pp * tp > len(devices):
        platform = devices[0].platform
        what = (f"tensor_parallel_size={tp}" if pp == 1 else
                f"pipeline_parallel_size={pp} x tensor_parallel_size={tp}")
        raise ValueError(f"{what} needs {pp * tp} devices but only {len(devices)} {platform} "
                         f"device(s) are available")
    return jax.make_mesh((1, pp, tp), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices[:pp * tp])
