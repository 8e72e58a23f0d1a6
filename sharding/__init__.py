"""Meshes, logical-axis partition rules and multi-host start-up. Depends on jax only."""

from sharding.mesh import DATA_AXIS, MESH_AXES, STAGE_AXIS, TENSOR_AXIS, make_mesh
from sharding.multihost import check_launch, host_to_global, initialize_multihost, launch_values
from sharding.pipeline import gpipe, nested_mesh, num_stages
from sharding.pipeline_cycle import gpipe_cycle
from sharding.rules import (
    DEFAULT_AXIS_RULES,
    AxisRules,
    MeshAxes,
    logical_constraint,
    logical_sharding,
    logical_sharding_for_shape,
    logical_spec,
    logical_spec_for_shape,
)

__all__ = [
    "DATA_AXIS", "MESH_AXES", "STAGE_AXIS", "TENSOR_AXIS", "make_mesh", "gpipe", "gpipe_cycle", "num_stages",
    "nested_mesh", "initialize_multihost",
    "check_launch", "host_to_global", "launch_values", "AxisRules",
    "DEFAULT_AXIS_RULES", "MeshAxes", "logical_constraint", "logical_sharding",
    "logical_sharding_for_shape", "logical_spec", "logical_spec_for_shape",
]
