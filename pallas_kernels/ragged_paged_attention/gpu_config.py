"""Static launch parameters of the GPU ragged paged attention kernel, and the heuristic that picks them.

Where it sits: ``gpu.ragged_paged_attention`` takes a ``GpuConfig`` (one launch) or a
``GpuPlan`` (decode + prefill classes) from its caller or from ``default_config``, which sees
only the call's static shapes (the engine's bucket, page table width, heads, pool kind); what
the batch holds is decided on device (``gpu_splits``).
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.ragged_paged_attention import gpu_splits as sp


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Static launch parameters of the GPU kernel.

    block_q: query rows per program (times G q heads = rows of the score tile).
    pages_per_block: pages gathered per inner step (block_k = pages_per_block * page_size).
    num_splits: programs that share one item's KV range (FlashDecoding); 1 = no combine pass.
    num_warps, num_stages: Triton's warps per program and software-pipelining depth.
    min_blocks_per_split: an item splits its KV range into at most ``ceil(blocks / this)`` of the
      call's splits (a short context is not cut into one-block programs with a wide merge).
    fused_combine: with splits, the last program of each (item, kv head) to finish (an atomic
      counter) merges the partials and writes the output rows itself, instead of the XLA combine +
      scatter after the launch (fewer launches: matters for latency-bound batch-1 decode).
    kv_compute: the dtype the two dots of an int8 / fp8 pool run in, i.e. what every K and V
      element converts to in the inner loop. None: q's (bf16 in the engine); "float16": f16,
      which Hopper converts e4m3 to in hardware (``cvt.rn.f16x2.e4m3x2``; it has no e4m3 ->
      bf16 instruction; ``default_config``'s choice for quantized pools), q converted once per
      program, saturated to f16's range; "float8" (fp8 pools; int8 pools take "float16"): the
      QK dot in e4m3 with K as stored (no conversion) against q quantized once per program
      with a scale per row (absmax / 448), PV as "float16". Unquantized pools ignore it. The
      A/B: ``benchmarks/kv_dtype_attention.py``.
    wide_pages_per_block: a direct, unsplit launch only (one item per sequence): a second launch
      of the same grid at this many pages per block, aliased onto the first's output, takes the
      call's items when ``gpu_splits.wide_keys_win`` says it finishes first for the live count
      (decided in the kernels); the first launch takes them otherwise. Each launch's programs
      idle when the other one serves. None: one launch.
    int8_f16_bits: an int8 pool with ``kv_compute="float16"`` converts K / V by bit assembly
      (``pallas_kernels.int8_f16``: an xor and an f16 subtract per value) instead of Triton's
      ``cvt.rn.f16.s16`` (one per value, a quarter-rate conversion): the 8B layout's program at
      64 keys per step takes 168 registers instead of 202, as an fp8 pool's (3 per SM, not 2;
      ``benchmarks/offline_attention.py``). Exact.
    split_twin: a direct, unsplit launch only: a split launch (its ``num_splits`` > 1) beside
      it, with its merge, serving the calls whose live sequences x kv heads are fewer than
      ``gpu_splits.TARGET_PROGRAMS`` (the few decodes of a large bucket: a mixed step's), this
      launch serving the rest. Its partials are sized for those sequences only.
    """

    block_q: int = 16
    pages_per_block: int = 4
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2
    fused_combine: bool = False
    min_blocks_per_split: int = 2
    kv_compute: str | None = None
    wide_pages_per_block: int | None = None
    int8_f16_bits: bool = False
    split_twin: GpuConfig | None = None

    def __post_init__(self) -> None:
        ints = ("block_q", "pages_per_block", "num_splits", "num_warps", "num_stages", "min_blocks_per_split")
        for name in ints:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"GpuConfig.{name} must be a positive int, got {v!r}")
        for name in ("block_q", "pages_per_block", "num_warps"):
            v = getattr(self, name)
            if v & (v - 1):
                raise ValueError(f"GpuConfig.{name} must be a power of two, got {v}")
        wide = self.wide_pages_per_block
        if wide is not None and (not isinstance(wide, int) or wide & (wide - 1)
                                 or wide <= self.pages_per_block or self.num_splits != 1):
            raise ValueError("GpuConfig.wide_pages_per_block must be None or a power of two above "
                             f"pages_per_block ({self.pages_per_block}) with num_splits 1, got {wide!r}")
        twin = self.split_twin
        if twin is not None and (not isinstance(twin, GpuConfig) or twin.num_splits < 2
                                 or self.num_splits != 1 or twin.split_twin is not None
                                 or twin.wide_pages_per_block is not None or twin.fused_combine
                                 or twin.block_q != self.block_q):
            raise ValueError("GpuConfig.split_twin must be None or a GpuConfig with num_splits > 1, the "
                             "same block_q, no twins and no fused_combine, beside num_splits 1")
        if self.kv_compute not in (None, "float16", "float8"):
            raise ValueError("GpuConfig.kv_compute must be None, 'float16' or 'float8', "
                             f"got {self.kv_compute!r}")


