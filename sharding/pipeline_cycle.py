"""The interleaved pipeline schedule: S row groups circling through S stages for N decode steps
inside one jitted program, so that every stage works on every tick.

Where it sits: a burst of N decode steps at ``pipeline_parallel_size`` S > 1
(jserve/burst_step.py -> ``decoder.pipelined_burst``) runs here instead of N steps of ``gpipe``,
whose one-micro-batch decode leaves S - 1 stages idle on every tick. The step's rows are cut
into G = S groups; group g's step i is unit k = i*G + g, and stage s works on unit t - s at
tick t. The last stage's output of a unit goes round to stage 0 (a cyclic ``ppermute``), which
turns it into the group's next input one tick later (``feed_fn``: norm, logits, argmax, the
embedding of the token) -- exactly when that group's next step is due, because G = S::

    tick      0      1      2      3      4      5        S = G = 2, N = 2 (units g0i0 ...)
    stage 0   g0i0   g1i0   g0i1   g1i1   (fd)   (fd)     fd: feed only (tokens of i = 1)
    stage 1   --     g0i0   g1i0   g0i1   g1i1   --
                 \\ppermute(s -> s+1 mod S)/

(N + 1) * S ticks hold N * S units per stage: the bubble is 1 / (N + 1) of the program, against
(S - 1) / S of a one-micro-batch ``gpipe`` step. Decode is weight-bound, so a tick of T / S rows
costs about what a tick of T rows would: S groups in flight is what buys the throughput. The
ticks are unrolled (a loop's body copies the layers' weight slices on GPU, see ``gpipe``).

Every stage runs ``stage_fn`` and ``feed_fn`` on every tick (SPMD); what a stage must not do
is masked: bubble units get ``valid=False`` (write nothing), and only stage 0's feeds count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sharding.mesh import STAGE_AXIS
from sharding.pipeline import num_stages

# stage_fn(params, state, x [Tg, H], group g: int32[], step i: int32[], valid: bool[])
#   -> (y [Tg, H], state)
CycleStageFn = Callable[[Any, Any, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]
# feed_fn(head, feed_state, y [Tg, H] the last stage's output of (g, i), g, i, fed: bool[])
#   -> (x [Tg, H] the input of (g, i + 1), out int32[Tg] what step i of group g produced,
#   feed_state); ``fed``: this call counts (stage 0, a real unit): update the state only then
FeedFn = Callable[[Any, Any, jax.Array, jax.Array, jax.Array, jax.Array],
                  tuple[jax.Array, jax.Array, Any]]


def gpipe_cycle(stage_fn: CycleStageFn, feed_fn: FeedFn, mesh: Mesh, stage_params: Any,
                stage_state: Any, head: Any, feed_state: Any, x0: jax.Array, steps: int,
                state_axis: int = 0) -> tuple[jax.Array, Any]:
    """Run ``steps`` steps of S row groups through S stages (module docstring).

    stage_params: pytree, every leaf [L, ...] sharded over ``stage`` on axis 0;
    stage_state: pytree, every leaf sharded over ``stage`` on ``state_axis`` (size S there);
    head: pytree replicated over ``stage`` (``feed_fn``'s weights and inputs);
    feed_state: pytree replicated over ``stage``, scratch the feeds carry from tick to tick
    (a sampler's penalty counts); stage 0's copy is the one that counts, and none is returned;
    x0: [G = S, Tg, H] each group's input to its first step (replicated over ``stage``)
    -> (outs int32[steps, G, Tg] replicated, stage_state updated). Call it inside ``jax.jit``.
    """
    s_count, g_count = num_stages(mesh), x0.shape[0]
    if g_count != s_count:
        raise ValueError(f"gpipe_cycle needs one row group per stage: {g_count} groups, {s_count} stages")
    params_spec = jax.tree.map(lambda _: P(STAGE_AXIS), stage_params)
    state_spec = jax.tree.map(lambda _: P(*(None,) * state_axis, STAGE_AXIS), stage_state)
    head_spec = jax.tree.map(lambda _: P(), head)
    feed_spec = jax.tree.map(lambda _: P(), feed_state)
    cyclic = [(i, (i + 1) % s_count) for i in range(s_count)]
    units = steps * g_count

    def body(params: Any, state: Any, head: Any, fstate: Any, x0: jax.Array) -> tuple[jax.Array, Any]:
        stage = jax.lax.axis_index(STAGE_AXIS)
        first = stage == 0
        carry = jnp.zeros_like(x0[0])
        outs = jnp.zeros((steps, g_count, x0.shape[1]), jnp.int32)
        for t in range((steps + 1) * g_count):
            k = t - stage
            # Stage 0 first turns the unit the last stage finished a tick ago, k - G (its own
            # group, the step before), into this unit's input and that step's tokens.
            done = jnp.clip(k - g_count, 0, units - 1)
            fed = first & (k - g_count >= 0) & (k - g_count < units)
            x_next, out, fstate = feed_fn(head, fstate, carry, done % g_count, done // g_count, fed)
            at = (done // g_count, done % g_count)
            outs = outs.at[at].set(jnp.where(fed, out, outs[at]))
            kc = jnp.clip(k, 0, units - 1)
            g, i = kc % g_count, kc // g_count
            x = jnp.where(first, jnp.where(i == 0, x0[g], x_next), carry)
            y, state = stage_fn(params, state, x, g, i, (k >= 0) & (k < units))
            carry = jax.lax.ppermute(y, STAGE_AXIS, cyclic)
        return jax.lax.psum(outs, STAGE_AXIS), state   # stage 0's outs; the others' are zeros

    run = jax.shard_map(body, mesh=mesh, in_specs=(params_spec, state_spec, head_spec, feed_spec, P()),
                        out_specs=(P(), state_spec), axis_names={STAGE_AXIS}, check_vma=False)
    return run(stage_params, stage_state, head, feed_state, x0)
