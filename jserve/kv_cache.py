"""The fixed KV page pool on device: sizing from a memory budget and one-time allocation.

Where it sits: allocated once at engine start-up (DESIGN invariant 1), donated into and
returned from every ``step_fn`` call, never reshaped. One ``(k_pages, v_pages)`` pair per
layer, each ``[num_pages, page_size, num_kv_heads, head_dim]`` sharded over kv heads.
Page 0 is the null page: padding tokens write there, nothing reads it.

Pipeline parallelism (a mesh with S > 1 stages): one pair per layer *position within a stage*
(L/S entries), each ``[num_pages, S, page_size, num_kv_heads, head_dim]`` sharded over ``stage``
on axis 1: entry j, slice s is layer s*L/S + j, on stage s's devices only. Each device holds its
own stage's layers; a page id still names the same page in every layer (page moves gather and
scatter along axis 0 as before).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, SingleDeviceSharding

from jserve.config import DTYPE_BYTES, ModelConfig
from pallas_kernels import kv_format
from sharding import logical_sharding_for_shape, num_stages

log = logging.getLogger(__name__)

# Per layer (k_pages, v_pages), plus (k_scales, v_scales) float32[num_pages, Hkv] for an
# int8 / fp8 pool (pallas_kernels/kv_write/scales.py chooses them).
KVCache = list[tuple[jax.Array, ...]]
KV_AXES = ("kv_pages", "page_slot", "kv_heads", "head_dim")
SCALE_AXES = ("kv_pages", "kv_heads")
# fp8 pools are uint8 arrays of e4m3 bits (pallas_kernels/kv_format.py says why).
KV_STORAGE = {"fp8": kv_format.FP8_BITS, "int8": jnp.int8}


def kv_storage_dtype(kv_dtype: str) -> jnp.dtype:
    """The array dtype of a pool of ``kv_dtype`` (an option value: bfloat16, ..., fp8, int8)."""
    return jnp.dtype(KV_STORAGE.get(kv_dtype, kv_dtype))


def kv_quantized(kv_dtype: str) -> bool:
    return kv_dtype in KV_STORAGE


@dataclass(frozen=True)
class PoolPlan:
    """The arithmetic of a pool: what start-up logs and ``jserve plan`` prints."""

    kv_bytes_per_token: int   # all layers, K and V, per device
    page_size: int
    num_pages: int            # including the null page
    max_model_len: int
    budget_pages: int = 0     # the pages the budget held when more than the kernels address (0: none)

    def __post_init__(self) -> None:
        if self.num_pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages (page 0 is the null page), "
                             f"got {self.num_pages}: raise the memory budget or lower the model size")

    @property
    def bytes_per_page(self) -> int:
        return self.kv_bytes_per_token * self.page_size

    @property
    def usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_tokens(self) -> int:
        return self.usable_pages * self.page_size

    @property
    def pool_bytes(self) -> int:
        return self.num_pages * self.bytes_per_page

    @property
    def max_concurrent_seqs(self) -> int:
        """Full ``max_model_len`` sequences that fit at once."""
        return self.usable_pages // math.ceil(self.max_model_len / self.page_size)

    def describe(self) -> str:
        return (f"KV pool: {self.num_pages} pages x {self.page_size} tokens "
                f"({self.usable_pages} usable, page 0 null) = {self.num_tokens} tokens, "
                f"{self.pool_bytes / 2**30:.2f} GiB per device; "
                f"{self.kv_bytes_per_token} B/token; fits {self.max_concurrent_seqs} sequences "
                f"of {self.max_model_len} tokens"
                + (f" (capped from {self.budget_pages} pages: {POOL_CAP_REASON})"
                   if self.budget_pages else ""))


POOL_CAP_REASON = ("the GPU kernels' 32-bit offsets do not reach past 2 GiB of an int8 / fp8 layer "
                   "array of at most 4 GiB")


def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: str, tensor_parallel_size: int = 1,
                       pipeline_parallel_size: int = 1) -> int:
    """K and V bytes of one token over the layers of one device's stage (all layers at pp=1),
    per device (kv heads split when they divide)."""
    layers = cfg.num_layers // pipeline_parallel_size
    return 2 * layers * local_kv_heads(cfg, tensor_parallel_size) * cfg.head_dim * DTYPE_BYTES[kv_dtype]


def kv_scale_bytes_per_page(cfg: ModelConfig, kv_dtype: str, tensor_parallel_size: int = 1,
                            pipeline_parallel_size: int = 1) -> int:
    """Scale bytes of one page (K and V, the stage's layers, per device): 0 unless int8 / fp8."""
    if not kv_quantized(kv_dtype):
        return 0
    return 2 * (cfg.num_layers // pipeline_parallel_size) * local_kv_heads(cfg, tensor_parallel_size) * 4


def local_kv_heads(cfg: ModelConfig, tensor_parallel_size: int = 1) -> int:
    """KV heads of one device's pool: split over tensor parallelism when they divide it, else
    every head (a replicated pool)."""
    heads = cfg.num_kv_heads
    if tensor_parallel_size > 1 and heads % tensor_parallel_size == 0:
        heads //= tensor_parallel_size
    return heads


def addressable_pool_pages(cfg: ModelConfig, kv_dtype: str, page_size: int, num_pages: int,
                           tensor_parallel_size: int = 1) -> int:
    """The most pages, at most ``num_pages``, one device's layer arrays of ``cfg`` may hold for
    the GPU kernels to address them (``kv_format.addressable_pages``: int8 / fp8 arrays of 2-4
    GiB are out of reach; other pools are never limited)."""
    per_page = page_size * local_kv_heads(cfg, tensor_parallel_size) * cfg.head_dim
    return kv_format.addressable_pages(num_pages, per_page, kv_storage_dtype(kv_dtype))


# ``MemoryBudget.headroom_bytes`` = max(activations / HEADROOM_OF_ACTIVATIONS,
# usable / HEADROOM_OF_USABLE): the one definition ``jserve plan``'s text also prints.
HEADROOM_OF_ACTIVATIONS = 4
HEADROOM_OF_USABLE = 256


@dataclass(frozen=True)
class MemoryBudget:
    """Per device, what the KV pool may take (start-up and ``jserve plan`` alike)::

        kv = usable - weights - runner state - activations - headroom - other

    usable: ``gpu_memory_utilization`` of the device (jserve/device_memory.py); activations: the
    step programs' peak beyond their arguments (jserve/activation_peak.py); headroom: room the
    device allocator needs beyond the sum of the peaks (``headroom_bytes``); other: memory the
    device already holds beyond the weights at start-up (0 in a plan)."""

    usable_bytes: int
    weight_bytes: int
    runner_state_bytes: int
    activation_bytes: int
    other_bytes: int = 0

    @property
    def headroom_bytes(self) -> int:
        """Bytes kept free beyond the activation peak: a quarter of it, at least 1/256 of the
        usable bytes (the allocator's fragmentation: a step's temporaries need one contiguous
        block, and free bytes lie in holes between live buffers). With the pool sized to the
        exact peak, Qwen2.5-0.5B's warm-up on an H200 peaked at the whole share (the allocator
        waited for frees); with it (and XLA's rematerialization pass off: the run did not separate
        the two) it left 527 MiB untouched (RESULTS_v2_sessions_9-12.md, session 9). Start-up
        keeps it free only with ``pool_hold_bytes`` held while the pool is allocated (session 10)."""
        return max(self.activation_bytes // HEADROOM_OF_ACTIVATIONS,
                   self.usable_bytes // HEADROOM_OF_USABLE)

    @property
    def pool_hold_bytes(self) -> int:
        """Bytes held free while the pool is allocated (``allocate_kv_cache``): the activations
        and half the headroom. The other half is the pool's slack for holes earlier frees left
        (6 MB on an H200 with the bundled model: the pool and a hold of the whole headroom did
        not fit) and the last array's rounding (RESULTS_v2_sessions_9-12.md, session 10)."""
        return self.activation_bytes + self.headroom_bytes // 2

    @property
    def kv_bytes(self) -> int:
        """Bytes left for the pool; negative when the rest does not fit."""
        return (self.usable_bytes - self.weight_bytes - self.runner_state_bytes
                - self.activation_bytes - self.headroom_bytes - self.other_bytes)

    def describe(self) -> str:
        return (f"memory per device: {self.usable_bytes / 2**30:.2f} GiB usable - "
                f"{self.weight_bytes / 2**30:.2f} weights - {self.runner_state_bytes / 2**20:.1f} MiB "
                f"runner state - {self.activation_bytes / 2**20:.1f} MiB activations - "
                f"{self.headroom_bytes / 2**20:.1f} MiB allocator headroom"
                + (f" - {self.other_bytes / 2**20:.1f} MiB other" if self.other_bytes else "")
                + f" = {self.kv_bytes / 2**30:.2f} GiB for the KV pool")


def pages_for_budget(budget_bytes: int, bytes_per_page: int) -> int:
    return max(0, budget_bytes // bytes_per_page)


def device_bytes_in_use(device: jax.Device) -> int:
    """What ``device`` holds now (0 where the backend does not say). ``device`` must be one of
    this process's devices (a multi-process mesh holds others': pass a local one)."""
    owner = getattr(device, "process_index", jax.process_index())
    if owner != jax.process_index():
        raise ValueError(f"device_bytes_in_use: {device} belongs to process {owner}, "
                         f"not this one ({jax.process_index()}); pass one of jax.local_devices()")
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int((stats or {}).get("bytes_in_use", 0))


def abstract_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, kv_dtype: str,
                      mesh: Mesh) -> KVCache:
    """``allocate_kv_cache``'s shapes, dtypes and shardings, allocating nothing (for lowering and
    compiling before the pool exists). A mesh with S pipeline stages gets the stage-major layout
    of the module docstring."""
    stages = num_stages(mesh)
    if cfg.num_layers % stages:
        raise ValueError(f"num_hidden_layers ({cfg.num_layers}) is not divisible by "
                         f"pipeline_parallel_size ({stages})")
    lead, axes, s_axes = ((num_pages,), KV_AXES, SCALE_AXES) if stages == 1 else (
        (num_pages, stages), (KV_AXES[0], "stage", *KV_AXES[1:]), (SCALE_AXES[0], "stage", *SCALE_AXES[1:]))
    shape = (*lead, page_size, cfg.num_kv_heads, cfg.head_dim)
    pages = jax.ShapeDtypeStruct(shape, kv_storage_dtype(kv_dtype),
                                 sharding=logical_sharding_for_shape(mesh, shape, axes))
    entries = cfg.num_layers // stages
    if not kv_quantized(kv_dtype):
        return [(pages, pages) for _ in range(entries)]
    s_shape = (*lead, cfg.num_kv_heads)
    scales = jax.ShapeDtypeStruct(s_shape, jnp.float32,
                                  sharding=logical_sharding_for_shape(mesh, s_shape, s_axes))
    return [(pages, pages, scales, scales) for _ in range(entries)]


class PoolDoesNotFit(MemoryError):
    """``allocate_kv_cache``: the allocator had no free block for one of the pool's arrays
    although the budget's sum fits (its free memory is fragmented). ``fitted`` of ``total``
    arrays were allocated (and freed again) before the one that failed."""

    def __init__(self, fitted: int, total: int, array_bytes: int) -> None:
        super().__init__(f"the KV pool's arrays of {array_bytes / 2**30:.2f} GiB: {fitted} of {total} "
                         "found a free block in the device allocator (its free memory is fragmented)")
        self.fitted, self.total, self.array_bytes = fitted, total, array_bytes

    def pages_that_fit(self, num_pages: int) -> int:
        """A smaller page count to try: the pool shrunk by the arrays that found no block plus
        one (the arrays that did fit, each a little smaller, leave room for the rest)."""
        return num_pages * (self.fitted - 1) // self.total


def allocate_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, kv_dtype: str,
                      mesh: Mesh, keep_free_bytes: int = 0) -> KVCache:
    """Zero-filled pool with ``abstract_kv_cache``'s layout, created directly on device with its
    sharding (scales of a quantized pool start at 1; every page's is set when the page is
    started). Raises ``PoolDoesNotFit`` (nothing left allocated) when an array finds no block.

    ``keep_free_bytes`` (per device): memory the step programs need after the pool, held by a
    placeholder while the pool is allocated. Without it, the pool's last array takes the free
    block at the end of the allocator's region, and the BFC allocator hands out a whole block
    when the excess is under 128 MiB or under the request's own size: that array swallowed the
    activations' and headroom's 108 MiB, and the bundled model's first step ran out of memory at
    a 0.15 share (RESULTS_v2_sessions_9-12.md, session 10). Start-up passes
    ``MemoryBudget.pool_hold_bytes``. The allocations run asynchronously: each layer's arrays
    are waited for before the next (so that a failure names its array) and the hold is
    released only after the last (H200, session 21: released at dispatch, the 8B's last array
    at a 0.9 share surfaced its out-of-memory error in the first warm-up step)."""
    layout = abstract_kv_cache(cfg, num_pages, page_size, kv_dtype, mesh)
    # One program per array kind: pages start at 0, a quantized pool's scales at 1.
    fills = [_filler(a, 1 if i >= 2 else 0) for i, a in enumerate(layout[0])]
    hold = _placeholders(mesh, keep_free_bytes) if keep_free_bytes > 0 else []
    pool: list[list[jax.Array]] = []
    fitted = 0
    try:
        for _ in layout:
            pool.append([])
            for fill in fills:
                pool[-1].append(fill())
            jax.block_until_ready(pool[-1])
            fitted += len(fills)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        for a in jax.tree.leaves(pool):
            a.delete()
        pages = layout[0][0]
        shard = math.prod(pages.sharding.shard_shape(pages.shape)) * pages.dtype.itemsize
        raise PoolDoesNotFit(fitted, len(fills) * len(layout), shard) from e
    finally:
        for a in hold:
            a.delete()
    return [tuple(entry) for entry in pool]


def _filler(like: jax.ShapeDtypeStruct, value: int) -> Callable[[], jax.Array]:
    """A program that creates an array of ``like``'s shape, dtype and sharding filled with
    ``value`` on its devices."""
    return jax.jit(lambda: jnp.full(like.shape, value, like.dtype), out_shardings=like.sharding)


def _placeholders(mesh: Mesh, nbytes: int) -> list[jax.Array]:
    """uint8[nbytes] on each of this process's devices of ``mesh`` (one program per device: the
    size comes from this process's own budget, so no program may span processes)."""
    return [jax.jit(lambda: jnp.zeros((nbytes,), jnp.uint8), out_shardings=SingleDeviceSharding(d))()
            for d in mesh.devices.flat if d.process_index == jax.process_index()]
