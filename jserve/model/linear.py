"""The one matmul seam of the model: ``linear(x, w)`` for dense and 8-bit quantized weights.

Where it sits: inside the jitted step, the decoder calls ``linear`` for every projection (fused
QKV, o, fused gate/up, down) instead of a raw ``@``. A dense weight is a plain stacked array and
runs through XLA exactly as before; a quantized one is a ``QuantizedWeight`` (a pytree leaf
pair, so the step still takes few arrays) and runs through ``pallas_kernels.quant_matmul``::

    dense      w [L, K, *out]           (params.py layout)        y = x @ w[i]
    quantized  q [L, *out, K] 8-bit     output-major, K last      y = quant_matmul(x, q[i], scale[i])
               scale [L, *out]          float32 per output channel
               scale [L, *out, K / g]   (``group`` g) per output channel and K-group of g
                                        (block-scaled fp8 checkpoints; XLA path)
               input_scale [L] | None   static activation scale (w8a8 checkpoints)

``act_quant`` (static): the activations are quantized to fp8 too (w8a8), per token unless the
checkpoint gave a static ``input_scale``. Output-major quantized weights keep K contiguous (what
8-bit tensor-core operands read); the stacked, fused structure of params.py is kept, only the
contraction axis moves last.

Tensor parallelism: a Pallas call is opaque to XLA's partitioner, so under a mesh with a tensor
axis > 1 the quantized path runs the reference (XLA, dequantize fused into the dot), which the
partitioner shards like the dense matmul.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

import pallas_kernels
from pallas_kernels.quant_matmul import reference as qref
from sharding import TENSOR_AXIS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A stacked 8-bit weight (see the module docstring for the shapes)."""

    q: jax.Array
    scale: jax.Array
    input_scale: jax.Array | None = None
    act_quant: bool = dataclasses.field(default=False, metadata=dict(static=True))
    group: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Output dims of one layer (``q`` without the layer and K axes)."""
        return tuple(self.q.shape[1:-1])


Weight = jax.Array | QuantizedWeight


def _tensor_parallel(mesh: Mesh | None) -> bool:
    return mesh is not None and mesh.shape.get(TENSOR_AXIS, 1) > 1


def linear(x: jax.Array, w: Weight, i: int, mesh: Mesh | None = None) -> jax.Array:
    """x: [T, K] @ layer ``i`` (static) of the stacked weight ``w`` -> [T, *out] in x's dtype."""
    if not isinstance(w, QuantizedWeight):
        return jnp.tensordot(x, w[i], axes=1)
    out = w.out_shape
    n = math.prod(out)
    q = w.q[i].reshape(n, w.q.shape[-1])
    if w.group is not None:
        scale = w.scale[i].reshape(n, -1)
        y = qref.group_matmul(x, q, scale, w.group)
    else:
        scale = w.scale[i].reshape(n)
        input_scale = None if w.input_scale is None else w.input_scale[i]
        if _tensor_parallel(mesh):
            y = (qref.w8a8_matmul(x, q, scale, input_scale) if w.act_quant
                 else qref.w8a16_matmul(x, q, scale))
        else:
            y = pallas_kernels.quant_matmul(x, q, scale, input_scale, act_quant=w.act_quant)
    return y.reshape(x.shape[0], *out)

