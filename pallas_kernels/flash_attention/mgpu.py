"""Causal flash attention for Hopper GPUs in Pallas Mosaic GPU (FlashAttention-3 structure).

Where it sits: ``pallas_kernels.flash_attention`` (``api.py``) dispatches to it on an H100/H200
when ``supports(...)`` holds, for steps whose batch is long fresh prompts; ``gpu.py`` (the
Triton-lowered kernel) takes the other GPU calls. The dispatcher calls it through one ``jax.jit``
wrapper so that the model's per-layer call sites share one lowering (~1.2 s on the host each
when called bare).
Semantics are ``reference.py``'s: causal attention within packed segments (``cu_seqlens``), GQA,
padding rows past ``cu_seqlens[-1]`` zero.

Design (a tile = one q head x 128 query rows; three warpgroups per CTA)::

    warpgroup 2 (producer, 40 regs): TMA K_j, V_j -> SMEM ring of ``num_stages`` slots
    warpgroup 0 / 1 (consumers, 232 regs): 64 query rows each, S = Q K^T and O += P V on wgmma

- Tiles. wgmma's M is 64 per warpgroup, so two consumer warpgroups give a 128-row q block. K/V
  tiles are ``block_kv`` x d (128 x 128 bf16 = 32 KiB each). SMEM: Q 2 x 64 x d (32 KiB), the
  same again as output staging in persistent mode, plus ``num_stages`` x (K + V) (64 KiB per
  stage at block_kv = 128): 2 stages use 160 KiB (192 KiB persistent) of the 227 KiB a Hopper
  CTA can have, 3 stages 224 KiB (non-persistent only); one CTA per SM either way. Registers: a
  consumer holds O (64 x 128 f32 = 64 regs/thread), S (64), P_{j-1} and P_j (bf16, 32 each) at
  once, hence 232 registers for the consumers and 40 for the producer (``set_max_registers``;
  2 x 232 + 40 = 504 <= 512 per thread of the 64 K-register file). ptxas still reports 20-300
  bytes of spills (more with ``cu_seqlens`` and in persistent mode).
- Intra-warpgroup overlap: iteration j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} back to
  back, waits only for S_j (``wgmma_wait`` 1 group left), runs the online softmax of S_j while
  the tensor cores still do P_{j-1} V_{j-1}, waits for O, and only then narrows P_j to bf16
  (writing a wgmma input register while a wgmma is in flight makes ptxas serialize all wgmmas,
  warning C7513: measured 306 -> 531 TFLOP/s at S=8192 with ping-pong). exp is exp2 with
  ``sm_scale * log2(e)`` folded into one multiply.
- Ping-pong (optional, off by default): the two consumers rendezvous twice per iteration on an
  mbarrier so that one's softmax runs while the other's GEMMs own the tensor cores. Measured
  slower than letting the two warpgroups interleave freely (563 vs 587 TFLOP/s at S=8192).
- Causal work skipping: the KV range of a q block ends at its diagonal block; only blocks that
  straddle the diagonal or a segment start are masked (three loops: masked / interior / masked).
  With ``cu_seqlens`` the range starts at the block holding the segment start of the q block's
  first row, so earlier segments cost nothing. A consumer whose rows need fewer blocks than the
  tile's union range still waits on and releases those ring slots (barrier phases stay in step).
- Scheduling. Tile ids run over q heads fastest (the 4 heads of a GQA group are neighbours and
  share K/V tiles in L2) and over q blocks last-first (heavy first: the longest KV ranges start
  first, short ones fill the tail). Non-persistent: one CTA per tile, the hardware schedules.
  Persistent: one CTA per SM walks tiles in a static snake order; the K/V ring runs on across
  tiles and the next tile's Q is fetched during the current tile's last P V and store, which
  hides the per-tile start-up. Static order only balances when tile cost falls with tile id, as
  for one sequence; packed segments break that, so ``default_config`` keeps them non-persistent.
- Padding rows (past ``cu_seqlens[-1]``) may hold NaN: their K only reaches masked scores
  (replaced by -inf), and V rows past the end are zeroed by the wrapper (one elementwise pass
  over V, only when ``cu_seqlens`` is given), because 0 * NaN in P V would leak.

Measured on an H200 (2026-11-22, benchmarks/flash_mgpu.py --configs final; bf16, 32 q / 8 kv
heads, d=128, causal; TFLOP/s = 4 * S^2 * d * Hq / 2 / time; cuDNN = jax.nn.dot_product_attention;
same process, same inputs; two S=8192 samples from one run)::

    | S              | this kernel, default config | Triton kernel (gpu.py) | cuDNN     |
    | 2048           | 381 (persistent)            | 182                    | 290       |
    | 8192           | 647 / 653 (persistent)      | 422 / 411              | 550 / 576 |
    | 8192, 4 x 2048 | 417 (non-persistent)        | 283                    | -         |

Run-to-run spread of the same config is about 5% (cuDNN at S=8192 read 546-576 over four runs).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import reference
from pallas_kernels.hopper import on_hopper as on_hopper  # (mgpu.on_hopper: the dispatcher, tests)

_LOG2E = math.log2(math.e)
_M_INIT = -1e30  # finite running-max start: fully masked rows give exp2(-inf - _M_INIT) = 0
_ROWS = 64  # query rows per consumer warpgroup (wgmma M)
_CONSUMERS = 2
BLOCK_Q = _ROWS * _CONSUMERS  # query rows per CTA
_SMEM_LIMIT = 227 * 1024 - 512  # Hopper's per-CTA opt-in maximum, less room for the mbarriers


@dataclasses.dataclass(frozen=True)
class FlashMgpuConfig:
    """Static launch parameters.

    block_kv: keys per K/V tile (64 or 128; wgmma N of S and K of P V).
    num_stages: K/V ring depth (SMEM: 32 KiB + num_stages * 4 * block_kv * d bytes).
    pingpong: rendezvous the two consumer warpgroups so their softmax and GEMMs alternate.
    overlap: keep P_{j-1} V_{j-1} in flight during the softmax of S_j (False: wait for both GEMMs
      before the softmax; fewer live registers).
    heavy_first: launch the q blocks with the longest KV range first.
    persistent: launch ``num_ctas`` CTAs (default: one per SM) that walk the tiles in a static
      snake order; the K/V ring runs on across tiles and the next tile's Q is fetched while the
      current one finishes (costs a separate 2 x 64 x d output staging buffer).
    consumer_regs / producer_regs: ``setmaxnreg`` targets (multiples of 8).
    """

    block_kv: int = 128
    num_stages: int = 2
    pingpong: bool = True
    overlap: bool = True
    heavy_first: bool = True
    persistent: bool = False
    num_ctas: int | None = None
    consumer_regs: int = 232
    producer_regs: int = 40

    def __post_init__(self) -> None:
        if self.block_kv not in (64, 128):
            raise ValueError(f"FlashMgpuConfig.block_kv must be 64 or 128, got {self.block_kv!r}")
        if not isinstance(self.num_stages, int) or not 2 <= self.num_stages <= 4:
            raise ValueError(f"FlashMgpuConfig.num_stages must be an int in [2, 4], got {self.num_stages!r}")
        for name in ("consumer_regs", "producer_regs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v % 8 or not 24 <= v <= 256:
                raise ValueError(f"FlashMgpuConfig.{name} must be a multiple of 8 in [24, 256], got {v!r}")
        if self.num_ctas is not None and (not isinstance(self.num_ctas, int) or self.num_ctas < 1):
            raise ValueError(f"FlashMgpuConfig.num_ctas must be a positive int or None, got {self.num_ctas}")
        if _CONSUMERS * self.consumer_regs + self.producer_regs > 512:
            raise ValueError(
                f"FlashMgpuConfig: 2 * consumer_regs + producer_regs = "
                f"{_CONSUMERS * self.consumer_regs + self.producer_regs} exceeds 512 registers per lane"
            )


def default_config(num_tokens: int, packed: bool = False) -> FlashMgpuConfig:
    """128-key tiles, 2-deep ring, no ping-pong (fastest in the H200 sweep of the module
    docstring); persistent for one sequence, non-persistent for packed segments (the static
    persistent order mis-balances them: 336 vs 426 TFLOP/s for 4 x 2048)."""
    del num_tokens
    return FlashMgpuConfig(pingpong=False, persistent=not packed)


def supports(
    q: jax.Array,
    k: jax.Array,
    cu_seqlens: jax.Array | None,
    sliding_window: int | None,
    soft_cap: float | None,
) -> bool:
    """Whether this kernel handles the call (shapes and options only; see ``on_hopper``).

    Handled: q ``[T, Hq, d]``, k ``[T, Hkv, d]`` with Hq % Hkv == 0, d in {64, 128}, bf16 or fp16
    (q and k alike), any T >= 1 (padded to 128 internally), ``cu_seqlens`` None or int32 packed
    segments. Not handled: sliding window, soft cap, float32, other head sizes.
    """
    if sliding_window is not None or soft_cap is not None:
        return False
    if q.ndim != 3 or k.ndim != 3 or q.shape[2] != k.shape[2] or q.shape[0] != k.shape[0]:
        return False
    if q.shape[2] not in (64, 128) or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return False
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) or q.dtype != k.dtype:
        return False
    if cu_seqlens is not None and (cu_seqlens.ndim != 1 or cu_seqlens.dtype != jnp.int32):
        return False
    return True


def _smem_bytes(cfg: FlashMgpuConfig, head_dim: int, itemsize: int, packed: bool) -> int:
    """Shared memory of one CTA: Q rows (+ output staging when persistent), the K/V ring, segment
    starts; barriers and alignment are left to the margin in ``_SMEM_LIMIT``."""
    rows = _CONSUMERS * _ROWS * head_dim * itemsize * (2 if cfg.persistent else 1)
    ring = 2 * cfg.num_stages * cfg.block_kv * head_dim * itemsize
    return rows + ring + (_CONSUMERS * _ROWS * 4 if packed else 0)


@functools.cache
def _sm_count() -> int:
    """Multiprocessors of the default device (132 on an H100/H200 SXM when it cannot be read)."""
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or 132
    except RuntimeError:
        return 132


def _tile_schedule(cta, i, *, num_ctas: int):
    """Tile id of this CTA's i-th tile: round i covers tiles [i * num_ctas, (i + 1) * num_ctas),
    walked forwards on even rounds and backwards on odd ones (tiles shrink along the order, so
    the snake evens out the per-CTA totals of a static schedule)."""
    pos = jnp.where(lax.rem(i, jnp.int32(2)) == 0, cta, num_ctas - 1 - cta)
    return i * num_ctas + pos


def _num_tiles_of(cta, *, num_ctas: int, num_tiles: int):
    full, rem = divmod(num_tiles, num_ctas)
    last = _tile_schedule(cta, jnp.int32(full), num_ctas=num_ctas)
    return full + (last < num_tiles).astype(jnp.int32) if rem else jnp.int32(full)


def _kernel(
    *refs,
    packed: bool,
    group: int,
    num_q_blocks: int,
    num_heads: int,
    num_ctas: int,
    head_dim: int,
    scale: float,
    cfg: FlashMgpuConfig,
):
    if packed:
        q_ref, k_ref, v_ref, seg_ref, o_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref), seg_ref = refs, None
    dtype = q_ref.dtype
    bk, stages = cfg.block_kv, cfg.num_stages
    num_tiles = num_q_blocks * num_heads
    cta = lax.axis_index("cta")
    my_tiles = _num_tiles_of(cta, num_ctas=num_ctas, num_tiles=num_tiles)

    def tile(i):
        """(q block, q head, first KV block, KV steps) of this CTA's i-th tile. Tile ids run over
        heads fastest (a GQA group's heads are neighbours), q blocks last-first if heavy_first."""
        t = _tile_schedule(cta, i, num_ctas=num_ctas)
        qb = lax.div(t, jnp.int32(num_heads))
        if cfg.heavy_first:
            qb = num_q_blocks - 1 - qb
        head = lax.rem(t, jnp.int32(num_heads))
        q0 = qb * BLOCK_Q
        # Union KV block range of the tile: [b_lo, b_hi). Segment starts are non-decreasing, so
        # the first row's start is the smallest.
        b_lo = lax.div(seg_ref[q0], jnp.int32(bk)) if packed else jnp.int32(0)
        b_hi = lax.div(q0 + BLOCK_Q + bk - 1, jnp.int32(bk))
        return q0, head, b_lo, b_hi - b_lo

    def slot(g):  # g: the CTA-wide step counter, continued across tiles
        return lax.rem(g, jnp.int32(stages))

    def scoped(q_smem, o_smem, k_smem, v_smem, seg_smem, q_bar, seg_bar, k_bar, v_bar, k_free, v_free, turn):
        wg = lax.axis_index("wg")
        # Non-persistent: the output is staged through Q's buffer (free once the last S is done).
        o_smem = q_smem if o_smem is None else o_smem

        def rendezvous():
            if cfg.pingpong:
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(turn)

        @pl.when(wg < _CONSUMERS)
        def _consumer():
            plgpu.set_max_registers(cfg.consumer_regs, action="increase")
            q_w, o_w = q_smem.at[wg], o_smem.at[wg]

            def fetch_rows(i):  # this warpgroup's Q rows (and segment starts) of tile i
                q0, head, _, _ = tile(i)
                r0 = q0 + wg * _ROWS
                plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(r0, _ROWS), head], q_w, q_bar.at[wg])
                if packed:
                    plgpu.copy_gmem_to_smem(seg_ref.at[pl.ds(r0, _ROWS)], seg_smem.at[wg], seg_bar.at[wg])

            fetch_rows(jnp.int32(0))
            if cfg.pingpong:
                # Warpgroup 1 starts one rendezvous ahead: from then on the two alternate.
                pl.when(wg == 1)(rendezvous)

            def one_tile(i, g0):
                q0, head, b_lo, n = tile(i)
                r0 = q0 + wg * _ROWS
                if packed:
                    first_start = seg_ref[r0]
                    last_start = seg_ref[r0 + _ROWS - 1]
                else:
                    first_start = last_start = jnp.int32(0)
                # This warpgroup's steps (relative to b_lo): compute [c0, c1), of which [u0, u1)
                # need no mask; [0, c0) and [c1, n) are only waited on and released.
                c0 = jnp.clip(lax.div(first_start, jnp.int32(bk)) - b_lo, 0, n - 1)
                c1 = jnp.clip(lax.div(r0 + _ROWS + bk - 1, jnp.int32(bk)) - b_lo, c0 + 1, n)
                u0 = jnp.clip(lax.div(last_start + bk - 1, jnp.int32(bk)) - b_lo, c0 + 1, c1)
                u1 = jnp.clip(lax.div(r0 + 1, jnp.int32(bk)) - b_lo, u0, c1)

                if packed:
                    plgpu.barrier_wait(seg_bar.at[wg])
                    row_start = plgpu.load(seg_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                plgpu.barrier_wait(q_bar.at[wg])

                def release(j, _):
                    s = slot(g0 + j)
                    plgpu.barrier_wait(k_bar.at[s])
                    plgpu.barrier_arrive(k_free.at[s])
                    plgpu.barrier_wait(v_bar.at[s])
                    plgpu.barrier_arrive(v_free.at[s])
                    rendezvous()
                    rendezvous()

                def softmax(s, m, den, j, masked: bool):
                    if masked:
                        key0 = (b_lo + j) * bk  # key position of column 0
                        rows = plgpu.broadcasted_iota(jnp.int32, (_ROWS, bk), 0, layout=plgpu.Layout.WGMMA)
                        cols = plgpu.broadcasted_iota(jnp.int32, (_ROWS, bk), 1, layout=plgpu.Layout.WGMMA)
                        ok = cols - rows <= r0 - key0
                        if packed:
                            ok = ok & (cols >= lax.broadcast_in_dim(row_start, (_ROWS, bk), [0]) - key0)
                        s = jnp.where(ok, s, -jnp.inf)
                    m_new = jnp.maximum(m, s.max(axis=1) * scale)
                    alpha = jnp.exp2(m - m_new)
                    p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
                    den_new = den * alpha + p.sum(axis=1)
                    return m_new, den_new, p, alpha  # p stays f32: see gemms() for when it is narrowed

                def rescale(o, alpha):
                    return o * lax.broadcast_in_dim(alpha, o.shape, [0])

                lax.fori_loop(0, c0, release, None)

                # Prologue: S of step c0 (always masked: it may straddle a segment start or the
                # diagonal).
                s0 = slot(g0 + c0)
                plgpu.barrier_wait(k_bar.at[s0])

                def first_qk(s_ref):
                    plgpu.wgmma(s_ref, q_w, k_smem.at[s0].transpose((1, 0)))
                    rendezvous()
                    return s_ref[...]

                s = pl.run_scoped(first_qk, plgpu.ACC((_ROWS, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[s0])
                m = plgpu.layout_cast(jnp.full((_ROWS,), _M_INIT, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                den0 = plgpu.layout_cast(jnp.zeros((_ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                m, den, p, alpha = softmax(s, m, den0, c0, True)
                p = p.astype(dtype)
                rendezvous()
                o = plgpu.layout_cast(jnp.zeros((_ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)

                def step(j, carry, masked: bool):
                    o, m, den, p, alpha = carry
                    sk, sv = slot(g0 + j), slot(g0 + j - 1)
                    plgpu.barrier_wait(k_bar.at[sk])

                    def gemms(s_ref, o_ref):
                        plgpu.wgmma(s_ref, q_w, k_smem.at[sk].transpose((1, 0)))
                        o_ref[...] = rescale(o, alpha)
                        plgpu.barrier_wait(v_bar.at[sv])
                        plgpu.wgmma(o_ref, p, v_smem.at[sv])
                        rendezvous()
                        # S_j is the older of the two wgmma groups in flight: wait for it alone, so
                        # the softmax below overlaps P_{j-1} V_{j-1} on the tensor cores.
                        s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1 if cfg.overlap else 0)
                        plgpu.barrier_arrive(k_free.at[sk])
                        m2, den2, p2, alpha2 = softmax(s, m, den, j, masked)
                        rendezvous()
                        o2 = o_ref[...]  # waits for P_{j-1} V_{j-1}
                        # P_j is a wgmma input: writing its registers while a wgmma is in flight
                        # makes ptxas serialize every wgmma (C7513), so narrow it after the wait.
                        o2, p2 = lax.optimization_barrier((o2, p2))
                        return o2, m2, den2, p2.astype(dtype), alpha2

                    out = pl.run_scoped(
                        gemms, plgpu.ACC((_ROWS, bk), jnp.float32), plgpu.ACC((_ROWS, head_dim), jnp.float32)
                    )
                    plgpu.barrier_arrive(v_free.at[sv])
                    return out

                carry = (o, m, den, p, alpha)
                carry = lax.fori_loop(c0 + 1, u0, functools.partial(step, masked=True), carry)
                carry = lax.fori_loop(u0, u1, functools.partial(step, masked=False), carry)
                carry = lax.fori_loop(u1, c1, functools.partial(step, masked=True), carry)
                o, m, den, p, alpha = carry

                if cfg.persistent:
                    # Every S of this tile is done: Q's buffer is free, fetch the next tile's rows
                    # so that they land while this tile finishes. The fence orders this tile's
                    # generic-proxy read of the segment starts before the TMA overwrites them.
                    @pl.when(i + 1 < my_tiles)
                    def _prefetch():
                        plgpu.commit_smem()
                        fetch_rows(i + 1)

                # Epilogue: P V of the last computed step.
                sv = slot(g0 + c1 - 1)

                def last_pv(o_ref):
                    o_ref[...] = rescale(o, alpha)
                    plgpu.barrier_wait(v_bar.at[sv])
                    plgpu.wgmma(o_ref, p, v_smem.at[sv])
                    rendezvous()
                    return o_ref[...]

                o = pl.run_scoped(last_pv, plgpu.ACC((_ROWS, head_dim), jnp.float32))
                plgpu.barrier_arrive(v_free.at[sv])
                rendezvous()

                lax.fori_loop(c1, n, release, None)

                inv = 1.0 / jnp.maximum(den, 1e-30)
                if cfg.persistent:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous tile's store has read o_w
                o_w[...] = (o * lax.broadcast_in_dim(inv, o.shape, [0])).astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_w, o_ref.at[pl.ds(r0, _ROWS), head])
                return g0 + n

            lax.fori_loop(0, my_tiles, one_tile, jnp.int32(0))
            if cfg.pingpong:
                pl.when(wg == 0)(rendezvous)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        @pl.when(wg == _CONSUMERS)
        def _producer():
            plgpu.set_max_registers(cfg.producer_regs, action="decrease")

            def one_tile(i, g0):
                _, head, b_lo, n = tile(i)
                kv_head = lax.div(head, jnp.int32(group))

                def load(j, _):
                    g = g0 + j
                    s = slot(g)
                    rows = pl.ds((b_lo + j) * bk, bk)
                    # A slot is refilled once both consumers released its previous use.
                    pl.when(g >= stages)(lambda: plgpu.barrier_wait(k_free.at[s]))
                    plgpu.copy_gmem_to_smem(k_ref.at[rows, kv_head], k_smem.at[s], k_bar.at[s])
                    pl.when(g >= stages)(lambda: plgpu.barrier_wait(v_free.at[s]))
                    plgpu.copy_gmem_to_smem(v_ref.at[rows, kv_head], v_smem.at[s], v_bar.at[s])

                lax.fori_loop(0, n, load, None)
                return g0 + n

            total = lax.fori_loop(0, my_tiles, one_tile, jnp.int32(0))

            def drain(g, _):  # observe the last releases too: every barrier phase is waited on once
                plgpu.barrier_wait(k_free.at[slot(g)])
                plgpu.barrier_wait(v_free.at[slot(g)])

            lax.fori_loop(jnp.maximum(total - stages, 0), total, drain, None)

    tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    rows_buf = plgpu.SMEM((_CONSUMERS, _ROWS, head_dim), dtype, transforms=tiles)
    pl.run_scoped(
        scoped,
        rows_buf,
        rows_buf if cfg.persistent else None,
        plgpu.SMEM((stages, bk, head_dim), dtype, transforms=tiles),
        plgpu.SMEM((stages, bk, head_dim), dtype, transforms=tiles),
        plgpu.SMEM((_CONSUMERS, _ROWS), jnp.int32) if packed else None,
        plgpu.Barrier(num_barriers=_CONSUMERS),
        plgpu.Barrier(num_barriers=_CONSUMERS) if packed else None,
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=_CONSUMERS) if cfg.pingpong else None,
        collective_axes="wg",
    )


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    cu_seqlens: jax.Array | None = None,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
    config: FlashMgpuConfig | None = None,
) -> jax.Array:
    """Hopper kernel with ``reference.flash_attention``'s signature and semantics.

    ``q: [num_tokens, num_q_heads, head_dim]``, ``k, v: [num_tokens, num_kv_heads, head_dim]``,
    ``cu_seqlens: int32[num_segments + 1]`` or None -> ``[num_tokens, num_q_heads, head_dim]``.
    Raises ValueError where ``supports`` is False (the Triton kernel in ``gpu.py`` covers those).
    ``interpret=True`` runs Mosaic GPU's interpret mode (slow; small shapes only).
    """
    reference.validate_inputs(q, k, v, cu_seqlens, sliding_window=sliding_window, soft_cap=soft_cap)
    if not supports(q, k, cu_seqlens, sliding_window, soft_cap) or v.dtype != q.dtype:
        raise ValueError(
            f"mgpu.flash_attention supports bf16/fp16, head_dim 64/128, no sliding_window and no "
            f"soft_cap; got q {q.dtype}{q.shape}, k {k.dtype}{k.shape}, v {v.dtype}, "
            f"sliding_window={sliding_window}, soft_cap={soft_cap} (use gpu.flash_attention)"
        )
    num_tokens, hq, d = q.shape
    hkv = k.shape[1]
    if num_tokens == 0:
        return q
    packed = cu_seqlens is not None
    cfg = config if config is not None else default_config(num_tokens, packed)
    t_pad = -(-num_tokens // BLOCK_Q) * BLOCK_Q
    extra = []
    if packed:
        pos = jnp.arange(num_tokens, dtype=jnp.int32)
        v = jnp.where((pos < cu_seqlens[-1])[:, None, None], v, jnp.zeros((), v.dtype))
        seg = reference.segment_starts(num_tokens, cu_seqlens)
        # Rows added by padding see no keys (start = row + 1), like rows past cu_seqlens[-1].
        seg = jnp.concatenate([seg, jnp.arange(num_tokens, t_pad, dtype=jnp.int32) + 1])
        extra = [seg]
    if t_pad != num_tokens:
        pad = ((0, t_pad - num_tokens), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    num_q_blocks = t_pad // BLOCK_Q
    num_tiles = num_q_blocks * hq
    num_ctas = min(num_tiles, cfg.num_ctas or _sm_count()) if cfg.persistent else num_tiles
    smem = _smem_bytes(cfg, d, jnp.dtype(q.dtype).itemsize, packed)
    if smem > _SMEM_LIMIT:
        raise ValueError(f"{cfg} needs {smem} bytes of shared memory at head_dim={d} (limit {_SMEM_LIMIT})")
    body = functools.partial(
        _kernel, packed=packed, group=hq // hkv, num_q_blocks=num_q_blocks, num_heads=hq,
        num_ctas=num_ctas, head_dim=d, scale=float(sm_scale) * _LOG2E, cfg=cfg,
    )  # fmt: skip
    call = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((t_pad, hq, d), q.dtype),
        grid=(num_ctas,),
        grid_names=("cta",),
        num_threads=_CONSUMERS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    out = call(q, k, v, *extra)
    return out[:num_tokens] if t_pad != num_tokens else out
