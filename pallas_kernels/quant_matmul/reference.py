"""Pure-jnp quantized matmuls: the semantics every kernel in this package is tested against.

Where it sits: the model's ``linear()`` seam (jserve/model/linear.py) calls
``pallas_kernels.quant_matmul`` for every projection whose weight is quantized; on CPU that is
this file, on GPU/TPU the kernels beside it, which must agree with it (tests/kernels).

Weights are stored output-major, like a torch ``Linear``: ``w [N, K]`` (int8 or float8_e4m3fn)
with a float32 scale per output channel ``w_scale [N]``, so ``W_real[n, k] = w[n, k] * w_scale[n]``
and ``y = x @ W_real.T``. Output-major keeps the contraction dim contiguous, which is what the
8-bit tensor-core instructions read (K-major operands) and what HF checkpoints store.

Two modes::

    w8a16   y[m, n] = sum_k x[m, k] * w[n, k]            * w_scale[n]         (x in bf16/f32)
    w8a8    y[m, n] = sum_k xq[m, k] * w[n, k]  * x_scale[m] * w_scale[n]     (fp8 x fp8)
            xq = fp8(x / x_scale), x_scale[m] = max_k |x[m, k]| / 448 (dynamic, per token)
                 or one static ``input_scale`` for every token (pre-quantized checkpoints)

Products of 8-bit values are exact in float32 and sums accumulate in float32; the only rounding
the kernels may do differently is the summation order.

Block-scaled fp8 (``weight_block_size`` [bn, bk] checkpoints, e.g. Qwen3-FP8) keeps one scale per
``[bn, bk]`` block of ``w``; the model holds it per row and K-group (``expand_block_scales``, exact)
so that fusing projections along the output axis keeps working, and ``group_matmul`` runs it
through XLA (dequantize fused into the dot) on every backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
WEIGHT_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(FP8))
_TINY = 1e-12   # scale floor: all-zero rows (e.g. padded query heads) get a finite scale


def qmax(dtype: jnp.dtype) -> float:
    """Largest magnitude a quantized value takes: 127 for int8, 448 for float8_e4m3fn."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8:
        return INT8_MAX
    if dtype == FP8:
        return FP8_MAX
    raise ValueError(f"quantized dtype must be int8 or float8_e4m3fn, got {dtype}")


