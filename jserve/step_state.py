"""StepState: the device buffers every step reads and rewrites in place, at fixed addresses.

Where it sits: owned by the ``Runner``, passed (donated) to every compiled step and returned by
it. On a GPU the step runs as one CUDA graph (XLA command buffer); before each launch XLA
re-points every graph node whose buffers moved since the previous call, and that update cost
~1 ms of host time per call for the 334-node Qwen2.5-0.5B decode step (RESULTS.md, v2 session 5):
more than the device time of the step. Buffers move when they are fresh each call: the uploaded
step buffers, the fed-back tokens, the outputs. So the step keeps them here instead::

    host ibuf/fbuf (fresh) --one copy kernel--> stage_i / stage_f (donated, fixed address)
                                                 every other node reads the stage
    sampled tokens --> last_tokens (donated, fixed address: the next step's fed-back tokens)
                  \\-> one small fresh output, the host's copy

Only the two copy kernels and the host copy's writer touch a moved buffer, so the per-call
update is a few nodes. The stages are one element longer than the largest bucket's buffer: a
copy that covers a whole array is folded away by XLA (consumers would read the fresh upload
again), and the optimization barrier keeps XLA from looking through the copy.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Sharding


class StepState(NamedTuple):
    """Device state of the step loop (a pytree; donated to and returned by each step)."""

    stage_i: jax.Array      # int32[max ibuf + 1]: this step's int buffer, staged
    stage_f: jax.Array      # float32[max fbuf + 1]: this step's float buffer, staged
    last_tokens: jax.Array  # int32[S]: the tokens the last step sampled, by row


def new_state(int_size: int, float_size: int, num_out: int, sharding: Sharding) -> StepState:
    """Zeroed state for step buffers of at most ``int_size`` / ``float_size`` elements and
    ``num_out`` sampled rows."""
    host = StepState(np.zeros(int_size + 1, np.int32), np.zeros(float_size + 1, np.float32),
                     np.zeros(num_out, np.int32))
    return StepState(*jax.device_put(tuple(host), sharding))


def stage(state: StepState, ibuf: jax.Array, fbuf: jax.Array
          ) -> tuple[StepState, jax.Array, jax.Array]:
    """Inside jit: copy the step's fresh buffers (int32[n], float32[m]) into the state's stages
    -> (state, int32[n] and float32[m] views of the stages for the rest of the step)."""
    si = jax.lax.dynamic_update_slice(state.stage_i, ibuf, (0,))
    sf = jax.lax.dynamic_update_slice(state.stage_f, fbuf, (0,))
    si, sf = jax.lax.optimization_barrier((si, sf))
    return state._replace(stage_i=si, stage_f=sf), si[:ibuf.shape[0]], sf[:fbuf.shape[0]]
