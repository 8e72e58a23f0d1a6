"""Logical axis rules: name each array dimension once, map names to mesh axes in one table.

Where it sits: model code and the checkpoint loader describe every parameter, KV pool and
activation dimension with a *logical* name (``("embed", "mlp")`` for an up-projection,
``("layers", "kv_pages", "page_slot", "kv_heads", "head_dim")`` for the KV pool). This module
turns those names into ``PartitionSpec`` / ``NamedSharding`` on a mesh from ``sharding.mesh``.
Changing the parallelism layout means changing the table, never the model code (MaxText style).

    logical axes            rules (AxisRules)         mesh axes        PartitionSpec
    ("embed", "mlp")   -->  embed -> None        -->  (None, "tensor") --> P(None, "tensor")
                            mlp   -> "tensor"

Divisibility fallback (``logical_sharding_for_shape``): a dimension whose size does not divide
evenly by the size of the mesh axes it maps to is *replicated* instead. The case that needs it
is grouped-query attention with fewer KV heads than tensor-parallel devices: ``kv_heads=2`` on
``tp=4`` keeps all KV heads on every device (each device reads the heads its q heads use),
where a strict split would be impossible. Use the shape-aware functions for any array whose
sizes come from a model config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# A logical axis maps to one mesh axis, several mesh axes (sharded over their product), or None
# (replicated).
MeshAxes = str | tuple[str, ...] | None


@dataclass(frozen=True)
class AxisRules:
    """Ordered ``(logical_name, mesh_axes)`` pairs; each logical name appears once.

    Tuples (not a dict) keep the rules hashable so they can be a static jit argument.
    """

    rules: tuple[tuple[str, MeshAxes], ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        normalized: list[tuple[str, MeshAxes]] = []
        for pair in self.rules:
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise ValueError(f"AxisRules.rules entries must be (logical_name, mesh_axes) pairs, "
                                 f"got {pair!r}")
            name, axes = pair
            if not isinstance(name, str) or not name:
                raise ValueError(f"AxisRules: logical axis name must be a non-empty string, got {name!r}")
            if name in seen:
                raise ValueError(f"AxisRules: logical axis {name!r} appears more than once")
            seen.add(name)
            normalized.append((name, _normalize_mesh_axes(name, axes)))
        object.__setattr__(self, "rules", tuple(normalized))

    @property
    def logical_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.rules)

    def mesh_axes(self, logical_name: str | None) -> MeshAxes:
        """Mesh axes for one logical name; ``None`` (an unnamed dim) is replicated."""
        if logical_name is None:
            return None
        for name, axes in self.rules:
            if name == logical_name:
                return axes
        raise ValueError(f"unknown logical axis {logical_name!r}; known axes: {self.logical_names}")

    def with_overrides(self, **overrides: MeshAxes) -> AxisRules:
        """A copy with some names remapped (or new names added at the end)."""
        rules = [(name, overrides.pop(name, axes)) for name, axes in self.rules]
        rules.extend(overrides.items())
        return AxisRules(tuple(rules))


def _normalize_mesh_axes(name: str, axes: object) -> MeshAxes:
    if axes is None or isinstance(axes, str):
        return axes
    if isinstance(axes, (tuple, list)) and axes and all(isinstance(a, str) for a in axes):
        if len(set(axes)) != len(axes):
            raise ValueError(f"AxisRules: logical axis {name!r} maps to a repeated mesh axis {axes!r}")
        return tuple(axes)
    raise ValueError(f"AxisRules: logical axis {name!r} must map to a mesh axis name, a tuple of "
                     f"names, or None; got {axes!r}")


DEFAULT_AXIS_RULES = AxisRules((
    ("batch", None),         # requests in a step
    ("tokens", None),        # flattened ragged token rows of a step
    ("vocab", "tensor"),     # embedding rows / lm_head columns
    ("embed", None),         # hidden size (residual stream)
    ("heads", "tensor"),     # query heads
    ("kv_heads", "tensor"),  # key/value heads (replicated when not divisible by tp)
    ("head_dim", None),
    ("mlp", "tensor"),       # MLP intermediate size
    ("layers", "stage"),     # stacked-layer axis: stage s holds layers [s*L/pp, (s+1)*L/pp)
    ("stage", "stage"),      # the stage axis of a pipelined KV pool ([N, pp, ...])
    ("kv_pages", None),      # pages of the KV pool
    ("page_slot", None),     # token slot inside a page
))


def _axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else axes


def _mesh_axes_per_dim(mesh: Mesh, logical_axes: Sequence[str | None],
                       rules: AxisRules) -> list[MeshAxes]:
    if isinstance(logical_axes, str):
        raise ValueError(f"logical_axes must be a sequence of names, got the string {logical_axes!r}")
    per_dim = [rules.mesh_axes(name) for name in logical_axes]
    used: dict[str, str | None] = {}
    for name, axes in zip(logical_axes, per_dim, strict=True):
        for axis in _axes_tuple(axes):
            if axis not in mesh.shape:
                raise ValueError(f"logical axis {name!r} maps to mesh axis {axis!r}, which is not in the "
                                 f"mesh (axes {tuple(mesh.axis_names)})")
            if axis in used:
                raise ValueError(f"logical axes {used[axis]!r} and {name!r} of {tuple(logical_axes)} both "
                                 f"map to mesh axis {axis!r}; a mesh axis can shard one dimension only")
            used[axis] = name
    return per_dim


def logical_spec(mesh: Mesh, logical_axes: Sequence[str | None],
                 rules: AxisRules = DEFAULT_AXIS_RULES) -> PartitionSpec:
    """``PartitionSpec`` for an array whose dims carry ``logical_axes`` (no divisibility check)."""
    return PartitionSpec(*_mesh_axes_per_dim(mesh, logical_axes, rules))


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None],
                     rules: AxisRules = DEFAULT_AXIS_RULES) -> NamedSharding:
    """``NamedSharding`` for ``logical_axes`` on ``mesh`` (no divisibility check)."""
    return NamedSharding(mesh, logical_spec(mesh, logical_axes, rules))


def logical_spec_for_shape(mesh: Mesh, shape: Sequence[int], logical_axes: Sequence[str | None],
                           rules: AxisRules = DEFAULT_AXIS_RULES) -> PartitionSpec:
    """Like ``logical_spec``, but a dim not divisible by its mesh axes' size is replicated."""
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {tuple(shape)} has {len(shape)} dims but logical axes "
                         f"{tuple(logical_axes)} name {len(logical_axes)}")
    per_dim = _mesh_axes_per_dim(mesh, logical_axes, rules)
    spec = []
    for size, axes in zip(shape, per_dim, strict=True):
        ways = math.prod(mesh.shape[a] for a in _axes_tuple(axes))
        spec.append(axes if size % ways == 0 else None)
    return PartitionSpec(*spec)


def logical_sharding_for_shape(mesh: Mesh, shape: Sequence[int], logical_axes: Sequence[str | None],
                               rules: AxisRules = DEFAULT_AXIS_RULES) -> NamedSharding:
    """``NamedSharding`` for an array of ``shape``; non-divisible dims fall back to replication."""
    return NamedSharding(mesh, logical_spec_for_shape(mesh, shape, logical_axes, rules))


def logical_constraint(x: jax.Array, mesh: Mesh, logical_axes: Sequence[str | None],
                       rules: AxisRules = DEFAULT_AXIS_RULES) -> jax.Array:
    """``with_sharding_constraint`` for an activation inside jit, by logical axis names."""
    return jax.lax.with_sharding_constraint(
        x, logical_sharding_for_shape(mesh, x.shape, logical_axes, rules))
