"""The one matmul seam of the model: ``linear(x, w)`` for dense and 8-bit quantized weights.

Where it sits: inside the jitted step, the decoder calls ``linear`` for every projection (fused
QKV, o, fused gate/up, down) instead of a raw ``@``. A dense weight is a plain stacked array and
runs through XLA exactly as before; a quantized one is a ``QuantizedWeight`` (a pytree leaf
pair, so the step still takes few arrays) and runs through ``pallas_kernels.quant_matmul``::

    dense      w [L, K, *out]           (params.py layout)        y = x @ w[i]
    quantized  q [L, *out, K] 8-bit     output-major, K last      y = quant_matmul(x, q[i], scale[i])
               (or L arrays [1, *out, K]: ``unstack_layers``, the engine's w8a8 projections)
               scale [L, *out]          float32 per output channel
               scale [L, *out, K / g]   (``group`` g) per output channel and K-group of g
                                        (block-scaled fp8 checkpoints; XLA path)
               input_scale [L] | None   static activation scale (w8a8 checkpoints)

``act_quant`` (static): the activations are quantized to fp8 too (w8a8), per token unless the
checkpoint gave a static ``input_scale``. Output-major quantized weights keep K contiguous (what
8-bit tensor-core operands read); the stacked, fused structure of params.py is kept, only the
contraction axis moves last.

Tensor parallelism: a Pallas call is opaque to XLA's partitioner (left to it, the weight would be
gathered whole onto every device), so under a mesh with a tensor axis > 1 the kernel runs per
shard under ``shard_map``, with the specs the weight was laid out with (``spec``, the q stack's
mesh axes, recorded at load)::

    column-parallel (wqkv, wgu: an output axis sharded)   x [T, K] replicated
        device j: y_j [T, *out/tp] = quant_matmul(x, q_j, scale_j)            out sharded as q
    row-parallel (wo, wd: K sharded)                       x [T, K/tp] (its own columns)
        device j: partial_j = quant_matmul(x_j, q_j, scale) in float32; y = psum_j -> x's dtype
        w8a8 with dynamic scales: the per-token absmax is pmax'ed over the shards first, so
        every shard quantizes with tp=1's scale (the result equals the unsharded kernel's)

Block-scaled weights (``group``) and weights without a recorded ``spec`` run the reference,
which the partitioner shards like the dense matmul.

``linear_residual_norm`` is the seam of the o and down projections, whose outputs join the
residual stream and then feed the next RMSNorm: ``h = residual + linear(x)``, ``normed =
rms_norm(h)``. For a w8a16 weight on one device it calls
``pallas_kernels.quant_matmul_residual_norm`` (on a Hopper GPU one kernel does the matmul's
epilogue, the add and the norm); everything else (tensor parallel: a psum of partials; pipeline
stages: layers inside ``shard_map``) is that composition, the ops the decoder ran before the
seam existed.

``linear_silu_gate`` is the MLP's fused gate/up seam: ``silu(gate) * up`` of ``linear(x, wgu)``.
For a w8a16 weight on one device it calls ``pallas_kernels.quant_matmul_silu_gate`` (on a
Hopper GPU, under its switch, one kernel does the matmul and the gate); everything else is that
composition.

``linear_rope_write`` is the fused QKV projection's seam on a decode step (paged attention), on
one device. An int8 / fp8 pool takes the finished projection plus its bias into one Triton kernel
that applies RoPE and writes K / V with the pages' scales (``pallas_kernels.write_rope_quantized``,
under its switch); an unquantized pool: where ``pallas_kernels.quant_rope_write_fuses`` (a w8a16
weight) one kernel after the decode matmul sums its partials, adds the bias, applies RoPE and
writes K / V into the pool; where ``pallas_kernels.rope_write_fuses`` (a dense weight) the same
kernel follows XLA's GEMM; elsewhere it returns None and the decoder runs ``linear``, RoPE and
``write_kv`` itself.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

import pallas_kernels
from pallas_kernels.quant_matmul import reference as qref
from sharding import TENSOR_AXIS, nested_mesh


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A stacked 8-bit weight (see the module docstring for the shapes); ``q`` may instead be
    one array per layer (``unstack_layers``)."""

    q: jax.Array | tuple[jax.Array, ...]
    scale: jax.Array
    input_scale: jax.Array | None = None
    act_quant: bool = dataclasses.field(default=False, metadata=dict(static=True))
    group: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    # The mesh axis (or None) of each dim of ``q`` as laid out at load ([L, *out, K]); the
    # tensor-parallel path runs the kernel per shard with it. None: not recorded.
    spec: tuple[str | None, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))
    # "tpu" / "gpu": run that backend's Pallas kernel interpreted (CPU tests of the kernel in
    # the model, tensor parallel included); None: the kernel of the backend the step runs on.
    interpret: str | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Output dims of one layer (``q`` without the layer and K axes)."""
        return tuple(self._first.shape[1:-1])

    @property
    def k(self) -> int:
        """The contraction size (``q``'s last axis)."""
        return self._first.shape[-1]

    @property
    def _first(self) -> jax.Array:
        return self.q[0] if isinstance(self.q, tuple) else self.q

    def layer_q(self, i: int) -> jax.Array:
        """Layer ``i`` (static) of ``q``: [*out, K] (per-layer arrays: the array itself, no slice)."""
        return self.q[i][0] if isinstance(self.q, tuple) else self.q[i]

    def one_layer(self, i: int) -> QuantizedWeight:
        """Layer ``i`` (static) stacked with one layer (``q`` [1, *out, K], ``scale`` [1, ...])."""
        if not isinstance(self.q, tuple):
            return jax.tree.map(lambda a: a[i:i + 1], self)
        rest = jax.tree.map(lambda a: a[i:i + 1], dataclasses.replace(self, q=()))
        return dataclasses.replace(rest, q=(self.q[i],))


def unstack_layers(w: QuantizedWeight) -> QuantizedWeight:
    """``w`` with ``q`` [L, *out, K] split into L arrays [1, *out, K], each laid out like the
    stack (the stack is freed once nothing else holds it): a layer's weight is then an argument of the step,
    not a slice of one. Why: on a GPU XLA hands a slice of an argument to a library call in
    place only for legacy cuBLAS GEMMs and registered custom calls (its dynamic-slice fusion);
    cuBLASLt's fp8 GEMM, where w8a8 matmuls of 128 tokens and more go
    (``pallas_kernels.quant_matmul.api``), got each layer's weight through a copy (H200, session
    34, Qwen2.5-0.5B's 256-token step: 96 copies, 347 MiB per step). For a stack laid out over
    pipeline stages (its layer axis sharded) nothing changes: a stage's layers stay one array."""
    if isinstance(w.q, tuple) or _layers_sharded(w.q.sharding):
        return w
    sharding, n = w.q.sharding, w.q.shape[0]
    split = jax.jit(lambda q: tuple(q[i:i + 1] for i in range(n)), out_shardings=(sharding,) * n)
    return dataclasses.replace(w, q=split(w.q))


def unstack_fp8_dot_weights(params: dict) -> dict:
    """Every w8a8 projection of ``params`` (``act_quant``: XLA's fp8 dot from 128 tokens) split
    into per-layer arrays (``unstack_layers``), in place and one at a time (each stack released
    before the next is split); -> ``params``."""
    for name, w in params.items():
        if isinstance(w, QuantizedWeight) and w.act_quant:
            params[name] = unstack_layers(w)
            del w
    return params


def _layers_sharded(sharding: jax.sharding.Sharding) -> bool:
    """Whether a stack's layer axis is split over devices (pipeline stages)."""
    if not isinstance(sharding, jax.sharding.NamedSharding) or not sharding.spec or sharding.spec[0] is None:
        return False
    axes = sharding.spec[0] if isinstance(sharding.spec[0], tuple) else (sharding.spec[0],)
    return any(sharding.mesh.shape[a] > 1 for a in axes)


Weight = jax.Array | QuantizedWeight


def _tensor_parallel(mesh: Mesh | None) -> bool:
    return mesh is not None and mesh.shape.get(TENSOR_AXIS, 1) > 1


def mesh_axes_of(sharding: jax.sharding.Sharding, ndim: int) -> tuple[str | None, ...] | None:
    """A ``NamedSharding``'s mesh axis per dim (``QuantizedWeight.spec``); None for any other
    sharding or a dim over several mesh axes."""
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return None
    axes = tuple(spec) + (None,) * (ndim - len(spec))
    if not all(a is None or isinstance(a, str) for a in axes):
        return None
    return axes


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x: [T, H] -> [T, H]; statistics in float32 like HF, scaled in x's dtype. A bf16 / f16 x
    enters them as rounded (``reduce_precision``): where x is a sum computed in the same fusion
    (the residual add), XLA's excess precision would otherwise hand the norm the unrounded float32
    sum, and the result would depend on where the step's functions begin and end."""
    xf = x.astype(jnp.float32)
    if jnp.finfo(x.dtype).bits < 32:
        fi = jnp.finfo(x.dtype)
        xf = jax.lax.reduce_precision(xf, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    return weight * (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def linear_residual_norm(x: jax.Array, w: Weight, i: int, residual: jax.Array, gamma: jax.Array | None,
                         eps: float, mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array | None]:
    """x: [T, K] @ layer ``i`` of ``w`` (one output axis of N) added to ``residual`` [T, N] -> (h,
    ``rms_norm(h, gamma, eps)``, or None without ``gamma``), in residual's dtype (module
    docstring)."""
    if (gamma is not None and isinstance(w, QuantizedWeight) and w.group is None and not w.act_quant
            and len(w.out_shape) == 1 and (mesh is None or mesh.devices.size == 1)
            and x.dtype == residual.dtype):
        q = w.layer_q(i).reshape(w.out_shape[0], w.k)
        h, normed = pallas_kernels.quant_matmul_residual_norm(x, q, w.scale[i].reshape(-1), residual,
                                                              gamma, eps, **_kernel_choice(w))
        return _typed_like(h, residual), _typed_like(normed, residual)
    h = residual + linear(x, w, i, mesh)
    return h, None if gamma is None else rms_norm(h, gamma, eps)


def linear_silu_gate(x: jax.Array, w: Weight, i: int, mesh: Mesh | None = None) -> jax.Array:
    """x: [T, K] @ layer ``i`` of the fused gate/up weight (out [2, I]) -> SiLU(gate) * up [T, I]
    in x's dtype (module docstring)."""
    if (isinstance(w, QuantizedWeight) and w.group is None and not w.act_quant
            and len(w.out_shape) == 2 and w.out_shape[0] == 2 and (mesh is None or mesh.devices.size == 1)):
        q = w.layer_q(i).reshape(math.prod(w.out_shape), w.k)
        h = pallas_kernels.quant_matmul_silu_gate(x, q, w.scale[i].reshape(-1), **_kernel_choice(w))
        return _typed_like(h, x)
    gu = linear(x, w, i, mesh)                                       # [T, 2, I]
    return jax.nn.silu(gu[:, 0]) * gu[:, 1]


def linear_rope_write(x: jax.Array, w: Weight, i: int, bias: jax.Array | None, cos: jax.Array,
                      sin: jax.Array, slot_mapping: jax.Array, pool: tuple[jax.Array, ...], groups: int,
                      mesh: Mesh | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]] | None:
    """x: [T, K] @ layer ``i`` of the fused QKV weight (out [Nkv, G + 2, d]), + ``bias`` [Nkv, G +
    2, d], RoPE by cos / sin float32 [T, d], K / V written into ``pool`` (k_pages, v_pages) at
    ``slot_mapping`` -> (q [T, Nkv * G, d], pool), the epilogue in one kernel after the matmul;
    None where that kernel does not run (module docstring). A quantized pool (k_pages, v_pages,
    k_scales, v_scales) takes the finished projection plus its bias into
    ``pallas_kernels.write_rope_quantized``'s one kernel where ``rope_write_quant_fuses``."""
    b = None if bias is None else bias.reshape(-1)
    t, head_dim = x.shape[0], pool[0].shape[-1]
    if len(pool) == 4 and (mesh is None or mesh.devices.size == 1):
        if not pallas_kernels.rope_write_quant_fuses(t, head_dim):
            return None
        q, *written = pallas_kernels.write_rope_quantized(linear(x, w, i, mesh).reshape(t, -1), b, cos, sin,
                                                          slot_mapping, *pool, groups=groups)
        return q, tuple(_typed_like(a, p) for a, p in zip(written, pool, strict=True))
    if not (len(pool) == 2 and (mesh is None or mesh.devices.size == 1) and x.dtype == pool[0].dtype):
        return None
    if not isinstance(w, QuantizedWeight):   # XLA's GEMM, then the kernel
        if w.ndim != 5 or not pallas_kernels.rope_write_fuses(t, 1, groups, head_dim, b is not None, False):
            return None
        q, k_pages, v_pages = pallas_kernels.write_rope(linear(x, w, i, mesh).reshape(t, -1), b, cos, sin,
                                                        slot_mapping, *pool, groups=groups)
    else:
        if w.group is not None or w.act_quant or len(w.out_shape) != 3:
            return None
        q8 = w.layer_q(i).reshape(math.prod(w.out_shape), w.k)
        kernel = _kernel_choice(w)
        if not pallas_kernels.quant_rope_write_fuses(x, q8, groups, head_dim, b is not None, **kernel):
            return None
        q, k_pages, v_pages = pallas_kernels.quant_matmul_rope_write(
            x, q8, w.scale[i].reshape(-1), b, cos, sin, slot_mapping, *pool, groups=groups, **kernel)
    return q, (_typed_like(k_pages, pool[0]), _typed_like(v_pages, pool[1]))


def _typed_like(a: jax.Array, stream: jax.Array) -> jax.Array:
    """``a`` with the stream's sharding in its type (a Pallas call's outputs carry no mesh): every
    layer's nested jit then sees one input type, whether the layer before it ran the kernel or
    XLA (else the layers after the first are traced, and their kernels lowered, twice)."""
    sharding = jax.typeof(stream).sharding
    if not getattr(getattr(sharding, "mesh", None), "axis_names", ()):
        return a
    return jax.lax.with_sharding_constraint(a, sharding)


def linear(x: jax.Array, w: Weight, i: int, mesh: Mesh | None = None,
           out_dtype: jnp.dtype | None = None) -> jax.Array:
    """x: [T, K] @ layer ``i`` (static) of the stacked weight ``w`` -> [T, *out] in ``out_dtype``
    (None: x's dtype; the product accumulates in float32 either way)."""
    if not isinstance(w, QuantizedWeight):
        return jnp.tensordot(x, w[i], axes=1, preferred_element_type=out_dtype)
    out = w.out_shape
    n = math.prod(out)
    q = w.layer_q(i).reshape(n, w.k)
    if w.group is not None:
        scale = w.scale[i].reshape(n, -1)
        y = qref.group_matmul(x, q, scale, w.group, out_dtype=out_dtype)
    else:
        scale = w.scale[i].reshape(n)
        input_scale = None if w.input_scale is None else w.input_scale[i]
        if _tensor_parallel(mesh) and w.spec is not None:
            return _per_shard(x, w, i, mesh, out_dtype)
        if _tensor_parallel(mesh):
            y = (qref.w8a8_matmul(x, q, scale, input_scale, out_dtype=out_dtype) if w.act_quant
                 else qref.w8a16_matmul(x, q, scale, out_dtype=out_dtype))
        else:
            y = pallas_kernels.quant_matmul(x, q, scale, input_scale, act_quant=w.act_quant,
                                            out_dtype=out_dtype, **_kernel_choice(w))
    return y.astype(out_dtype or x.dtype).reshape(x.shape[0], *out)


def _kernel_choice(w: QuantizedWeight) -> dict:
    return {} if w.interpret is None else dict(interpret=True, backend=w.interpret)


def _per_shard(x: jax.Array, w: QuantizedWeight, i: int, mesh: Mesh,
               out_dtype: jnp.dtype | None = None) -> jax.Array:
    """The quantized matmul of layer ``i`` run per device on its shard (module docstring):
    x [T, K] -> [T, *out] in ``out_dtype`` (None: x's)."""
    q_axes = w.spec[1:]                      # [*out, K]
    out_axes, k_axis = q_axes[:-1], q_axes[-1]
    input_scale = None if w.input_scale is None else w.input_scale[i]

    def body(x: jax.Array, q: jax.Array, scale: jax.Array, *static: jax.Array) -> jax.Array:
        n = math.prod(q.shape[:-1])
        input_scale = static[0] if static else None
        if k_axis is not None and w.act_quant and input_scale is None:   # tp=1's per-token scales
            input_scale = qref.token_scales(jax.lax.pmax(jnp.max(jnp.abs(x), axis=-1), k_axis))
        y = pallas_kernels.quant_matmul(
            x, q.reshape(n, q.shape[-1]), scale.reshape(n), input_scale, act_quant=w.act_quant,
            out_dtype=jnp.float32 if k_axis is not None else out_dtype, **_kernel_choice(w))
        y = y.reshape(x.shape[0], *q.shape[:-1])
        return y if k_axis is None else jax.lax.psum(y, k_axis).astype(out_dtype or x.dtype)

    args = (x, w.layer_q(i), w.scale[i], *(() if input_scale is None else (input_scale,)))
    specs = (PartitionSpec(None, k_axis), PartitionSpec(*q_axes), PartitionSpec(*out_axes),
             *(() if input_scale is None else (PartitionSpec(),)))
    return jax.shard_map(body, mesh=nested_mesh(mesh), in_specs=specs,
                         out_specs=PartitionSpec(None, *out_axes), check_vma=False)(*args)

