"""The engine's narrow API for front-ends: start-up facts, per-step snapshots, health.

Where it sits: between ``LLMEngine`` / ``AsyncEngine`` and their front-ends (server/, the
start-up banner, metrics exporters). Front-ends read the engine only through these values plus
add / abort / stream; they never reach into the scheduler, the page pool or the runner::

    build_engine --BuildInfo--> LLMEngine(..., build) --> engine.startup   StartupInfo  (once)
                                LLMEngine.stats() ----------------------> EngineStats  (per step)
                                AsyncEngine.health() -------------------> EngineHealth

All three are immutable values: safe to hand to another thread once made. ``QueueFullError``
(the waiting queue is full: HTTP 429 upstream) is re-exported here so front-ends name it without
importing the scheduler.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from jserve.config import EngineConfig
from jserve.kv_cache import MemoryBudget, PoolPlan, kv_bytes_per_token
from jserve.scheduler import QueueFullError as QueueFullError  # re-export: add_request raises it


@dataclass(frozen=True)
class BuildInfo:
    """What ``build_engine`` planned and measured before the engine existed."""

    pool_plan: PoolPlan
    startup_seconds: float = 0.0    # load + compile, up to the engine's construction
    compile_seconds: float = 0.0    # the runner's warm-up (every bucket)
    memory: MemoryBudget | None = None   # the pool's budget (None: num_pages given, or no limit)


@dataclass(frozen=True)
class StartupInfo:
    """Facts fixed at construction: what the banner, ``jserve plan`` and /metrics report."""

    pool_plan: PoolPlan             # the KV pool's arithmetic (``describe()`` is the log line)
    max_model_len: int              # effective: capped at what the pool holds
    max_num_seqs: int
    startup_seconds: float
    compile_seconds: float
    max_waiting: int                # sequences the waiting queue holds (QueueFullError past it)
    memory: MemoryBudget | None = None   # usable - weights - state - activations -> KV bytes

    @property
    def kv_pages_total(self) -> int:
        """Usable KV pages (the null page excluded)."""
        return self.pool_plan.usable_pages

    @property
    def kv_tokens_total(self) -> int:
        return self.pool_plan.num_tokens

    def describe_pool(self) -> str:
        return self.pool_plan.describe()

    @staticmethod
    def create(build: BuildInfo | None, config: EngineConfig, num_pages: int,
               max_model_len: int) -> StartupInfo:
        """From the builder's facts; without them (an engine made by hand) the pool plan is
        derived from ``config`` and ``num_pages`` and the timings are 0."""
        if build is None:
            per_token = kv_bytes_per_token(config.model, config.kv_dtype,
                                           config.parallel.tensor_parallel_size)
            build = BuildInfo(PoolPlan(per_token, config.cache.page_size, num_pages,
                                       config.scheduler.max_model_len))
        return StartupInfo(build.pool_plan, max_model_len, config.scheduler.max_num_seqs,
                           build.startup_seconds, build.compile_seconds, config.scheduler.max_waiting,
                           build.memory)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine between steps (cheap: made every step)."""

    num_running: int                # sequences in the running batch
    num_waiting: int                # sequences queued (new or preempted)
    kv_pages_used: int
    kv_pages_free: int              # empty + evictable (cached, unowned)
    kv_pages_total: int             # usable pages (the null page excluded)
    num_preemptions_total: int      # since start-up (monotonic)
    # ``LLMEngine.kv_cache_stats()``: prefix-cache / swap / CoW counters (monotonic) and gauges.
    kv_cache: Mapping[str, int] = field(default_factory=dict)
    step_tokens: int = 0            # tokens (prefill + decode) of the last dispatched step

    def __post_init__(self) -> None:
        object.__setattr__(self, "kv_cache", MappingProxyType(dict(self.kv_cache)))  # read-only copy

    @property
    def kv_usage(self) -> float:
        """Fraction of usable pages in use, 0-1."""
        return self.kv_pages_used / max(self.kv_pages_total, 1)


class EngineHealth(enum.Enum):
    """What /health and gRPC health report."""

    SERVING = "serving"             # running and accepting requests
    DRAINING = "draining"           # shutting down: in-flight requests finish, new ones refused
    STOPPED = "engine stopped"      # the engine loop has ended (shut down or crashed)