@dataclasses.dataclass(frozen=True)
class GpuPlan:
    """Two launches over one output. First the prefill class: sequences with
    ``q_len > decode.block_q`` in large tiles, plus the padding rows (zeros), into a fresh buffer.
    Then the decode class (one item per sequence, small score tiles, optional KV splits) writes
    its rows into that buffer (aliased in place, or scattered in after the split combine).
    """

    decode: GpuConfig
    prefill: GpuConfig

    def __post_init__(self) -> None:
        if self.prefill.wide_pages_per_block is not None or self.prefill.split_twin is not None:
            raise ValueError("GpuPlan.prefill cannot have twins (wide_pages_per_block, split_twin): "
                             "a work-list launch")
        if self.prefill.num_splits != 1:
            raise ValueError("GpuPlan.prefill.num_splits must be 1 (prefill items are many already)")
        if self.prefill.block_q <= self.decode.block_q:
            raise ValueError("GpuPlan.prefill.block_q must exceed decode.block_q (the class threshold)")


_PARTIALS_BYTES = 64 << 20
_MAX_SPLITS = 32
_SPLIT_DECODE_WARPS = 2  # smaller programs, more of them in flight per SM (few live sequences)
# Keys per step of a quantized pool's unsplit decode launch at head_dim >= 128, one launch
# (``default_config``); None: the measured defaults. step_floor's arms attn-quant-keys-64 / 128 / 32.
QUANT_DECODE_KEYS: int | None = None
# int8 pools' K / V to f16 by bit assembly (``GpuConfig.int8_f16_bits``), then the fp8 pools'
# narrow / wide pair of decode launches (the same registers). On since session 49 (H100, the 8B
# layout at 8k, 64-row bucket: 0.81x / 0.89x the 128-key plain conversion's time at 40 / 64 live);
# off: step_floor --ab attn-int8-f16-bits-off.
INT8_KV_F16_BITS = True
# An unsplit decode class gets a split twin (``GpuConfig.split_twin``) where one live sequence
# would take splits. On since session 49 (H100, the 8B layout at 8k, a 256-row bucket: the decode
# call at 8 / 16 live 0.61x / 0.84x the unsplit launch's time with bf16, 0.70x / 0.85x with fp8;
# idle, +1.9-3.5%); off: step_floor --ab attn-split-twin-off. Every call launches it, one-row
# (decode-only) calls too: the engine makes those in its smallest bucket and a pipelined burst's,
# and both may hold few live sequences. In the smallest bucket only models of more than 16 kv
# heads are unsplit, and the twin is their batch-1 decode (session 50, H100, 32 kv heads at
# 1 x 8k: 77.6 us per call against 219.7 without it; session 49 had dropped it there).
DECODE_SPLIT_TWIN = True


def _splits(programs: int, num_kv_heads: int, ctx_blocks: int, partial_bytes: int) -> int:
    """Static upper bound on KV splits (the call picks its count at run time, ``active_splits``).

    None when ``programs`` (all rows live) already fill about two waves of an H100/H200's 132
    SMs; else enough for one live sequence (``num_kv_heads`` programs) to reach that, at most 32,
    and with the float32 partials of every split within 64 MiB (``partial_bytes`` per split; a
    temporary of the step, shared by its layers). Batch-1 decode at 8192 on an H200, loop times
    of one sweep (KERNEL_NOTES_runs_1-9 run 8): 32 splits of 2-warp programs 33 us, 16 splits of 4 warps
    45 us.
    """
    if programs >= sp.TARGET_PROGRAMS:
        return 1
    splits = 1
    while (num_kv_heads * splits < sp.TARGET_PROGRAMS and splits * 2 <= ctx_blocks and splits < _MAX_SPLITS
           and 2 * splits * partial_bytes <= _PARTIALS_BYTES):
        splits *= 2
    return splits


