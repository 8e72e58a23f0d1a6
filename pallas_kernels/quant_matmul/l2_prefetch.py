"""L2 prefetch of the next decode matmul's first weight tiles, issued by the kernel before it.

Where it sits: ``mgpu.quant_matmul`` passes the persistent decode kernel (``mgpu_decode``) the
weight of the quantized matmul that runs after it in the step (the model's ``linear(...,
prefetch=)``: qkv -> o -> gate/up -> down -> the next layer's qkv) with a ``PrefetchPlan``
made here from that matmul's own ``DecodeConfig``. Once a CTA's pipeline is done it issues
``cp.async.bulk.prefetch.tensor.2d.L2`` for its share of the plan's tiles and exits; results do
not change (a prefetch only warms the cache; the interpreter runs it as a no-op).

Why: between two matmuls a decode step runs small kernels (norms, RoPE, the KV write, the
attention and its combine, the split-K sums: 264 of ~2.2 us in the 8B's batch-1 int8 step,
H200, session 32) during which HBM idles, and each matmul starts by filling its TMA ring from
HBM (session 32's device clock: the 8B's qkv read at 54% of the HBM rate, o at ~40%, gate/up
77%). A prefetch is fire-and-forget: the L2 keeps loading after the kernel that asked exits,
while those small kernels run, so the next matmul's first steps read L2.

Plan: the next kernel's CTA j reads, at its pipeline step t, unit g = j * per_cta + t // steps,
the weight tile [block_n, block_k] at rows (g // split_k) * block_n and K block
(g % split_k) * steps + t % steps (``mgpu_decode``'s unit order). The plan covers steps
t < depth of every next CTA (depth from a byte budget, at most all of a CTA's steps); CTA c of
the current kernel of C CTAs issues next CTAs j = c, c + C, ..., each tile in boxes of at most
256 columns (a TMA box's limit)::

    boxes(plan, c, C) -> [(row, col)] of [block_n, box_cols] boxes, tiles past the last unit
                         clamped onto it (a repeated prefetch is harmless)
"""

from __future__ import annotations

import dataclasses

from jax import numpy as jnp

BOX_COLS = 256   # a TMA box spans at most 256 elements per dim


@dataclasses.dataclass(frozen=True)
class PrefetchPlan:
    """The next decode matmul's tiling (its ``DecodeConfig`` over w [n, k]) and how many of
    each of its CTAs' first pipeline steps to prefetch."""

    block_n: int
    block_k: int
    split_k: int
    per_cta: int
    n: int
    k: int
    depth: int      # pipeline steps prefetched per next CTA

    @property
    def steps(self) -> int:
        """K blocks per unit of the next kernel."""
        return self.k // self.block_k // self.split_k

    @property
    def units(self) -> int:
        return self.n // self.block_n * self.split_k

    @property
    def ctas(self) -> int:
        return -(-self.units // self.per_cta)

    @property
    def box_cols(self) -> int:
        return min(self.block_k, BOX_COLS)

    def bytes(self, itemsize: int = 1) -> int:
        """Weight bytes the plan asks L2 to load (the clamped repeats counted once per tile)."""
        return min(self.ctas * self.depth, self.units * self.steps) * self.block_n * self.block_k * itemsize


def plan(n: int, k: int, block_n: int, block_k: int, split_k: int, per_cta: int, budget: int,
         itemsize: int = 1) -> PrefetchPlan | None:
    """The plan for a next matmul over w [n, k] tiled as given, prefetching about ``budget``
    bytes (rounded up to whole steps of every next CTA); None for a budget of 0."""
    if budget <= 0:
        return None
    base = PrefetchPlan(block_n, block_k, split_k, per_cta, n, k, 1)
    per_step = base.ctas * block_n * block_k * itemsize
    depth = min(-(-budget // per_step), per_cta * base.steps)
    return dataclasses.replace(base, depth=depth)


def _min(a, b: int):
    """min of a Python int or a traced index and an int (the kernel's and the tests' indices)."""
    return min(a, b) if isinstance(a, int) else jnp.minimum(a, b)


def boxes(p: PrefetchPlan, c, ctas: int) -> list[tuple]:
    """(row, col) of every [block_n, box_cols] box CTA ``c`` (an int or a traced index) of a
    kernel with ``ctas`` CTAs prefetches (module docstring)."""
    out = []
    for r in range(-(-p.ctas // ctas)):
        j = _min(c + r * ctas, p.ctas - 1)
        for t in range(p.depth):
            g = _min(j * p.per_cta + t // p.steps, p.units - 1)
            row = (g // p.split_k) * p.block_n
            kb = (g % p.split_k) * p.steps + t % p.steps
            for b in range(p.block_k // p.box_cols):
                out.append((row, kb * p.block_k + b * p.box_cols))
    return out