def cast_to(y: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """float32 ``y`` already divided by its scale -> ``dtype`` (round + clip for int8, clip for fp8)."""
    m = qmax(dtype)
    if jnp.dtype(dtype) == jnp.int8:
        y = jnp.round(y)
    return jnp.clip(y, -m, m).astype(dtype)


def quantize_weight(w: jax.Array, dtype: jnp.dtype, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-output-channel quantization of ``w``: the absmax is taken over ``axis`` (the
    input dim, K), every other dim is an output channel.

    -> ``(q, scale)``: ``q`` of ``w``'s shape in ``dtype``, ``scale`` float32 of ``w``'s shape
    without ``axis``; ``w ~= q * expand_dims(scale, axis)``."""
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=axis, keepdims=True)
    scale = jnp.maximum(amax, _TINY) / qmax(dtype)
    return cast_to(wf / scale, dtype), jnp.squeeze(scale, axis)


def token_scales(amax: jax.Array) -> jax.Array:
    """Per-token absmax ``[M]`` -> the dynamic fp8 activation scales ``[M]`` (``amax / 448``,
    floored). A tensor-parallel shard holding part of K passes the absmax reduced over shards."""
    return jnp.maximum(amax.astype(jnp.float32), _TINY) / FP8_MAX


def quantize_activations(x: jax.Array, input_scale: jax.Array | None = None
                         ) -> tuple[jax.Array, jax.Array]:
    """x: [M, K] -> (fp8 [M, K], float32 x_scale [M]). Dynamic per-token scales
    (``token_scales(max_k |x|)``) unless ``input_scale`` is given: a float32 scalar (a
    checkpoint's static scale) or per-token scales ``[M]``."""
    xf = x.astype(jnp.float32)
    if input_scale is None:
        scale = token_scales(jnp.max(jnp.abs(xf), axis=-1))
    else:
        s = jnp.asarray(input_scale, jnp.float32)
        if s.size != 1 and s.shape != x.shape[:-1]:
            raise ValueError(f"input_scale must be a scalar or float32[M={x.shape[0]}], got shape {s.shape}")
        scale = jnp.broadcast_to(s.reshape(()) if s.size == 1 else s, x.shape[:-1])
    return cast_to(xf / scale[:, None], FP8), scale


def validate_inputs(x: jax.Array, w: jax.Array, w_scale: jax.Array) -> None:
    """Static checks shared by the reference and the kernels; ValueError naming the operand."""
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got shape {x.shape}")
    if w.ndim != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"w must be [N, K={x.shape[1]}] (output-major), got shape {w.shape}")
    if jnp.dtype(w.dtype) not in WEIGHT_DTYPES:
        raise ValueError(f"w must be int8 or float8_e4m3fn, got {w.dtype}")
    if w_scale.shape != (w.shape[0],):
        raise ValueError(f"w_scale must be float32[N={w.shape[0]}], got shape {w_scale.shape}")


def w8a16_matmul(x: jax.Array, w: jax.Array, w_scale: jax.Array,
                 out_dtype: jnp.dtype | None = None) -> jax.Array:
    """x: [M, K] (bf16/f16/f32), w: [N, K] int8|fp8, w_scale: f32[N] -> [M, N] in ``out_dtype``
    (default x's): weight-only quantization, the weight upcast to x's dtype (exact for int8 and
    e4m3 into bf16), float32 accumulation, then the per-channel scale."""
    validate_inputs(x, w, w_scale)
    acc = jax.lax.dot_general(x, w.astype(x.dtype), (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)
    return (acc * w_scale[None, :]).astype(out_dtype or x.dtype)


def w8a8_matmul(x: jax.Array, w: jax.Array, w_scale: jax.Array, input_scale: jax.Array | None = None,
                out_dtype: jnp.dtype | None = None, native: bool = False) -> jax.Array:
    """x: [M, K], w: [N, K] fp8, w_scale: f32[N] -> [M, N]: x quantized to fp8 per token (or with
    the static ``input_scale``), fp8 x fp8 products accumulated in float32, both scales applied.
    ``native``: the fp8 operands go to XLA's dot as they are (on Hopper cuBLASLt's fp8 GEMM, both
    operands K-major as stored); else both are upcast to float32 first (the same products, exact
    on every backend). A native dot whose result is bf16 anyway writes its float32 sums as bf16
    (half the output bytes; the scales then round once more, within one bf16 ulp): H200, session
    34, the 8B's gate/up and down at 256 and 2048 tokens, every kernel of the call 5-8% faster
    (59.7 against 65.0 us, 392.3 against 413.4 at 2048; ``benchmarks/w8a8_gemm.py``)."""
    validate_inputs(x, w, w_scale)
    if jnp.dtype(w.dtype) != FP8:
        raise ValueError(f"w8a8 needs float8_e4m3fn weights, got {w.dtype}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    xq, x_scale = quantize_activations(x, input_scale)
    a, b = (xq, w) if native else (xq.astype(jnp.float32), w.astype(jnp.float32))
    sums = jnp.bfloat16 if native and out_dtype == jnp.dtype(jnp.bfloat16) else jnp.float32
    acc = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=sums)
    return (acc.astype(jnp.float32) * x_scale[:, None] * w_scale[None, :]).astype(out_dtype)


def residual_rms_norm(y: jax.Array, residual: jax.Array, gamma: jax.Array, eps: float
                      ) -> tuple[jax.Array, jax.Array]:
    """A projection's output y [T, N] added to the residual stream [T, N], then the next RMSNorm
    (HF's: float32 statistics, scaled in the stream's dtype) -> (h, gamma * h / rms(h)), both in
    residual's dtype (``residual_norm``'s kernel fuses this with the matmul's epilogue)."""
    h = residual + y.astype(residual.dtype)
    hf = h.astype(jnp.float32)
    if jnp.finfo(h.dtype).bits < 32:   # h as rounded, even where XLA fuses the add into the norm
        fi = jnp.finfo(h.dtype)
        hf = jax.lax.reduce_precision(hf, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)
    var = jnp.mean(hf * hf, axis=-1, keepdims=True)
    return h, gamma * (hf * jax.lax.rsqrt(var + eps)).astype(h.dtype)


def silu_gate(y: jax.Array) -> jax.Array:
    """The MLP's gate: y [T, 2I] (a fused gate/up projection: gate columns, then up) -> SiLU(gate)
    * up [T, I] in y's dtype (``gated``'s kernel fuses this with the matmul's epilogue)."""
    i = y.shape[-1] // 2
    return jax.nn.silu(y[:, :i]) * y[:, i:]


def group_dequant(w: jax.Array, scale: jax.Array, group: int,
                  dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """w: [N, K] 8-bit with one scale per output channel and K-group of ``group`` columns,
    ``scale [N, ceil(K / group)]`` -> [N, K] ``dtype``. A checkpoint's [bn, bk] block scales
    become this form by repeating each block row bn times (``expand_block_scales``)."""
    n, k = w.shape
    want = (n, -(-k // group))
    if scale.shape != want:
        raise ValueError(f"group scales must be [{want[0]}, {want[1]}] for w {w.shape} and "
                         f"group {group}, got {scale.shape}")
    s = jnp.repeat(scale.astype(jnp.float32), group, axis=1)[:, :k]
    return (w.astype(jnp.float32) * s).astype(dtype)


def expand_block_scales(scale_inv: jax.Array, n: int, block_n: int) -> jax.Array:
    """HF ``weight_scale_inv [ceil(N / bn), ceil(K / bk)]`` -> per-row group scales
    ``[N, ceil(K / bk)]`` (exact: each row takes its block row's values)."""
    return jnp.repeat(scale_inv.astype(jnp.float32), block_n, axis=0)[:n]


def group_matmul(x: jax.Array, w: jax.Array, scale: jax.Array, group: int,
                 out_dtype: jnp.dtype | None = None) -> jax.Array:
    """x: [M, K], group-scaled 8-bit w: [N, K] -> [M, N] (weight dequantized to x's dtype, fused
    into the dot by XLA)."""
    wd = group_dequant(w, scale, group, x.dtype)
    acc = jax.lax.dot_general(x, wd, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return acc.astype(out_dtype or x.dtype)