def default_config(
    num_tokens: int, max_seqs: int, num_q_heads: int, num_kv_heads: int, page_size: int, pages_per_seq: int,
    decode_rows: int = 1, kv_pool: str | None = None, head_dim: int | None = None,
) -> GpuConfig | GpuPlan:
    """Heuristic static config from the shapes alone (the batch's composition is dynamic).

    ``kv_pool`` "int8" / "fp8" (None: an unquantized pool) with ``head_dim`` 128 and an unsplit
    decode launch (H100, 2026-12-06, the 8B layout's decode-only call in a 64-row bucket at 8k;
    registers from ``benchmarks/offline_attention.py``):
    - int8: K / V converted to f16 by bit assembly (``INT8_KV_F16_BITS``), which takes fp8's 168
      registers at 64 keys, so int8 takes fp8's pair (below): 376.7 / 475.3 us at 40 / 64 live
      (session 49). With the switch off, Triton's conversion at 128 keys per step, its best
      (464.8 / 533.6 us there; 202 registers at 64 keys, 255 at 128, 2 programs per SM either
      way; session 48).
    - fp8: 64 keys (168 registers, 3 programs per SM) with a 128-key launch (255, 2 per SM)
      beside it (``wide_pages_per_block``), the kernels picking by the live count: 128 keys
      took 0.74x / 1.19x / 0.75x the 64-key time at 16 / 40 / 64 sequences, losing where 40 x 8
      kv heads need two rounds of 264 programs and one of 396 (``gpu_splits.wide_keys_win``).
    ``QUANT_DECODE_KEYS`` set (an A/B arm): that many keys for both pools at head_dim >= 128, one
    launch. Split launches, other head sizes and decode tiles of more than 16 score rows
    (speculative verify rows) keep 64 keys (128 lost where the launch splits and at head_dim 64,
    session 44; the wider tiles' registers are not measured).

    A quantized ``kv_pool``: both classes take ``kv_compute="float16"`` (H200,
    session 24, 16 x 8k decode attention per layer call, Qwen2.5-0.5B / 8B layouts: the fp8 pool
    1.081x / 1.334x bf16's time with bf16 dots, 0.979x / 0.954x with f16 dots; "float8" 0.898x /
    0.944x, not the default until its accuracy is measured on a GPU).

    Decode class: ``block_q * G = 16`` score rows (the tensor-core minimum), or ``block_q`` =
    ``decode_rows`` rounded up to a power of two when that is more (speculative verify rows:
    1 + k query rows, which then take this class's split-KV launch instead of the prefill
    tiles), ~64 keys per step, splits (and 2-warp programs) when ``max_seqs x kv heads``
    programs cannot fill the GPU.
    Prefill class (only if the bucket can hold a sequence with more than ``block_q`` rows):
    64-row tiles, 64 keys per step (measured best for the 8 x 512 chunks of the mixed
    benchmark; KERNEL_NOTES.md).
    """
    group = sp.pow2(num_q_heads // num_kv_heads)
    ppb = min(max(1, 64 // page_size), sp.pow2(pages_per_seq))
    bq = max(1, 16 // group, sp.pow2(decode_rows))
    ctx_blocks = -(-pages_per_seq // ppb)
    items = min(max_seqs, num_tokens)
    partial_bytes = items * bq * num_kv_heads * group * 128 * 4  # [rows, kvh * G * D] float32, D <= 128
    splits = _splits(items * num_kv_heads, num_kv_heads, ctx_blocks, partial_bytes)
    if kv_pool not in (None, "int8", "fp8"):
        raise ValueError(f"kv_pool must be None, 'int8' or 'fp8', got {kv_pool!r}")
    compute = "float16" if kv_pool else None
    bits = kv_pool == "int8" and INT8_KV_F16_BITS
    keys, wide_keys = _decode_keys(kv_pool, splits, head_dim, bq * group)

    def pages(k: int | None) -> int | None:
        return min(max(1, k // page_size), sp.pow2(pages_per_seq)) if k else None

    dec_ppb = pages(keys) or ppb
    wide = pages(wide_keys)
    dec = GpuConfig(
        block_q=bq,
        pages_per_block=dec_ppb,
        num_splits=splits,
        num_warps=_SPLIT_DECODE_WARPS if splits > 1 else 4,
        kv_compute=compute,
        wide_pages_per_block=wide if wide and wide > dec_ppb else None,
        int8_f16_bits=bits,
    )
    if DECODE_SPLIT_TWIN and splits == 1:
        few = sp.twin_live(items, num_kv_heads)
        twin_splits = _splits(0, num_kv_heads, ctx_blocks, partial_bytes * few // max(items, 1))
        if few and twin_splits > 1:
            dec = dataclasses.replace(dec, split_twin=GpuConfig(
                block_q=bq, pages_per_block=ppb, num_splits=twin_splits, num_warps=_SPLIT_DECODE_WARPS,
                kv_compute=compute, int8_f16_bits=bits))
    if num_tokens <= bq:
        return dec
    pre = GpuConfig(block_q=max(bq * 2, 64 // group), pages_per_block=ppb, num_warps=4, num_stages=2,
                    kv_compute=compute, int8_f16_bits=bits)
    return GpuPlan(decode=dec, prefill=pre)


def _decode_keys(
    kv_pool: str | None, splits: int, head_dim: int | None, score_rows: int,
) -> tuple[int | None, int | None]:
    """(keys per step, the wide launch's keys or None) of the decode class; None keys: 64. The
    defaults hold where they were measured: head_dim 128, 16 score rows (one query row per
    sequence; speculative verify rows make wider tiles, more registers, and keep 64)."""
    if kv_pool is None or splits != 1 or (head_dim or 0) < 128:
        return None, None
    if QUANT_DECODE_KEYS is not None:
        return QUANT_DECODE_KEYS, None
    if head_dim != 128 or score_rows != 16:
        return None, None
    return (128, None) if kv_pool == "int8" and not INT8_KV_F16_BITS else (64, 128)
