"""build_engine: model directory (or named shape) + options -> a warmed-up LLMEngine.

Where it sits: start-up, used by ``LLM``, the CLI and the server. Order matters for memory:
params are loaded first, then the KV pool takes its budget of what is left (DESIGN
invariant 1), then every bucket is compiled (invariant 4).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax

from checkpoints import HFModelDir
from jserve.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from jserve.engine import LLMEngine
from jserve.engine_api import BuildInfo
from jserve.kv_cache import (
    PoolPlan,
    allocate_kv_cache,
    device_memory_budget,
    kv_bytes_per_token,
    pages_for_budget,
)
from jserve.model.params import load_params, params_bytes, random_params
from jserve.model.shapes import NAMED_SHAPES, named_shape
from jserve.options import EngineArgs
from jserve.penalty_state import state_bytes
from jserve.runner import Runner
from jserve.tokenizer import TOKENIZER_FILE, Tokenizer
from sharding import make_mesh

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("code-small", "code-draft")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jserve", "xla")


def _enable_compilation_cache(path: str | None) -> None:
    path = default_cache_dir() if path is None else path
    if not path:
        return
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def default_model_path(name: str = "code-small") -> Path:
    """The bundled model directory (package data): ``code-small`` or its draft ``code-draft``."""
    if name not in DEFAULT_MODELS:
        raise ValueError(f"model: no bundled model {name!r}; bundled: {', '.join(DEFAULT_MODELS)}")
    return Path(__file__).resolve().parent / "default_model" / name


def resolve_model(args: EngineArgs) -> tuple[ModelConfig, HFModelDir | None]:
    if args.model is None:
        path = default_model_path()
        if not (path / "config.json").is_file():
            raise ValueError(f"model: no model given and the bundled default model is missing "
                             f"from this install ({path}); pass an HF model directory")
        args = dataclasses.replace(args, model=str(path))
    if args.model in DEFAULT_MODELS and not Path(args.model).exists():
        args = dataclasses.replace(args, model=str(default_model_path(args.model)))
    if args.model.lower() in NAMED_SHAPES and not Path(args.model).exists():
        if not args.random_weights:
            raise ValueError(f"model: {args.model!r} is a named shape; pass random_weights=True "
                             "to run it with random weights, or an HF model directory")
        return named_shape(args.model, args.dtype), None
    if not Path(args.model).exists():
        raise ValueError(f"model: {args.model!r} is neither a model directory nor a known name; "
                         f"named shapes (with random_weights=True): {', '.join(sorted(NAMED_SHAPES))}; "
                         f"bundled models: {', '.join(DEFAULT_MODELS)}")
    model_dir = HFModelDir(args.model)
    if TOKENIZER_FILE not in model_dir.tokenizer_files:
        raise ValueError(f"model: {model_dir.path / TOKENIZER_FILE} is missing (a model directory "
                         "needs its tokenizer); copy it from the model's repository")
    cfg = ModelConfig.from_hf_config(model_dir.config, source=str(Path(args.model) / "config.json"),
                                     dtype=args.dtype)
    return cfg, model_dir


def make_engine_config(args: EngineArgs, model_cfg: ModelConfig) -> EngineConfig:
    """The engine's configuration from the user's options (``EngineArgs``, declared in
    jserve/options.py) and the model; fills in the derived ``max_model_len`` and token budget."""
    max_len = args.max_model_len or min(model_cfg.max_position_embeddings, 4096)
    budget = args.max_num_batched_tokens or max(512, args.max_num_seqs)
    return EngineConfig(
        model=model_cfg,
        cache=CacheConfig(page_size=args.page_size, num_pages=args.num_pages,
                          kv_cache_memory_fraction=args.kv_cache_memory_fraction,
                          kv_cache_dtype=args.kv_cache_dtype,
                          enable_prefix_caching=args.enable_prefix_caching,
                          swap_space_gb=args.swap_space_gb, host_kv_cache_gb=args.host_kv_cache_gb,
                          preemption_mode=args.preemption_mode),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=budget,
                                  max_model_len=max_len, max_waiting=args.max_waiting,
                                  flash_prefill_min_tokens=args.flash_prefill_min_tokens,
                                  async_scheduling=args.async_scheduling),
        parallel=ParallelConfig(args.tensor_parallel_size), seed=args.seed)


def runner_state_bytes(config: EngineConfig) -> int:
    """Device bytes the runner allocates beside the weights and the pool (per device): the
    per-slot penalty statistics. Start-up and ``jserve plan`` both take them off the budget."""
    return state_bytes(config.scheduler.max_num_seqs, config.model.vocab_size)


def plan_pool(config: EngineConfig, weight_bytes: int, device: jax.Device) -> PoolPlan:
    """Pages from ``num_pages`` or from the device memory left after the weights and the
    runner's state."""
    budget = None
    if config.cache.num_pages is None:
        budget = device_memory_budget(device, config.cache.kv_cache_memory_fraction,
                                      weight_bytes + runner_state_bytes(config))
    return pool_plan_for_budget(config, budget)


def pool_plan_for_budget(config: EngineConfig, budget_bytes: int | None) -> PoolPlan:
    """The pool's arithmetic (shared by start-up and ``jserve plan``): ``num_pages`` when set,
    else as many pages as ``budget_bytes`` holds; None (no device limit, CPU) gives every
    sequence its full length."""
    per_token = kv_bytes_per_token(config.model, config.kv_dtype,
                                   config.parallel.tensor_parallel_size)
    page_bytes = per_token * config.cache.page_size
    if config.cache.num_pages is not None:
        num_pages = config.cache.num_pages
    elif budget_bytes is None:
        num_pages = config.scheduler.max_num_seqs * config.pages_per_seq + 1
    else:
        num_pages = pages_for_budget(budget_bytes, page_bytes)
    return PoolPlan(per_token, config.cache.page_size, num_pages, config.scheduler.max_model_len)


def build_engine(args: EngineArgs, progress: Callable[[str], None] | None = None) -> LLMEngine:
    """Load, size the pool, compile every step variant (``progress`` gets a line per compiled
    step; default: the log) -> a warmed-up engine."""
    t0 = time.perf_counter()
    _enable_compilation_cache(args.compilation_cache_dir)
    model_cfg, model_dir = resolve_model(args)
    config = make_engine_config(args, model_cfg)
    mesh = make_mesh(config.parallel.tensor_parallel_size)
    if model_dir is not None:
        params = load_params(model_dir, model_cfg, mesh)
        tokenizer = Tokenizer.from_dir(model_dir.path)
    else:
        params = random_params(model_cfg, mesh, seed=args.seed)
        tokenizer = None
    weight_bytes = params_bytes(params) // config.parallel.tensor_parallel_size
    plan = plan_pool(config, weight_bytes, mesh.devices.flat[0])
    log.info("model %s (%s, %.2f GB of weights), %s",
             model_dir.path if model_dir is not None else args.model, model_cfg.dtype,
             params_bytes(params) / 1e9, plan.describe())
    kv = allocate_kv_cache(model_cfg, plan.num_pages, config.cache.page_size, config.kv_dtype, mesh)
    runner = Runner(config, params, kv, mesh)
    compile_s = runner.warmup(progress)
    build = BuildInfo(plan, startup_seconds=time.perf_counter() - t0, compile_seconds=compile_s)
    engine = LLMEngine(config, runner, tokenizer, plan.num_pages, build)
    log.info("engine ready in %.1f s (compile %.1f s)", build.startup_seconds, compile_s)
    return engine
