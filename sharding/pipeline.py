"""The pipeline schedule: layers split into stages over the mesh's ``stage`` axis, micro-batches
flowing through them (GPipe), inside one jitted step.

Where it sits: the decoder (jserve/model/decoder.py) calls ``gpipe`` in place of its layer loop
when the mesh has more than one stage. ``gpipe`` knows nothing about transformers: it runs a
``stage_fn`` on every stage at once under ``shard_map`` over ``stage`` (the ``tensor`` axis stays
under the partitioner, so tensor parallelism inside a stage works as without pipelining), and
moves activations from stage s to stage s + 1 with ``ppermute``.

Schedule for S stages and M micro-batches: M + S - 1 ticks; at tick t stage s works on
micro-batch t - s (a bubble when that is outside [0, M): the stage computes on a clamped
micro-batch and ``stage_fn`` gets ``valid=False``, so it must not write state that matters)::

    tick      0     1     2     3   ...            S=2, M=3
    stage 0   mb0   mb1   mb2   --
    stage 1   --    mb0   mb1   mb2
               \\ppermute  \\     \\

Each stage holds its own slice of ``stage_params`` (leading axis sharded over ``stage``: stage s
holds layers [s*L/S, (s+1)*L/S)) and of ``stage_state`` (the KV pool: sharded over ``stage`` on
``state_axis``). The last stage's outputs are summed over ``stage`` (the other stages contribute
zeros), so every device leaves with all micro-batches' outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sharding.mesh import STAGE_AXIS

# stage_fn(params, state, x [Tm, H], micro-batch inputs, valid: bool[]) -> (y [Tm, H], state)
StageFn = Callable[[Any, Any, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


def nested_mesh(mesh: Mesh) -> Any:
    """The mesh for a ``shard_map`` over the tensor axis inside the step: inside a pipeline
    stage (``gpipe``: manual over ``stage``) the context's abstract mesh, whose tensor axis is
    still under the partitioner (the concrete mesh raises a mismatch there), else ``mesh``."""
    ctx = jax.sharding.get_abstract_mesh()
    return ctx if ctx.manual_axes else mesh


def num_stages(mesh: Mesh | None) -> int:
    """Pipeline stages of ``mesh`` (1 without a mesh or a stage axis)."""
    return 1 if mesh is None else int(mesh.shape.get(STAGE_AXIS, 1))


def gpipe(stage_fn: StageFn, mesh: Mesh, stage_params: Any, stage_state: Any, xs: jax.Array,
          per_microbatch: Any, state_axis: int = 0) -> tuple[jax.Array, Any]:
    """Run ``stage_fn`` over S stages and M micro-batches (see the module docstring).

    stage_params: pytree, every leaf [L, ...] sharded over ``stage`` on axis 0;
    stage_state: pytree, every leaf sharded over ``stage`` on ``state_axis`` (size S there);
    xs: [M, Tm, H] the micro-batches' inputs to stage 0 (replicated over ``stage``);
    per_microbatch: pytree of [M, ...] leaves, micro-batch m's slice goes to ``stage_fn``
    -> (ys [M, Tm, H] the last stage's outputs, replicated; stage_state updated). Call it inside
    ``jax.jit`` (a partially manual ``shard_map`` does not run eagerly).
    """
    s_count, m_count = num_stages(mesh), xs.shape[0]
    params_spec = jax.tree.map(lambda _: P(STAGE_AXIS), stage_params)
    state_spec = jax.tree.map(lambda _: P(*(None,) * state_axis, STAGE_AXIS), stage_state)
    rep = jax.tree.map(lambda _: P(), per_microbatch)
    forward = [(i, i + 1) for i in range(s_count - 1)]

    def body(params: Any, state: Any, xs: jax.Array, per_mb: Any) -> tuple[jax.Array, Any]:
        stage = jax.lax.axis_index(STAGE_AXIS)
        last = stage == s_count - 1

        def tick(t: jax.Array, loop: tuple) -> tuple:
            carry, ys, state = loop
            # The weights tied to the loop's activations: otherwise XLA hoists what it derives
            # from them alone (a layer's weight slices) out of the loop as materialized copies.
            params_t, carry = jax.lax.optimization_barrier((params, carry))
            m = t - stage
            valid = (m >= 0) & (m < m_count)
            mc = jnp.clip(m, 0, m_count - 1)
            x = jnp.where(stage == 0, xs[mc], carry)
            mb = jax.tree.map(lambda a: a[mc], per_mb)
            y, state = stage_fn(params_t, state, x, mb, valid)
            ys = ys.at[mc].set(jnp.where(last & valid, y, ys[mc]))
            return jax.lax.ppermute(y, STAGE_AXIS, forward), ys, state

        ticks, loop = m_count + s_count - 1, (jnp.zeros_like(xs[0]), jnp.zeros_like(xs), state)
        if m_count == 1:
            # One micro-batch (decode: weight-bound) unrolls its S ticks. In a loop's body XLA
            # on GPU copies the layers' weight slices every iteration (an H200, session 16: the
            # burst loop's 16.6 MiB gate/up slices), more weight traffic than the step itself.
            for t in range(ticks):
                loop = tick(jnp.int32(t), loop)
            _, ys, state = loop
        else:
            # One traced tick (a loop: the program holds each stage's layers once; its steps
            # are compute-bound, see decoder.num_microbatches). Static bounds give XLA a known
            # trip count: the GPU runtime loops without reading a predicate back to the host.
            _, ys, state = jax.lax.fori_loop(0, ticks, tick, loop)
        # Only the last stage's ys are nonzero, so a float32 sum is exact. XLA:CPU aborts on a
        # bfloat16 all-reduce here ("Invalid binary instruction opcode copy": its reduction
        # ends in a copy), and NCCL has no 16-bit integer type for summing the bits instead.
        wide = ys.astype(jnp.float32) if ys.dtype.itemsize < 4 else ys
        return jax.lax.psum(wide, STAGE_AXIS).astype(ys.dtype), state

    run = jax.shard_map(body, mesh=mesh, in_specs=(params_spec, state_spec, P(), rep),
                        out_specs=(P(), state_spec), axis_names={STAGE_AXIS}, check_vma=False)
    return run(stage_params, stage_state, xs, per_microbatch)
