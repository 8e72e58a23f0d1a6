"""Quantized matmul for Hopper GPUs in Pallas Mosaic GPU: 8-bit weights streamed by TMA, wgmma.

Where it sits: ``pallas_kernels.quant_matmul`` (``api.py``) dispatches here on an H100/H200 when
``supports(...)`` holds. Semantics are ``reference.py``'s (``w8a16_matmul`` / ``w8a8_matmul``).
``kernel_config`` picks the kernel: decode steps (Mp <= 64) take the persistent form in
``mgpu_decode.py`` (session 20: resident CTAs, the A tile from registers, long K tiles); larger
steps, and explicit ``MgpuConfig``s, the tiled grid below.

Swap-AB: decode steps have few tokens (M = 1..64) and wgmma's M is 64 rows per warpgroup, so the
weight takes the wgmma M side and the tokens the N side (N may be as small as 8)::

    out^T [N, Mp] = w [N, K] @ x^T [K, Mp]      (Mp = tokens padded to a multiple of 8)

    grid (N / block_n, Mp / block_m, split_k), one warpgroup per CTA
    pipeline over K / block_k / split_k: TMA w[block_n, block_k] and x[block_m, block_k] -> SMEM ring
      w8a16: w tile (int8 / e4m3) -> registers -> x's dtype -> SMEM (A operand), wgmma
             (e4m3 goes through f32 into bf16: Hopper's cvt has no e4m3 -> bf16)
             A [block_n, block_k] x B = x_tile^T (a transposed view: x is K-major)
      w8a8:  fp8 w tile and fp8 x tile straight from SMEM (both K-major, as 8-bit wgmma needs)
    epilogue: float32 accumulator -> SMEM -> TMA -> partial out^T [split_k, N, Mp]

Split-K: a decode matmul has few output tiles (N = 4096 at block_n 64 is 64 CTAs: half of an
H100/H200's 132 SMs pull the weight), so the K range is cut into ``split_k`` parts, each a CTA of
its own, until the grid has about two CTAs per SM; their float32 partials are summed in the XLA
fusion after the kernel (``mgpu_decode.finish``), which also applies the per-channel weight
scale, the per-token activation scale and the transpose back to [M, N] (it touches only
split_k x M x N values; the persistent decode kernel stores [split_k, Mp, N] and needs no
transpose: ``mgpu_decode``'s ``store_mn``). Here the dequantized A tile goes through SMEM (the
form the Mosaic GPU interpreter runs on CPU); the persistent kernel feeds it from registers on
a GPU (-11% at the 8B's gate/up, H200, session 20).

Tile shapes (``default_config``): decode (Mp <= 64): block_n 64 (224 CTAs for N = 14336 on 132
SMs), block_k 128, 4 stages, split_k up to 8 while each part keeps >= 4 pipeline steps; larger
M: 128 x 128 x 64, 3 stages, no split. Measured numbers belong in
benchmarks/KERNEL_NOTES.md (``benchmarks/quant_matmul.py`` prints the table).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.hopper import on_hopper as on_hopper  # (mgpu.on_hopper: the dispatchers, tests)
from pallas_kernels.kv_write import rope_write
from pallas_kernels.quant_matmul import gated, mgpu_decode, reference, residual_norm
from pallas_kernels.quant_matmul.mgpu_decode import DecodeConfig, finish, smem_transforms

FP8 = reference.FP8


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    block_n: int = 64      # weight rows (output channels) per CTA: 64 or 128
    block_m: int = 64      # tokens per CTA (wgmma N): a multiple of 8, at most 256
    block_k: int = 128     # contraction per pipeline step
    stages: int = 4        # TMA ring depth
    split_k: int = 1       # K parts per output tile, each a CTA (partials summed after the kernel)
    overlap: bool = False  # one wgmma in flight: step i + 1's tile loads and dequantizes while
    #                        step i's wgmma runs (double-buffered A tile, delayed slot release)


def padded_tokens(m: int) -> int:
    """Tokens padded for the kernel: a multiple of 8 up to 64, then of 64."""
    return max(8, -(-m // 8) * 8) if m <= 64 else -(-m // 64) * 64


TARGET_CTAS = 256   # ~2 per SM of an H100 / H200 (132 SMs): decode matmuls split K up to this


def default_config(m: int, n: int, k: int) -> MgpuConfig:
    mp = padded_tokens(m)
    if mp <= 64:
        bk = 128 if k % 128 == 0 else 64
        tiles, steps, split = max(1, n // 64), k // bk, 1
        while (tiles * split < TARGET_CTAS and split < 8 and steps % (2 * split) == 0
               and steps // (2 * split) >= 4):
            split *= 2
        return MgpuConfig(block_n=64, block_m=mp, block_k=bk, stages=4, split_k=split)
    block_m = 128 if mp % 128 == 0 else 64
    return MgpuConfig(block_n=128 if n % 128 == 0 else 64, block_m=block_m, block_k=64, stages=3)


DECODE_SMEM_PER_CTA = 100 * 1024   # the persistent kernel's TMA ring: two CTAs per SM fit
DECODE_STORE_MN = True    # the persistent kernel's ``store_mn`` (off: the A/B in benchmarks/step_floor.py)
DECODE_PDL = False        # the persistent kernel's ``pdl`` (on: step_floor --ab quant-pdl)
DECODE_EXIT_READ_ONLY = False   # its ``exit_read_only`` (on: step_floor --ab quant-exit-ro)
GATED_PAIRED_WAIT = False   # ``gated``'s ``paired_wait`` (on: step_floor --ab gated-paired-wait)
DECODE_ASYNC = True    # the persistent kernel's ``async_acc`` (off: step_floor --ab quant-async-off;
#                       H100, 2026-12-05: the 8B's int8 + lm_head batch-1 step -0.7%, twice)
DECODE_BLOCK_K: int | None = None   # its K tile (None: the rule in ``kernel_config``; A/Bs
#                                     step_floor --ab quant-bk128, quant-bk256)
DECODE_TILE_RUNS = True   # its ``tile_runs`` (off: step_floor --ab quant-tile-runs-off; H100,
#                          2026-12-07: [14336, 4096] at 16 tokens 25.8 -> 24.2 us, the 8B's int8 +
#                          lm_head batch-1 step 3.736 -> 3.707 ms)
DECODE_INT8_F16_BITS = True   # its and ``gated``'s ``int8_f16_bits`` (off: step_floor --ab
#                              quant-int8-f16-bits-off; H100, 2026-12-06: the float16 8B's int8 +
#                              lm_head batch-1 step 4.214 -> 3.745 ms, the bf16 model's 3.759)
DECODE_MAX_STAGES = 4     # its deepest ring (8: step_floor --ab quant-stages8)
DECODE_BLOCK_N = 64       # its weight rows per unit (128: step_floor --ab quant-bn128, which halves
#                           the x tile bytes per weight byte at 16 tokens: H200, 2026-12-05, the 8B's
#                           int8 + lm_head batch-1 step 3.485 ms against 3.283, refuted)


def kernel_config(m: int, n: int, k: int) -> MgpuConfig | DecodeConfig:
    """The default kernel for x [M, K] @ w [N, K]^T: the persistent decode kernel
    (``mgpu_decode``) where M pads to <= 64 tokens and it tiles, else the tiled grid. Its K tile
    is 512 columns up to 16 tokens, else 256 (long contiguous runs of each weight row: H200,
    session 20, gate/up M = 1 43.4 us at 512 / 2 stages against 50.6 at 128), shorter where the
    ring steps it keeps ahead of ``DECODE_BLOCK_N`` rows would not fit ``DECODE_SMEM_PER_CTA``
    (two; three with ``async_acc``, the default since session 43: 256 columns at 16 tokens), and
    its ring as deep as that allows (2-4 stages). K is split to keep two CTAs per SM:
    unsplit on one CTA per SM with a ring twice as deep (no partial sum after the kernel), the
    8B's qkv, o and down projections made its batch-1 int8 step 3.94 ms against 3.31 (H200,
    session 32). (Session 38's device clock put the bare TMA ring of 64 x 128 tiles at 4 stages
    10-12 points of the HBM read above the 64 x 512, 2-stage ring this rule picks, which the
    kernel reads at: the step A/B ``DECODE_BLOCK_K`` is owed, benchmarks/owed_gpu_runs.sh qk.)"""
    mp, bn = padded_tokens(m), DECODE_BLOCK_N
    if mp <= 64 and n % bn == 0 and k % 128 == 0:
        bk, stages = _decode_ring(mp, k, bn, ahead=3 if DECODE_ASYNC else 2)
        dec = mgpu_decode.decode_config(n, k, block_n=bn, block_k=bk, stages=stages,
                                        store_mn=DECODE_STORE_MN)
        dec = dataclasses.replace(dec, pdl=DECODE_PDL, exit_read_only=DECODE_EXIT_READ_ONLY,
                                  async_acc=DECODE_ASYNC, int8_f16_bits=DECODE_INT8_F16_BITS,
                                  tile_runs=DECODE_TILE_RUNS)
        if mgpu_decode.supports(mp, n, k, dec):
            return dec
    return default_config(m, n, k)


def _decode_ring(mp: int, k: int, rows: int, ahead: int = 2) -> tuple[int, int]:
    """The persistent kernels' K tile and ring depth for ``rows`` weight rows per step (int8) and
    an x tile of Mp tokens (``kernel_config``'s rule; ``DECODE_BLOCK_K`` overrides the tile): the
    longest tile of which ``ahead`` steps fit (3 for ``async_acc``, whose slots free a step late)."""
    row_bytes = rows + 2 * mp   # SMEM of one ring step per K column: the weight tile(s) and x's
    bk = next((b for b in ((512, 256, 128) if mp <= 16 else (256, 128))
               if k % b == 0 and ahead * row_bytes * b <= DECODE_SMEM_PER_CTA), 128)
    if DECODE_BLOCK_K is not None and k % DECODE_BLOCK_K == 0:
        bk = DECODE_BLOCK_K
    return bk, max(2, min(DECODE_MAX_STAGES, DECODE_SMEM_PER_CTA // (row_bytes * bk)))


def supports(x: jax.Array, w: jax.Array, act_quant: bool,
             config: MgpuConfig | DecodeConfig | None = None) -> bool:
    """Shapes and dtypes the kernel takes (else the dispatcher uses XLA)."""
    m, k = x.shape
    n = w.shape[0]
    cfg = config or kernel_config(m, n, k)
    if act_quant and jnp.dtype(w.dtype) != FP8:
        return False
    if not act_quant and jnp.dtype(x.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    if isinstance(cfg, DecodeConfig):
        return mgpu_decode.supports(padded_tokens(m), n, k, cfg)
    return n % cfg.block_n == 0 and k % (cfg.block_k * cfg.split_k) == 0


def matmul_t(xp: jax.Array, w: jax.Array, *, config: MgpuConfig, interpret: bool = False) -> jax.Array:
    """xp: [Mp, K] (bf16/f16 for w8a16, fp8 for w8a8), w: [N, K] 8-bit -> float32 partials
    out^T [split_k, N, Mp], summing to w @ xp^T (no scales). Mp, N, K multiples of the config's
    blocks (K of block_k x split_k)."""
    mp, k = xp.shape
    n = w.shape[0]
    bn, bm, bk, split = config.block_n, config.block_m, config.block_k, config.split_k
    if n % bn or k % (bk * split) or mp % bm or bm % 8 or bn % 64:
        raise ValueError(f"mgpu quant matmul: N={n}, K={k}, Mp={mp} do not tile by {config}")
    steps = k // bk // split                 # pipeline steps of each CTA
    a_dtype = xp.dtype                       # the wgmma operand dtype (x's, or fp8 for w8a8)
    dequant = jnp.dtype(w.dtype) != jnp.dtype(a_dtype)
    overlap = config.overlap and config.stages > 1 and steps > 1
    a_slots = 2 if overlap else 1            # the dequantized A tile: step i + 1 fills the other

    def kernel(x_gmem, w_gmem, o_gmem):
        ni = lax.axis_index("n")
        mi = lax.axis_index("m")
        k0 = lax.axis_index("s") * steps     # this CTA's first K block

        def with_smem(a_smem, o_smem):
            def with_acc(acc_ref):
                def body(idx, w_smem, x_smem):
                    if dequant:
                        a = a_smem.at[lax.rem(idx[0], a_slots)]
                        a[...] = mgpu_decode.dequant_tile(w_smem[...], a_dtype, fp8=FP8)
                        plgpu.commit_smem()
                    else:
                        a = w_smem
                    plgpu.wgmma(acc_ref, a, x_smem.transpose((1, 0)))
                    plgpu.wgmma_wait(1 if overlap else 0)   # overlap: step i - 1's is done

                release = 1 if overlap else 0   # overlap: a slot is refilled a step later
                plgpu.emit_pipeline(
                    body, grid=(steps,),
                    in_specs=[
                        plgpu.BlockSpec((bn, bk), lambda kk: (ni, k0 + kk),
                                        transforms=smem_transforms(w.dtype, bk), delay_release=release),
                        plgpu.BlockSpec((bm, bk), lambda kk: (mi, k0 + kk),
                                        transforms=smem_transforms(a_dtype, bk), delay_release=release),
                    ],
                    max_concurrent_steps=config.stages,
                )(w_gmem, x_gmem)
                plgpu.wgmma_wait(0)
                o_smem[...] = acc_ref[...]

            pl.run_scoped(with_acc, plgpu.ACC((bn, bm), jnp.float32))
            plgpu.commit_smem()
            row = lax.axis_index("s") * n + ni * bn   # partial s's rows of [split_k * N, Mp]
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(row, bn), pl.ds(mi * bm, bm)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            with_smem,
            plgpu.SMEM((a_slots, bn, bk), a_dtype, transforms=smem_transforms(a_dtype, bk)),
            plgpu.SMEM((bn, bm), jnp.float32, transforms=smem_transforms(jnp.float32, bm)),
        )

    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((split * n, mp), jnp.float32),
        grid=(n // bn, mp // bm, split),
        grid_names=("n", "m", "s"),
        kernel_name=f"quant_tiled_{n}x{k}",   # per shape: a profile names each projection's calls
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    return f(xp, w).reshape(split, n, mp)


@functools.partial(jax.jit, static_argnames=("act_quant", "out_dtype", "config", "interpret"))
def quant_matmul(x: jax.Array, w: jax.Array, w_scale: jax.Array, input_scale: jax.Array | None = None,
                 *, act_quant: bool = False, out_dtype: jnp.dtype | None = None,
                 config: MgpuConfig | DecodeConfig | None = None, interpret: bool = False) -> jax.Array:
    """Same contract as ``reference.w8a16_matmul`` (``act_quant=False``) or
    ``reference.w8a8_matmul`` (``act_quant=True``): x [M, K], w [N, K], w_scale f32[N] -> [M, N].
    Under one jit so that every layer's call site shares one lowering per shape."""
    reference.validate_inputs(x, w, w_scale)
    m, k = x.shape
    n = w.shape[0]
    cfg = config or kernel_config(m, n, k)
    decode = isinstance(cfg, DecodeConfig)
    mp = padded_tokens(m) if decode else -(-padded_tokens(m) // cfg.block_m) * cfg.block_m
    if act_quant:
        xq, x_scale = reference.quantize_activations(x, input_scale)
    else:
        xq, x_scale = x, None
    xp = _pad_rows(xq, mp)
    if decode:
        parts = mgpu_decode.decode_matmul_t(xp, w, config=cfg, fp8=FP8, interpret=interpret)
    else:
        parts = matmul_t(xp, w, config=cfg, interpret=interpret)
    return finish(parts, m, w_scale, x_scale, out_dtype or x.dtype, store_mn=decode and cfg.store_mn)


def _pad_rows(x: jax.Array, mp: int) -> jax.Array:
    """x [M, K] -> [Mp, K], zero rows appended (the kernels' token padding)."""
    return jnp.pad(x, ((0, mp - x.shape[0]), (0, 0))) if mp != x.shape[0] else x


def residual_norm_supports(x: jax.Array, w: jax.Array, residual: jax.Array, gamma: jax.Array) -> bool:
    """Whether ``quant_matmul_residual_norm`` takes x [T, K] @ w [N, K]^T (w8a16) into residual
    [T, N]: the persistent decode kernel with ``store_mn`` partials and a row that fits
    ``residual_norm``."""
    m, k = x.shape
    n = w.shape[0]
    cfg = kernel_config(m, n, k)
    return (isinstance(cfg, DecodeConfig) and cfg.store_mn and supports(x, w, False, cfg)
            and residual.shape == (m, n) and gamma.shape == (n,)
            and residual_norm.supports(cfg.slots(n), n, residual.dtype, gamma.dtype))


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def quant_matmul_residual_norm(x: jax.Array, w: jax.Array, w_scale: jax.Array, residual: jax.Array,
                               gamma: jax.Array, *, eps: float, interpret: bool = False
                               ) -> tuple[jax.Array, jax.Array]:
    """``reference.residual_rms_norm(w8a16_matmul(x, w, w_scale), residual, gamma, eps)``: the
    decode kernel's partials go to ``residual_norm``'s kernel, which sums and scales them, adds
    the residual and norms the row in one kernel (its module docstring) -> (h, normed), both
    [T, N] in residual's dtype. ``residual_norm_supports`` must hold."""
    reference.validate_inputs(x, w, w_scale)
    m, k = x.shape
    cfg = kernel_config(m, w.shape[0], k)
    xp = _pad_rows(x, padded_tokens(m))
    parts = mgpu_decode.decode_matmul_t(xp, w, config=cfg, fp8=FP8, interpret=interpret)
    return residual_norm.residual_rms_norm(parts, residual, w_scale, gamma, eps, pdl=cfg.pdl,
                                           interpret=interpret)


def rope_write_supports(x: jax.Array, w: jax.Array, groups: int, head_dim: int, bias: bool) -> bool:
    """Whether ``quant_matmul_rope_write`` takes x [T, K] @ w [N, K]^T (w8a16), N = Nkv x (G + 2) x
    head_dim: the persistent decode kernel with ``store_mn`` partials and a head group that fits
    ``rope_write``."""
    m, k = x.shape
    n = w.shape[0]
    cfg = kernel_config(m, n, k)
    return (isinstance(cfg, DecodeConfig) and cfg.store_mn and supports(x, w, False, cfg)
            and n % ((groups + 2) * head_dim) == 0
            and rope_write.supports(cfg.slots(n), groups, head_dim, bias))


def quant_matmul_rope_write(x: jax.Array, w: jax.Array, w_scale: jax.Array, bias: jax.Array | None,
                            cos: jax.Array, sin: jax.Array, slot_mapping: jax.Array, k_pages: jax.Array,
                            v_pages: jax.Array, *, groups: int, interpret: bool = False
                            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A decode step's fused QKV projection (w8a16) with RoPE and the K/V write: the decode
    kernel's partials go to ``rope_write``'s kernel, which sums and scales them, adds the bias,
    rotates q and K and writes K / V into the pools -> (q [T, Nkv * G, d], k_pages, v_pages).
    ``rope_write_supports`` must hold."""
    reference.validate_inputs(x, w, w_scale)
    m, k = x.shape
    cfg = kernel_config(m, w.shape[0], k)
    parts = mgpu_decode.decode_matmul_t(_pad_rows(x, padded_tokens(m)), w, config=cfg, fp8=FP8,
                                        interpret=interpret)
    return rope_write.rope_write(parts, w_scale, bias, cos, sin, slot_mapping, k_pages, v_pages,
                                 groups=groups, interpret=interpret)


def silu_gate_config(m: int, n2: int, k: int, sms: int | None = None) -> DecodeConfig | None:
    """``gated``'s config for x [M, K] @ w [2I, K]^T, or None where it does not run: units of 64
    gate and 64 up rows over all of K (no split), as many CTAs as units up to two per SM (more
    units: a balanced share each), the ring of ``kernel_config`` for 128 weight rows per step.
    None past 64 padded tokens, or where the units are fewer than the SMs (a small MLP, e.g.
    Qwen2.5-0.5B's 76 units: there the split-K kernel keeps every SM pulling the weight)."""
    mp, bn = padded_tokens(m), DECODE_BLOCK_N
    sms = sms or mgpu_decode.sm_count()
    if mp > 64 or bn != 64 or n2 % (2 * bn) or k % 128 or n2 // (2 * bn) < sms:
        return None
    units = n2 // (2 * bn)
    bk, stages = _decode_ring(mp, k, 2 * bn)
    per = -(-units // (2 * sms))
    cfg = DecodeConfig(block_n=bn, block_k=bk, stages=stages, per_cta=per, pdl=DECODE_PDL,
                       exit_read_only=DECODE_EXIT_READ_ONLY, paired_wait=GATED_PAIRED_WAIT,
                       int8_f16_bits=DECODE_INT8_F16_BITS)
    return cfg if gated.supports(mp, n2, k, cfg) else None


def silu_gate_supports(x: jax.Array, w: jax.Array) -> bool:
    """Whether ``quant_matmul_silu_gate`` takes x [T, K] @ w [2I, K]^T (w8a16, x bf16 / f16)."""
    return (jnp.dtype(x.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and silu_gate_config(x.shape[0], w.shape[0], x.shape[1]) is not None)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def quant_matmul_silu_gate(x: jax.Array, w: jax.Array, w_scale: jax.Array, *,
                           config: DecodeConfig | None = None, interpret: bool = False) -> jax.Array:
    """``reference.silu_gate(w8a16_matmul(x, w, w_scale))``: x [T, K], w [2I, K] (gate rows, then
    up rows), w_scale float32 [2I] -> [T, I] in x's dtype, in one kernel (``gated``).
    ``silu_gate_supports`` must hold (or ``config`` be given)."""
    reference.validate_inputs(x, w, w_scale)
    m, k = x.shape
    cfg = config or silu_gate_config(m, w.shape[0], k)
    h = gated.silu_gate_matmul(_pad_rows(x, padded_tokens(m)), w, w_scale, config=cfg, fp8=FP8,
                               interpret=interpret)
    return h[:m]
