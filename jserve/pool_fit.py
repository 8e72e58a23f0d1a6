"""Start-up: the most KV pages whose arrays the device allocator's free blocks take now.

Where it sits: ``builder.build_engine`` sizes the pool from the memory budget
(``plan_pool``), allocates it once before the step programs compile (a trial: the pool's
arrays beside what start-up allocates after them, then freed) and once after, for good. Either
allocation may find the allocator's free memory in holes too small for one of the pool's
per-layer arrays (``kv_cache.PoolDoesNotFit``), which the budget's arithmetic cannot see.
``largest_fitting`` then finds the most pages that do fit by more trial allocations (each a
fill and a free per array, no compile), to within 1 / ``FIT_TOLERANCE`` of the pages asked
for.

Why a search: on an H100 (session 51, 2026-12-06) the bundled model's pool at a 0.15 share,
16 arrays of 0.73 GiB, missed after compiling by tens of MiB (the allocator's largest free
block 11.79 GiB, 30 MiB less than before compiling), and the rule it replaces (drop the arrays
that found no block, plus one) allocated 18.8% fewer pages than planned; the 8B's 40 x 8k pool
of 128 arrays lost 3.9%.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import Mesh

from jserve.config import EngineConfig
from jserve.kv_cache import KVCache, PoolDoesNotFit, allocate_kv_cache
from jserve.spec.draft import DraftModel

FIT_TOLERANCE = 512   # the search stops within 1/512 of the pages that did not fit (0.2%)


def largest_fitting(fits: Callable[[int], bool], failed: int, guess: int,
                    round_pages: Callable[[int], int] = lambda pages: pages) -> int:
    """The most pages below ``failed`` (which did not fit) for which ``fits`` holds, to within
    ``failed // FIT_TOLERANCE`` pages: ``guess`` first (three quarters of ``failed`` when it is
    under 2) and, while that does not fit, three quarters of it in turn; then bisection between
    the most that fit and the fewest that did not. ``round_pages`` maps each candidate to a
    page count the pool may take (``builder.addressable_pages``: at most the candidate).
    Raises MemoryError when fewer than 2 pages would be left."""
    hi = failed
    lo = round_pages(min(guess if guess >= 2 else failed * 3 // 4, failed - 1))
    while True:
        if lo < 2:
            raise MemoryError(f"no KV pool of 2 pages or more fits ({failed} pages did not); lower "
                              "gpu_memory_utilization or set num_pages")
        if fits(lo):
            break
        hi, lo = lo, round_pages(lo * 3 // 4)
    step = max(1, failed // FIT_TOLERANCE)
    while hi - lo > step:
        mid = round_pages((lo + hi) // 2)
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def allocated_pool(config: EngineConfig, mesh: Mesh, draft: DraftModel | None, num_pages: int,
                   hold_bytes: int) -> tuple[KVCache, KVCache | None]:
    """The target's pool of ``num_pages`` pages and the draft model's (or None), allocated;
    ``PoolDoesNotFit`` with neither left allocated. ``hold_bytes`` stay free while the pool
    fills the rest (``allocate_kv_cache``'s hold)."""
    ps, kv_dtype = config.cache.page_size, config.kv_dtype
    draft_kv = None if draft is None else allocate_kv_cache(draft.cfg, num_pages, ps, kv_dtype, mesh)
    try:
        return allocate_kv_cache(config.model, num_pages, ps, kv_dtype, mesh, hold_bytes), draft_kv
    except PoolDoesNotFit:
        for a in jax.tree.leaves(draft_kv):
            a.delete()
        raise


def pool_miss(config: EngineConfig, mesh: Mesh, draft: DraftModel | None, num_pages: int,
              hold_bytes: int) -> PoolDoesNotFit | None:
    """A trial: None when ``allocated_pool`` finds room now, else its miss (nothing stays
    allocated either way)."""
    try:
        pools = allocated_pool(config, mesh, draft, num_pages, hold_bytes)
    except PoolDoesNotFit as e:
        return e
    for a in jax.tree.leaves(pools):
        a.delete()
    return None
