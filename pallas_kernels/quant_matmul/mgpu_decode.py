"""Persistent decode variant of the Hopper quantized matmul: balanced work units, one pipeline.

Where it sits: ``mgpu.quant_matmul`` calls ``decode_matmul_t`` for decode steps (tokens padded
to Mp <= 64) when given a ``DecodeConfig`` (its default at those sizes); prefill sizes keep
``mgpu.matmul_t``'s tiled grid. Semantics are ``reference.py``'s; the partials it returns are
summed and scaled by the same XLA epilogue as ``mgpu.matmul_t``'s.

Why: a decode matmul streams its weight once (H200, 2026-12-02, 8B gate/up, M = 1: the tiled
grid of ``matmul_t`` ran 448 CTAs of 32 steps in 64.7 us, two waves for 1.13 waves of work,
and its best split-K config 57.6 us, still 4.5 waves of short CTAs, each paying its pipeline's
fill; XLA's bf16 GEMV 69.5 us for twice the bytes). Here every CTA is resident from start to
end and owns a balanced share of the work units (the last one may own fewer)::

    unit g (0 <= g < U = N / block_n * split_k): output rows [n0, n0 + block_n) = tile g // split_k,
        K blocks [s * steps, (s + 1) * steps) with s = g % split_k, steps = K / block_k / split_k
    grid (ctas = ceil(U / per_cta),): CTA c owns units [c * per_cta, min(U, (c + 1) * per_cta))
    one TMA pipeline per CTA over its units' steps back to back (the ring never drains between
        units): step i -> unit i // steps, K block i % steps
      w8a16: weight tile (int8 / e4m3) -> registers -> x's dtype -> wgmma A operand
             (from registers on a GPU; through SMEM when interpreted: the interpreter's wgmma
             reads SMEM only), B = the x tile transposed (a view)
      w8a8:  both fp8 tiles straight from SMEM
      each step's product lands in a fresh accumulator and is added to a register carry
      [block_n, Mp]; a unit's last step writes the carry to partial s's rows of
      out^T [split_k * N, Mp] (SMEM -> TMA) and zeroes it

``decode_config`` picks ``split_k`` and ``per_cta`` for at most ``ctas_per_sm`` x the SM count
CTAs, the longest CTA as short as the shapes allow (Llama-3.1-8B on 132 SMs: 256 balanced CTAs
for each of its four projections).

``store_mn`` (the engine's default, ``mgpu.DECODE_STORE_MN``): the flush casts the carry to the
WGMMA_TRANSPOSED register layout and stores it through a transposed view of a [Mp, block_n]
SMEM tile, so the partials come out as [split_k, Mp, N]. With out^T the epilogue (``finish``)
transposed back to [M, N] in a kernel of its own, which XLA did not fuse into the consumer: one
extra kernel per quantized matmul. H200, session 24, the 8B's int8 decode step (16-token
bucket): 527 kernels (bf16: 399; all 128 extra ``input_transpose_fusion``) and 3.819 ms with
out^T; 462 kernels and 3.376 ms (-11.6%) with ``store_mn``. The 63 left are the sums over
split_k of the o and down projections, whose consumer (residual add, then RMSNorm's row
reduction) cannot take a column reduction in; the qkv and gate/up sums fuse into theirs.
``residual_norm`` (session 36, an A/B until the device times it) takes those partials into one
kernel with the residual add and the norm.

``pdl`` (an A/B config, ``mgpu.DECODE_PDL``): programmatic dependent launch. A decode step is
a chain of ~460 kernels of 2-35 us on the 8B, and each matmul spends its first ~1-2 us filling
its TMA ring (session 32's device clock: ~4-6 us of a 10-33 us call is more than its bytes at
the HBM read rate). With ``pdl`` the kernel executes ``griddepcontrol.wait`` before its first
load and ``griddepcontrol.launch_dependents`` once its pipeline is done; Mosaic GPU then launches
it with the programmatic-serialization attribute, so its launch and CTA set-up overlap the tail
of the kernel ahead, and (with XLA's ``xla_gpu_enable_pdl`` for XLA's own kernels) the next
kernel's set-up overlaps this one's last stores. Measured (H200, the 8B's int8 batch-1 step,
sessions 33-38): no change in four A/Bs, also with each CTA's first weight tile requested before
the wait (session 38); off.

``exit_read_only`` (an A/B config, ``mgpu.DECODE_EXIT_READ_ONLY``): before it exits a CTA waits
only until its last partial's store has read SMEM (``cp.async.bulk.wait_group.read``), not until
the store has landed in memory; the grid's completion still orders the stores before the next
kernel (JAX's own Hopper matmul, ``hopper_matmul_mgpu``, exits this way). Every call then ends
without the last store's write latency.

``async_acc`` (an A/B config, ``mgpu.DECODE_ASYNC``): one wgmma accumulator for the CTA's
whole pipeline. A step issues its wgmmas and waits only for the step before's (its own stay in
flight while the next tile is converted); the ring releases a slot a step after its step
(``delay_release``), so the ring needs 3+ stages to stay ahead; a unit's last step waits for
all and flushes the running sum less its value when the unit began (a register carry: the
accumulator cannot be zeroed in place under the interpreter; float32 sums of at most ``per_cta``
units lose nothing a bf16 output keeps). Without it every step waits for its own product and
adds it to a register carry. (Session 41: the per-CTA step bounds the read, see
``gated.py``.)

Refuted and removed: ``x_resident`` (each CTA's x slices loaded into SMEM once, the ring
streaming the weight alone; session 22 at M = 1 on the wall clock, and H100, session 53, at
[14336, 4096] and 16 tokens: 69% of the read against its control's 70%; commit e3ebe7d has it).

``tile_runs`` (the engine's default, ``mgpu.DECODE_TILE_RUNS``): a CTA's units follow one another in
tile-major order, so its consecutive units of one tile are a run of K parts; the carry then sums
the whole run and is stored once, into slot ``c - first CTA of the tile`` of [S, ...] partials
(S = ``slots``: the most CTAs that share a tile), and a tile's first run stores zeros into the
slots none of its CTAs takes. The 8B's gate-sized [14336, 4096] at 16 tokens splits K 8 ways
with 7 units per CTA: 8 partials (7.3 MB of float32 written and read again, 12% of the 58.7 MB
weight) and 7 stores per CTA become 2 partials and 1-2 stores. H100, session 54 (device clock):
25.8 -> 24.2 us there at 16 tokens, 24.6 -> 23.5 at 1; qkv's [6144, 4096] 12.4 -> 12.2; the 8B's
int8 + lm_head batch-1 step 3.736 -> 3.707 ms.

Session 54's per-CTA timeline (H100, benchmarks/cta_timeline.py) at [14336, 4096] and [4096,
14336]: the steady steps read the weight at 99-104% of the HBM read ceiling (256 CTAs, a 16 KB
tile each per 1.26-1.33 us); the kernel's loss is its ends: the first tiles land 2.1-2.3 us
after the start (3.5 at the latest CTA) and the CTAs end 5-7 us apart, the last 2-3 us after the
median one. On each SM that holds two CTAs the one that starts later ends ~1.4 us after the
other (case gr). Session 55 (H100) moved units to the CTAs that start first (``lead``: K in 16
parts, 13 units and one more for the first 152 of 264 CTAs; or every slot filled at K in 8)
and gained nothing (23.9-24.3 us against 23.9); the bare ring (benchmarks/claim_stream.py) read
81% whether its CTAs owned static shares or claimed units from a counter until none were left
(<= 0.6 us), so balance is not the loss. The ring is (benchmarks/ring_cost.py): 3.5 us fixed
and 97% of the read at the margin, against XLA's row sum's 1.9 us and 100% (an empty kernel of
the same grid: 1.1 us); at [14336, 4096] that caps any kernel on this ring at ~82%, before
its body. ``lead`` is removed (commit 6c7e9ca has it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.int8_f16 import int8_to_f16

DEFAULT_SMS = 132   # H100 SXM / H200 (the device's own count is used when it reports one)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64      # weight rows (output channels) per unit: 64 or 128
    block_k: int = 128     # contraction per pipeline step (one TMA tile; wgmma in 128-column chunks)
    stages: int = 4        # TMA ring depth
    split_k: int = 1       # K parts per output tile (units per tile; partials summed after)
    per_cta: int = 1       # work units per CTA (the grid: ceil(units / per_cta) CTAs, the last
    #                        one may own fewer)
    a_in_registers: bool = True   # w8a16 on a GPU: the dequantized tile feeds wgmma from registers
    store_mn: bool = False     # a unit's tile stored as [Mp, block_n] (parts [S, Mp, N]):
    #                            the epilogue then needs no transpose (module docstring)
    exit_read_only: bool = False   # the last wait before exit only for the stores' SMEM reads
    pdl: bool = False          # programmatic dependent launch (module docstring): on a GPU the
    #                            kernel may start before the one ahead of it ends; it waits for
    #                            that kernel's results before its first load and lets the kernel
    #                            after it start once its pipeline is done
    paired_wait: bool = False  # ``gated`` only: a step's gate and up products both issued before
    #                            one wait (else each product waits for its own wgmma)
    async_acc: bool = False    # the wgmma accumulator lives across the steps and each step
    #                            leaves its wgmmas in flight, its ring slot released a step later
    #                            (module docstring; not ``gated``'s: wrong there, session 42)
    int8_f16_bits: bool = False   # int8 weights with an f16 x: converted by bit assembly
    #                               (``dequant_tile``), not Mosaic GPU's per-element convert
    tile_runs: bool = False    # a CTA's consecutive units of one tile share one carry and one
    #                            partial: ``slots`` partials per tile, not ``split_k`` (docstring)

    def first_unit(self, c):
        """CTA c's first unit (an int, or a traced one inside the kernel)."""
        return c * self.per_cta

    def owner(self, g):
        """The CTA that owns unit g (an int, or a traced one inside the kernel)."""
        return g // self.per_cta

    def units(self, n: int) -> int:
        """The work units of N output channels."""
        return n // self.block_n * self.split_k

    def ctas(self, n: int) -> int:
        """The grid for N output channels."""
        return self.owner(self.units(n) - 1) + 1

    def slots(self, n: int) -> int:
        """The partials each output tile of N channels gets (the leading axis of the kernel's
        output): ``split_k``, or with ``tile_runs`` the most CTAs whose units share one tile."""
        if not self.tile_runs:
            return self.split_k
        s = self.split_k
        return max(self.owner(t * s + s - 1) - self.owner(t * s) + 1 for t in range(n // self.block_n))


def sm_count() -> int:
    """SMs of the default device (``DEFAULT_SMS`` where it reports none, e.g. on CPU)."""
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or DEFAULT_SMS
    except RuntimeError:
        return DEFAULT_SMS


def decode_config(n: int, k: int, *, block_n: int = 64, block_k: int = 128, stages: int = 4,
                  ctas_per_sm: int = 2, sms: int | None = None, max_split: int = 64,
                  store_mn: bool = False) -> DecodeConfig:
    """The split of K and the units per CTA for w [N, K], with at most ``ctas_per_sm`` x SMs
    CTAs: the longest CTA's pipeline steps (units per CTA x steps per unit) as few as any
    split gives, within 3%, at the smallest such split (fewer partials to sum); the CTA count
    is then the fewest that keep that length (balanced: 1792 units of the 8B's gate/up on 264
    CTAs -> 7 per CTA on 256; every slot filled, 7 units for the first 208 CTAs and 6 for the
    rest, was no faster: session 55)."""
    if n % block_n or k % block_k:
        raise ValueError(f"mgpu decode matmul: N={n}, K={k} do not tile by {block_n} x {block_k}")
    target = ctas_per_sm * (sms or sm_count())
    tiles, blocks = n // block_n, k // block_k
    options = []
    for split in range(1, min(blocks, max_split) + 1):
        if blocks % split == 0:
            units = tiles * split
            per = -(-units // min(target, units))
            options.append((per * (blocks // split), split, per))
    best = min(cost for cost, _, _ in options)
    split, per = min((sp, per) for cost, sp, per in options if cost <= best * 1.03)
    return DecodeConfig(block_n=block_n, block_k=block_k, stages=stages, split_k=split, per_cta=per,
                        store_mn=store_mn)


def supports(mp: int, n: int, k: int, config: DecodeConfig) -> bool:
    """Whether the config tiles x [Mp, K] @ w [N, K]^T (Mp: padded tokens, <= 64)."""
    tiles = (mp <= 64 and mp % 8 == 0 and n % config.block_n == 0 and config.block_n % 64 == 0
             and k % (config.block_k * config.split_k) == 0 and config.per_cta > 0
             and (config.block_k <= 128 or config.block_k % 128 == 0))
    return tiles and (not config.async_acc or config.stages >= 2)


def smem_transforms(dtype: jnp.dtype, cols: int) -> tuple:
    """The SMEM tiling and swizzle of a tile with ``cols`` columns of ``dtype`` (TMA, wgmma)."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(cols * bits)
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def finish(parts: jax.Array, m: int, w_scale: jax.Array, x_scale: jax.Array | None,
           out_dtype: jnp.dtype, *, store_mn: bool = False) -> jax.Array:
    """Inside jit, after either kernel: float32 partials out^T [split_k, N, Mp] (or [split_k,
    Mp, N] with ``store_mn``) -> y [m, N] = their sum (transposed) times the per-channel weight
    scale (and the per-token activation scale of w8a8), in ``out_dtype``. (The sum as a chain
    of elementwise adds instead was refuted twice: sessions 20 and 24, RESULTS.md.)"""
    total = parts.sum(axis=0)
    y = (total[:m] if store_mn else total[:, :m].T) * w_scale[None, :]
    if x_scale is not None:
        y = y * x_scale[:, None]
    return y.astype(out_dtype)


def a_tile(block_n: int, block_k: int, a_dtype: jnp.dtype) -> plgpu.SMEM:
    """The SMEM A tile [block_n, min(block_k, 128)] that ``tile_product`` dequantizes through
    when the weight tile cannot feed wgmma from registers (interpreted)."""
    chunk = min(block_k, 128)
    return plgpu.SMEM((block_n, chunk), a_dtype, transforms=smem_transforms(a_dtype, chunk))


def wgmmas_per_tile(block_k: int) -> int:
    """wgmma groups ``issue_product`` issues for a weight tile of ``block_k`` columns (one per
    128-column chunk): what a step may leave in flight per tile."""
    return block_k // min(block_k, 128)


def dequant_tile(w_reg: jax.Array, a_dtype: jnp.dtype, *, fp8: jnp.dtype,
                 int8_bits: bool = False) -> jax.Array:
    """An 8-bit weight tile in registers (int8 / ``fp8``) in x's dtype, the wgmma A operand.

    e4m3 goes through f32 into bf16 (Hopper's ``cvt`` has no e4m3 -> bf16). Mosaic GPU 0.11.2
    converts int8 -> bf16 two values per ``prmt`` / ``sub.bf16x2``, but int8 -> f16 one value at
    a time (H100, session 45: the kernel 8-21% slower with an f16 x). ``int8_bits`` assembles
    the f16 instead (``pallas_kernels.int8_f16``: one ``xor`` and one ``add.f16x2`` per pair,
    exact). H100, session 46: the kernel then runs as with a bf16 x, and the float16
    8B's int8 + lm_head batch-1 step took 3.745 ms against 4.214 (the engine's default since)."""
    w_dtype, a_dtype = jnp.dtype(w_reg.dtype), jnp.dtype(a_dtype)
    if w_dtype == jnp.dtype(fp8) and a_dtype != jnp.float16:
        return w_reg.astype(jnp.float32).astype(a_dtype)
    if int8_bits and w_dtype == jnp.int8 and a_dtype == jnp.float16:
        return int8_to_f16(w_reg)
    return w_reg.astype(a_dtype)


def issue_product(acc_ref, w_smem, x_smem, *, fp8: jnp.dtype, a_smem=None, pending: bool = False,
                  int8_bits: bool = False) -> None:
    """Issue one pipeline step's product inside a kernel, without waiting for it: w_smem [bn, bk]
    (8-bit; or fp8 beside an fp8 x for w8a8) @ x_smem [Mp, bk]^T into the fresh wgmma accumulator
    ``acc_ref`` [bn, Mp]. w8a16: the weight tile is dequantized to x's dtype in registers and
    feeds wgmma from there, or through ``a_smem`` (``a_tile``) when given; a long tile (bk 256-
    1024) goes in 128-column chunks (registers hold one). ``pending``: a wgmma issued before
    this call may still read ``a_smem`` (it is waited for before the tile overwrites it);
    ``int8_bits``: ``dequant_tile``'s."""
    bk = w_smem.shape[1]
    chunk = min(bk, 128)
    w_dtype, a_dtype = jnp.dtype(w_smem.dtype), jnp.dtype(x_smem.dtype)
    for j in range(wgmmas_per_tile(bk)):
        cols = pl.ds(j * chunk, chunk)
        if w_dtype == a_dtype:
            a = w_smem.at[:, cols]
        else:
            a = dequant_tile(w_smem[:, cols], a_dtype, fp8=fp8, int8_bits=int8_bits)
            if a_smem is not None:
                if j or pending:   # an earlier chunk's wgmma may still read the A tile
                    plgpu.wgmma_wait(0)
                a_smem[...] = a
                plgpu.commit_smem()
                a = a_smem
        plgpu.wgmma(acc_ref, a, x_smem.at[:, cols].transpose((1, 0)))


def tile_product(acc_ref, w_smem, x_smem, *, fp8: jnp.dtype, a_smem=None,
                 int8_bits: bool = False) -> jax.Array:
    """``issue_product``, then its value (float32 [bn, Mp]: reading the accumulator waits)."""
    issue_product(acc_ref, w_smem, x_smem, fp8=fp8, a_smem=a_smem, int8_bits=int8_bits)
    return acc_ref[...]


def persistent_kernel(kernel, out_type: jax.ShapeDtypeStruct, ctas: int, name: str, interpret: bool,
                      trace: tuple[int, str] | None = None):
    """``plgpu.kernel`` of a persistent decode body over a 1-D grid of ``ctas`` CTAs (axis "c"),
    in Mosaic GPU's warpgroup semantics; ``name`` per shape, so a profile names each projection's
    calls. ``trace`` (events per CTA, a directory): Mosaic GPU's on-device profiler records the
    kernel's named scopes per CTA and each call writes a trace there (``TRACE_SCOPES``)."""
    params = {} if trace is None else {"profile_space": trace[0], "profile_dir": trace[1],
                                       "profile_bounds_check": True}
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(ctas,),
        grid_names=("c",),
        kernel_name=name,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                             **params),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )


# The named scopes of the decode kernel (no-ops unless traced): a CTA's first instruction
# ("start"), each pipeline step's body, from its tiles' arrival ("step"), each partial's store
# ("store") and the wait for the CTA's last stores before it exits ("exit").
TRACE_SCOPES = ("start", "step", "store", "exit")


def decode_matmul_t(xp: jax.Array, w: jax.Array, *, config: DecodeConfig, fp8: jnp.dtype,
                    interpret: bool = False, trace_dir: str | None = None) -> jax.Array:
    """xp: [Mp, K] (bf16/f16 for w8a16, fp8 for w8a8), w: [N, K] 8-bit -> float32 partials
    out^T [S, N, Mp] summing to w @ xp^T (``config.store_mn``: out [S, Mp, N] summing to
    xp @ w^T), no scales; S = ``config.slots(N)``. ``supports(...)`` must hold. ``trace_dir``:
    each call writes a per-CTA trace of ``TRACE_SCOPES`` there (``persistent_kernel``)."""
    mp, k = xp.shape
    n = w.shape[0]
    cfg = config
    if not supports(mp, n, k, cfg):
        raise ValueError(f"mgpu decode matmul: N={n}, K={k}, Mp={mp} do not tile by {cfg}")
    bn, bk, split = cfg.block_n, cfg.block_k, cfg.split_k
    steps = k // bk // split                     # K blocks per unit
    units, per_cta = cfg.units(n), cfg.per_cta
    ctas = cfg.ctas(n)
    a_dtype = xp.dtype
    dequant = jnp.dtype(w.dtype) != jnp.dtype(a_dtype)
    via_smem = dequant and (interpret or not cfg.a_in_registers)

    slots = cfg.slots(n)
    pdl = cfg.pdl and not interpret   # (the interpreter runs kernels one at a time: nothing to wait for)

    def unit(c, i):   # -> (tile, part) of CTA c's step i
        g = cfg.first_unit(c) + i // steps
        return g // split, lax.rem(g, split)

    def zero() -> jax.Array:
        return plgpu.layout_cast(jnp.zeros((bn, mp), jnp.float32), plgpu.Layout.WGMMA)

    def kernel(x_gmem, w_gmem, o_gmem):
        with jax.named_scope("start"):
            c = lax.axis_index("c")
        # The last CTA may own fewer units (a dynamic pipeline length).
        count = per_cta if units % per_cta == 0 else jnp.minimum(per_cta, units - c * per_cta)

        def run_ends(i):   # whether step i's carry is flushed: its unit's last step (tile_runs:
            #                and the tile's last part, or the CTA's last step)
            ends = lax.rem(i, steps) == steps - 1
            if cfg.tile_runs:
                ends = ends & ((unit(c, i)[1] == split - 1) | (i == count * steps - 1))
            return ends

        def first_cta(tile):   # tile_runs: the CTA that owns the tile's first unit
            return cfg.owner(tile * split)

        def w_block(i):
            tile, part = unit(c, i)
            return tile, part * steps + lax.rem(i, steps)

        def x_block(i):
            return 0, unit(c, i)[1] * steps + lax.rem(i, steps)

        def with_smem(o_smem, *a_smem):
            if pdl:   # nothing this kernel reads may be loaded before the kernels ahead finish
                plgpu.griddepcontrol_wait()

            @jax.named_scope("store")
            def store(value, tile, slot):   # a [bn, Mp] sum -> partial ``slot``'s tile
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the previous store read o_smem
                if cfg.store_mn:   # [bn, Mp] registers -> the [Mp, bn] tile, transposed
                    o_smem.transpose((1, 0))[...] = plgpu.layout_cast(value, plgpu.Layout.WGMMA_TRANSPOSED)
                    dst = o_gmem.at[pl.ds(slot * mp, mp), pl.ds(tile * bn, bn)]
                else:
                    o_smem[...] = value
                    dst = o_gmem.at[pl.ds(slot * n + tile * bn, bn), :]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, dst)

            def flush(value, i):   # the sum of step i's unit (tile_runs: run) -> its partial
                tile, part = unit(c, i)
                if not cfg.tile_runs:
                    return store(value, tile, part)
                slot = c - first_cta(tile)
                store(value, tile, slot)
                # The tile's first run zeroes the slots no CTA of the tile takes.
                runs = cfg.owner(tile * split + split - 1) - first_cta(tile) + 1
                for r in range(1, slots):
                    pl.when((slot == 0) & (r >= runs))(lambda r=r: store(zero(), tile, r))

            @jax.named_scope("step")
            def body(idx, w_smem, x_smem, carry):
                i = idx[0]
                a = a_smem[0] if via_smem else None
                carry = carry + pl.run_scoped(
                    lambda acc: tile_product(acc, w_smem, x_smem, fp8=fp8, a_smem=a,
                                             int8_bits=cfg.int8_f16_bits),
                    plgpu.ACC((bn, mp), jnp.float32))
                last = run_ends(i)
                pl.when(last)(lambda: flush(carry, i))
                return lax.cond(last, lambda c: zero(), lambda c: c, carry)

            @jax.named_scope("step")
            def async_body(idx, w_smem, x_smem, before, acc):   # async_acc: acc lives across the
                #   steps and sums every unit so far; ``before``: its value when this unit began
                i = idx[0]
                issue_product(acc, w_smem, x_smem, fp8=fp8, a_smem=a_smem[0] if via_smem else None,
                              pending=True, int8_bits=cfg.int8_f16_bits)

                def unit_done(before):   # the running sum (waits for every wgmma) less the units
                    total = acc[...]     # (tile_runs: runs) before this one: its own sum
                    flush(total - before, i)
                    return total

                def step_done(before):   # this step's wgmmas stay in flight; the step before's are done
                    plgpu.wgmma_wait(wgmmas_per_tile(bk))
                    return before

                return lax.cond(run_ends(i), unit_done, step_done, before)

            release = 1 if cfg.async_acc else 0   # async: a step's slot is refilled a step later
            w_spec = plgpu.BlockSpec((bn, bk), w_block, transforms=smem_transforms(w.dtype, bk),
                                     delay_release=release)
            x_spec = plgpu.BlockSpec((mp, bk), x_block, transforms=smem_transforms(a_dtype, bk),
                                     delay_release=release)
            if cfg.async_acc:
                def accumulate(acc):
                    plgpu.emit_pipeline(
                        lambda idx, w_smem, x_smem, before: async_body(idx, w_smem, x_smem, before, acc),
                        grid=(count * steps,), in_specs=[w_spec, x_spec], max_concurrent_steps=cfg.stages,
                        init_carry=zero(),
                    )(w_gmem, x_gmem)

                pl.run_scoped(accumulate, plgpu.ACC((bn, mp), jnp.float32))
            else:
                plgpu.emit_pipeline(
                    body, grid=(count * steps,),
                    in_specs=[w_spec, x_spec],
                    max_concurrent_steps=cfg.stages,
                    init_carry=zero(),
                )(w_gmem, x_gmem)
            if pdl:   # the next kernel may launch (it waits for this one's stores itself)
                plgpu.griddepcontrol_launch_dependents()
            with jax.named_scope("exit"):
                plgpu.wait_smem_to_gmem(0, wait_read_only=cfg.exit_read_only)

        tile_shape = (mp, bn) if cfg.store_mn else (bn, mp)
        scratch = [plgpu.SMEM(tile_shape, jnp.float32,
                              transforms=smem_transforms(jnp.float32, tile_shape[1]))]
        if via_smem:
            scratch.append(a_tile(bn, bk, a_dtype))
        pl.run_scoped(with_smem, *scratch)

    f = persistent_kernel(kernel, jax.ShapeDtypeStruct((slots * mp, n) if cfg.store_mn else (slots * n, mp),
                                                       jnp.float32),
                          ctas, f"quant_decode_{n}x{k}", interpret,
                          None if trace_dir is None
                          else (2 * (per_cta * (steps + slots) + 4), trace_dir))
    return f(xp, w).reshape((slots, mp, n) if cfg.store_mn else (slots, n, mp))
