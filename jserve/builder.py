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
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from checkpoints import HFModelDir
from checkpoints.orbax_dir import OrbaxModelDir, is_orbax_dir
from jserve import gc_heap
from jserve.activation_peak import measure_activation_bytes
from jserve.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from jserve.data_parallel import DataParallelEngine
from jserve.device_memory import allocator_limited, allocator_report, allow_device_memory, usable_device_bytes
from jserve.engine import LLMEngine
from jserve.engine_api import BuildInfo
from jserve.executable_cache import ExecutableCache
from jserve.kv_cache import (
    POOL_CAP_REASON,
    MemoryBudget,
    PoolDoesNotFit,
    PoolPlan,
    abstract_kv_cache,
    addressable_pool_pages,
    device_bytes_in_use,
    kv_bytes_per_token,
    kv_scale_bytes_per_page,
    pages_for_budget,
)
from jserve.model.kv_replicas import replicate_kv_heads, serving_model_config
from jserve.model.linear import unstack_fp8_dot_weights
from jserve.model.orbax_params import restore_params
from jserve.model.params import Params, load_params, params_bytes, random_params
from jserve.model.shapes import NAMED_SHAPES, named_shape
from jserve.multiprocess import LeaderRunner, StepChannel, follow
from jserve.options import EngineArgs
from jserve.penalty_state import state_bytes
from jserve.pool_fit import FIT_TOLERANCE, allocated_pool, largest_fitting, pool_miss
from jserve.runner import Runner
from jserve.spec.config import SpeculativeConfig, spec_state_bytes
from jserve.spec.draft import DraftModel, resolve_draft
from jserve.startup_cache import StartupCache, engine_fingerprint
from jserve.structured.automaton_pool import device_states, table_bytes
from jserve.structured.logit_state import logit_state_bytes
from jserve.tokenizer import TOKENIZER_FILE, Tokenizer
from sharding import make_mesh
from sharding.multihost import check_launch, initialize_multihost, launch_values

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("code-small", "code-draft")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jserve", "xla")


def _enable_compilation_cache(path: str | None) -> str | None:
    """Turn on JAX's persistent cache in ``path`` (None: ``default_cache_dir()``; "": off) -> the
    folder, or None when off. Every program is kept, however fast it compiled: a warm start
    would otherwise compile the small ones (slot writers, penalty inits, the page mover) again."""
    path = default_cache_dir() if path is None else path
    if not path:
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def default_model_path(name: str = "code-small") -> Path:
    """The bundled model directory (package data): ``code-small`` or its draft ``code-draft``."""
    if name not in DEFAULT_MODELS:
        raise ValueError(f"model: no bundled model {name!r}; bundled: {', '.join(DEFAULT_MODELS)}")
    return Path(__file__).resolve().parent / "default_model" / name


def resolve_model(args: EngineArgs) -> tuple[ModelConfig, HFModelDir | OrbaxModelDir | None]:
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
    if is_orbax_dir(args.model):   # written by `jserve convert`
        orbax_dir = OrbaxModelDir(args.model)
        cfg = ModelConfig.from_hf_config(orbax_dir.config, source=str(orbax_dir.path / "config.json"),
                                         dtype=args.dtype or orbax_dir.dtype)
        return cfg, orbax_dir
    model_dir = HFModelDir(args.model)
    if TOKENIZER_FILE not in model_dir.tokenizer_files:
        raise ValueError(f"model: {model_dir.path / TOKENIZER_FILE} is missing (a model directory "
                         "needs its tokenizer); copy it from the model's repository")
    cfg = ModelConfig.from_hf_config(model_dir.config, source=str(Path(args.model) / "config.json"),
                                     dtype=args.dtype)
    return cfg, model_dir


def memory_utilization(args: EngineArgs) -> float:
    """``gpu_memory_utilization``, or the deprecated ``kv_cache_memory_fraction`` when given
    (with a FutureWarning)."""
    if args.kv_cache_memory_fraction is None:
        return args.gpu_memory_utilization
    warnings.warn(
        f"kv_cache_memory_fraction is deprecated: it now sets gpu_memory_utilization, the share of "
        f"each device's memory for weights, activations and the KV pool (default 0.9); using "
        f"gpu_memory_utilization={args.kv_cache_memory_fraction}", FutureWarning, stacklevel=3)
    return args.kv_cache_memory_fraction


def make_engine_config(args: EngineArgs, model_cfg: ModelConfig) -> EngineConfig:
    """The engine's configuration from the user's options (``EngineArgs``, declared in
    jserve/options.py) and the checkpoint's model; fills in the derived ``max_model_len`` and
    token budget. ``config.model`` is the model as served: KV heads replicated when
    ``tensor_parallel_size`` exceeds them (jserve/model/kv_replicas.py)."""
    model_cfg = serving_model_config(model_cfg, args.tensor_parallel_size)
    max_len = args.max_model_len or min(model_cfg.max_position_embeddings, 4096)
    budget = args.max_num_batched_tokens or max(512, args.max_num_seqs)
    return EngineConfig(
        model=model_cfg,
        cache=CacheConfig(page_size=args.page_size, num_pages=args.num_pages,
                          gpu_memory_utilization=memory_utilization(args),
                          activation_memory_bytes=args.activation_memory_bytes,
                          kv_cache_dtype=args.kv_cache_dtype,
                          enable_prefix_caching=args.enable_prefix_caching,
                          swap_space_gb=args.swap_space_gb, host_kv_cache_gb=args.host_kv_cache_gb,
                          preemption_mode=args.preemption_mode),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=budget,
                                  max_model_len=max_len, max_waiting=args.max_waiting,
                                  # pp > 1: micro-batches cut prompts, so the paged kernel
                                  # reads them back (docs/architecture.md, pipeline parallelism)
                                  flash_prefill_min_tokens=(args.flash_prefill_min_tokens
                                                            if args.pipeline_parallel_size == 1 else 0),
                                  async_scheduling=args.async_scheduling,
                                  num_scheduler_steps=args.num_scheduler_steps,
                                  grammar_device_states=args.grammar_device_states),
        parallel=ParallelConfig(args.tensor_parallel_size, data_parallel_size=args.data_parallel_size,
                                prefill_devices=args.prefill_devices, decode_devices=args.decode_devices,
                                pipeline_parallel_size=args.pipeline_parallel_size,
                                coordinator_address=args.coordinator_address,
                                num_processes=args.num_processes, process_id=args.process_id,
                                distributed_timeout_s=args.distributed_timeout_s),
        seed=args.seed, speculative=speculative_config(args))


def speculative_config(args: EngineArgs) -> SpeculativeConfig | None:
    """The parsed ``speculative_config`` option (None: off)."""
    if args.speculative_config is None:
        return None
    return SpeculativeConfig.from_json(args.speculative_config)


def runner_state_bytes(config: EngineConfig, processes: int = 1) -> int:
    """Device bytes the runner allocates beside the weights and the pool (per device): the
    per-slot penalty statistics, token masks and logit biases (and speculative decoding's draft
    q and verify masks), and the token-automaton table. Start-up and ``jserve plan`` both take
    them off the budget."""
    return (state_bytes(config.scheduler.max_num_seqs, config.model.vocab_size)
            + logit_state_bytes(config.scheduler.max_num_seqs, config.model.vocab_size)
            + spec_state_bytes(config.speculative, config.scheduler.max_num_seqs,
                               config.model.vocab_size, config.scheduler.max_model_len)
            + table_bytes(device_states(config, processes), config.model.vocab_size))


def memory_budget(config: EngineConfig, weight_bytes: int, device: jax.Device,
                  activations: Callable[[], int]) -> MemoryBudget | None:
    """The pool's memory budget on ``device`` (None: the backend reports no limit, CPU):
    ``gpu_memory_utilization`` of it less the weights, the runner's state, the activation peak
    (``activation_memory_bytes``, else ``activations()``: measured) and whatever else the device
    holds beyond the weights."""
    usable = usable_device_bytes(device, config.cache.gpu_memory_utilization)
    if usable is None:
        return None
    other = max(0, device_bytes_in_use(device) - weight_bytes)
    act = config.cache.activation_memory_bytes
    return MemoryBudget(usable, weight_bytes, runner_state_bytes(config, jax.process_count()),
                        activations() if act is None else act, other)


def memory_after_warmup(device: jax.Device, budget: MemoryBudget) -> str:
    """A start-up log line: the device's peak and current use after every program ran once,
    against the usable bytes the pool was sized for (the activation budget's unused part is the
    margin left to serving)."""
    stats = device.memory_stats() or {}
    peak, now = int(stats.get("peak_bytes_in_use", 0)), int(stats.get("bytes_in_use", 0))
    return (f"device memory after warm-up: {now / 2**30:.2f} GiB in use, peak {peak / 2**30:.2f} "
            f"GiB of {budget.usable_bytes / 2**30:.2f} GiB usable "
            f"({(budget.usable_bytes - peak) / 2**20:.1f} MiB never touched)")


def plan_pool(config: EngineConfig, budget: MemoryBudget | None,
              draft: ModelConfig | None = None) -> PoolPlan:
    """Pages from ``num_pages``, else from the budget's KV bytes (None: no device limit)."""
    return pool_plan_for_budget(config, None if budget is None else budget.kv_bytes, draft)


def pool_plan_for_budget(config: EngineConfig, budget_bytes: int | None,
                         draft: ModelConfig | None = None) -> PoolPlan:
    """The pool's arithmetic (shared by start-up and ``jserve plan``): ``num_pages`` when set,
    else as many pages as ``budget_bytes`` holds; None (no device limit, CPU) gives every
    sequence its full length. ``draft``: speculative decoding's draft model, whose pool has a
    twin page per page (its bytes count per token too). int8/fp8 pools add their per-page
    scales."""
    per_token = _bytes_per_token(config, draft)
    page_bytes = pool_page_bytes(config, draft)
    if config.cache.num_pages is not None:
        wanted = config.cache.num_pages
    elif budget_bytes is None:
        wanted = config.scheduler.max_num_seqs * config.pages_per_seq + 1
    else:
        wanted = pages_for_budget(budget_bytes, page_bytes)
    num_pages = addressable_pages(config, draft, wanted)
    if num_pages < wanted and config.cache.num_pages is not None:
        raise ValueError(f"num_pages={wanted} is more pages than a {config.kv_dtype} pool's layer "
                         f"arrays may hold ({POOL_CAP_REASON}): use num_pages <= {num_pages}")
    return PoolPlan(per_token, config.cache.page_size, num_pages, config.scheduler.max_model_len,
                    wanted if num_pages < wanted else 0)


def addressable_pages(config: EngineConfig, draft: ModelConfig | None, num_pages: int) -> int:
    """The most pages, at most ``num_pages``, the pool's arrays (the draft's twin pool's too)
    may hold for the GPU kernels to address them (``kv_cache.addressable_pool_pages``)."""
    tp, page_size = config.parallel.tensor_parallel_size, config.cache.page_size
    for cfg in (config.model,) if draft is None else (config.model, draft):
        num_pages = addressable_pool_pages(cfg, config.kv_dtype, page_size, num_pages, tp)
    return num_pages


def _bytes_per_token(config: EngineConfig, draft: ModelConfig | None) -> int:
    """K and V bytes of a token per device, the draft model's twin pool's included."""
    tp, pp = config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size
    per_token = kv_bytes_per_token(config.model, config.kv_dtype, tp, pp)
    return per_token + (0 if draft is None else kv_bytes_per_token(draft, config.kv_dtype, tp))


def pool_page_bytes(config: EngineConfig, draft: ModelConfig | None = None) -> int:
    """Device bytes of one pool page per device: K and V of its tokens (the draft's twin page
    too) and, for int8 / fp8 pools, its per-page scales."""
    tp, pp = config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size
    scale_bytes = kv_scale_bytes_per_page(config.model, config.kv_dtype, tp, pp)
    if draft is not None:
        scale_bytes += kv_scale_bytes_per_page(draft, config.kv_dtype, tp)
    return _bytes_per_token(config, draft) * config.cache.page_size + scale_bytes


def _load_checkpoint(model_dir: HFModelDir | OrbaxModelDir, cfg: ModelConfig, mesh: Mesh,
                     quantization: str | None, quantize_lm_head: bool = False) -> Params:
    """The checkpoint layout of ``cfg`` on ``mesh``: restored from orbax, or streamed from HF
    (quantized on load when ``quantization`` is set; the lm_head too with ``quantize_lm_head``)."""
    if isinstance(model_dir, OrbaxModelDir):
        for name, value in (("quantization", quantization), ("quantize_lm_head", quantize_lm_head)):
            if value not in (None, False):
                raise ValueError(f"{name}={value!r} quantizes on load from a Hugging Face "
                                 f"checkpoint; {model_dir.path} is an orbax checkpoint (convert the "
                                 "HF checkpoint instead)")
        return restore_params(model_dir, cfg, mesh)
    return load_params(model_dir, cfg, mesh, quantization, quantize_lm_head)


def _build_data_parallel(args: EngineArgs, progress: Callable[[str], None] | None) -> DataParallelEngine:
    """``data_parallel_size`` replicas, replica i on devices ``[i*tp, (i+1)*tp)``."""
    dp, tp = args.data_parallel_size, args.tensor_parallel_size * args.pipeline_parallel_size
    if check_launch(*launch_values(args.coordinator_address, args.num_processes, args.process_id)):
        raise ValueError("data_parallel_size > 1 is not supported in a multi-process job yet: run one "
                         "job per replica")
    devices = jax.devices()
    if dp * tp > len(devices):
        pp = (f" x pipeline_parallel_size={args.pipeline_parallel_size}"
              if args.pipeline_parallel_size > 1 else "")
        raise ValueError(f"data_parallel_size={dp} x tensor_parallel_size={args.tensor_parallel_size}"
                         f"{pp} needs {dp * tp} devices "
                         f"but only {len(devices)} {devices[0].platform} device(s) are available")
    one = dataclasses.replace(args, data_parallel_size=1)
    replicas = []
    for i in range(dp):
        say = progress or log.info
        say(f"data-parallel replica {i + 1}/{dp} on devices {[d.id for d in devices[i * tp:(i + 1) * tp]]}")
        replicas.append(build_engine(one, progress, devices=devices[i * tp:(i + 1) * tp]))
    return DataParallelEngine(replicas)


def _join_job(args: EngineArgs) -> StepChannel | None:
    """Join the multi-process job the launch values (options, else ``JSERVE_*`` variables)
    describe -> its step channel; None for a single process."""
    values = launch_values(args.coordinator_address, args.num_processes, args.process_id)
    if not check_launch(*values):
        return None
    if not jax.distributed.is_initialized():
        initialize_multihost(*values, timeout_s=args.distributed_timeout_s)
    return StepChannel(args.distributed_timeout_s)


def _check_mesh_spans_job(mesh: Mesh) -> None:
    used = {d.process_index for d in mesh.devices.flat}
    if len(used) != jax.process_count():
        raise ValueError(f"tensor_parallel_size={mesh.size} puts the mesh on the devices of process(es) "
                         f"{sorted(used)} only, but the job has {jax.process_count()} processes with "
                         f"{len(jax.devices())} devices in all: every process must hold part of the mesh "
                         f"(e.g. tensor_parallel_size={len(jax.devices())})")


def _local_device(mesh: Mesh) -> jax.Device:
    """A device of the mesh this process can address (memory stats exist only for those)."""
    return next(d for d in mesh.devices.flat if d.process_index == jax.process_index())


POOL_ATTEMPTS = 3   # pool allocations tried (each after the first with fewer pages, compiled again)


def _runner(config: EngineConfig, params: Any, mesh: Mesh, draft: DraftModel | None,
            plan: PoolPlan) -> Runner:
    """The runner over ``plan``'s pool shapes, its own state (penalty, slot and logit state,
    the token-automaton table) allocated, the pool not: it is allocated after the step programs
    compile, since XLA's GPU autotuner needs device memory for its trial buffers, which a pool
    sized to the budget would leave it without."""
    _set_pool_shapes(None, config, mesh, draft, plan)
    return Runner(config, params, abstract_kv_cache(config.model, plan.num_pages, config.cache.page_size,
                                                    config.kv_dtype, mesh), mesh, draft)


def _set_pool_shapes(runner: Runner | None, config: EngineConfig, mesh: Mesh, draft: DraftModel | None,
                     plan: PoolPlan) -> None:
    """The runner's (and the draft model's) abstract pool of ``plan.num_pages`` pages: what the
    next ``compile`` lowers over (the runner's state does not depend on the page count)."""
    ps, kv_dtype = config.cache.page_size, config.kv_dtype
    if draft is not None:
        draft.kv = abstract_kv_cache(draft.cfg, plan.num_pages, ps, kv_dtype, mesh)
    if runner is not None:
        runner.kv = abstract_kv_cache(config.model, plan.num_pages, ps, kv_dtype, mesh)


def _compile(runner: Runner, config: EngineConfig, params: Any, mesh: Mesh, draft: DraftModel | None,
             plan: PoolPlan, budget: MemoryBudget | None, cache_dir: str | None, channel: Any,
             progress: Callable[[str], None] | None) -> float:
    """Every step variant compiled over the runner's abstract pool (``plan``'s pages) -> seconds."""
    runner.executables = None
    if cache_dir and channel is None and mesh.devices.flat[0].platform in ("gpu", "tpu"):
        runner.executables = ExecutableCache(cache_dir, engine_fingerprint(
            config, params, mesh, draft.cfg if draft else None, f"num_pages={plan.num_pages}",
            [d.id for d in mesh.devices.flat]))   # (a data-parallel replica's own devices)
    compile_s = runner.compile(progress)
    if budget is not None:
        log.log(logging.WARNING if runner.steps_peak > budget.activation_bytes else logging.INFO,
                "the compiled step programs' activation peak: %.1f MiB per device, of %.1f MiB held "
                "for activations (activation_memory_bytes)", runner.steps_peak / 2**20,
                budget.activation_bytes / 2**20)
    return compile_s


def _pages_that_fit(config: EngineConfig, mesh: Mesh, draft: DraftModel | None, failed: int,
                    guess: int, hold_bytes: int) -> int:
    """``pool_fit.largest_fitting`` by trial allocations of the pool beside ``hold_bytes``."""
    def fits(pages: int) -> bool:
        return pool_miss(config, mesh, draft, pages, hold_bytes) is None

    return largest_fitting(fits, failed, guess,
                           lambda pages: addressable_pages(config, draft.cfg if draft else None, pages))


def _plan_that_fits(config: EngineConfig, mesh: Mesh, draft: DraftModel | None, plan: PoolPlan,
                    budget: MemoryBudget | None) -> PoolPlan:
    """``plan`` with the pages the allocator's free blocks take now, the runner's state already
    allocated: the pool is allocated once and freed again before the step programs compile.
    Llama-3.1-8B on an H200 at a 0.8 share (session 37, bf16 and w8a8 alike): 62 of the pool's
    64 arrays found a block in every start-up, and the retry after compiling (``build_engine``)
    compiled every program twice. Holes the compile itself leaves are still caught there."""
    hold = 0 if budget is None else budget.pool_hold_bytes
    e = pool_miss(config, mesh, draft, plan.num_pages, hold)
    if e is None:
        return plan
    pages = _pages_that_fit(config, mesh, draft, plan.num_pages, e.pages_that_fit(plan.num_pages), hold)
    log.warning("%s: planning %d pages instead of %d (%.1f%% fewer) before the step programs "
                "compile", e, pages, plan.num_pages, 100 * (1 - pages / plan.num_pages))
    return dataclasses.replace(plan, num_pages=pages)


def build_engine(args: EngineArgs, progress: Callable[[str], None] | None = None,
                 devices: Sequence[jax.Device] | None = None) -> LLMEngine | DataParallelEngine:
    """Load, size the pool, compile every step variant (``progress`` gets a line per compiled
    step; default: the log) -> a warmed-up engine on ``devices`` (default: the first
    ``tensor_parallel_size`` of ``jax.devices()``).

    ``data_parallel_size`` > 1: that many engines on disjoint devices behind one
    ``DataParallelEngine`` (jserve/data_parallel.py).

    In a multi-process job (jserve/multiprocess.py) every process builds the same engine; on
    processes other than 0 this never returns: the process runs process 0's steps until
    process 0 stops, then exits (``SystemExit(0)``)."""
    gc_heap.thaw()   # an earlier engine's cyclic garbage (and its device buffers) goes first
    engine = _build_engine(args, progress, devices)
    gc_heap.freeze()   # start-up's long-lived objects out of every later collection (gc_heap.py)
    return engine


def _build_engine(args: EngineArgs, progress: Callable[[str], None] | None = None,
                  devices: Sequence[jax.Device] | None = None) -> LLMEngine | DataParallelEngine:
    """``build_engine`` without the heap's collection and freeze."""
    # Before any JAX device call (make_engine_config warns about the deprecated alias).
    allow_device_memory(args.kv_cache_memory_fraction or args.gpu_memory_utilization)
    if args.prefill_devices is not None or args.decode_devices is not None:
        from jserve.disagg.builder import build_disaggregated  # it builds one engine per group here
        return build_disaggregated(args, progress)
    if args.data_parallel_size > 1:
        return _build_data_parallel(args, progress)
    t0 = time.perf_counter()
    channel = _join_job(args)
    cache_dir = _enable_compilation_cache(args.compilation_cache_dir)
    model_cfg, model_dir = resolve_model(args)
    config = make_engine_config(args, model_cfg)
    mesh = make_mesh(config.parallel.tensor_parallel_size, devices,
                     config.parallel.pipeline_parallel_size)
    if channel is not None:
        _check_mesh_spans_job(mesh)
    if model_dir is not None:
        params = replicate_kv_heads(_load_checkpoint(model_dir, model_cfg, mesh, args.quantization,
                                                     args.quantize_lm_head),
                                    model_cfg, config.model, mesh)
        tokenizer = Tokenizer.from_dir(model_dir.path)
    else:
        params = random_params(config.model, mesh, seed=args.seed, quantization=args.quantization,
                               quantize_lm_head=args.quantize_lm_head)
        tokenizer = None
    params = unstack_fp8_dot_weights(params)   # each layer's fp8 weight an argument, not a slice
    draft = None
    spec = config.speculative
    if spec is not None and spec.method == "draft_model":
        dcfg, ddir = resolve_draft(spec, model_cfg, model_dir.path if model_dir else None,
                                   model_cfg.dtype)
        draft = DraftModel(dcfg, load_params(ddir, dcfg, mesh))
    weight_bytes = params_bytes(params) // mesh.size   # layers split over stages, columns over tp
    if draft is not None:
        weight_bytes += params_bytes(draft.params) // config.parallel.tensor_parallel_size
    budget = None
    if config.cache.num_pages is None:
        budget = memory_budget(config, weight_bytes, _local_device(mesh),
                               lambda: measure_activation_bytes(config, params, mesh, draft,
                                                                StartupCache(cache_dir)))
        if budget is not None:
            log.info(budget.describe())
    plan = plan_pool(config, budget, draft.cfg if draft else None)
    runner = _runner(config, params, mesh, draft, plan)
    if allocator_limited(_local_device(mesh)):   # (an allocation on CPU fits, or the process dies)
        plan = _plan_that_fits(config, mesh, draft, plan, budget)
    if channel is not None:   # every process must allocate the same pool
        plan = dataclasses.replace(plan, num_pages=channel.agree_min("num_pages", plan.num_pages))
    _set_pool_shapes(runner, config, mesh, draft, plan)
    log.info("model %s (%s, %.2f GB of weights), %s",
             model_dir.path if model_dir is not None else args.model, model_cfg.dtype,
             params_bytes(params) / 1e9, plan.describe())
    if draft is not None:
        log.info("draft model %s: %.1f MB of weights, a twin KV page per page", spec.model,
                 params_bytes(draft.params) / 1e6)

    def compiled(plan: PoolPlan) -> float:
        return _compile(runner, config, params, mesh, draft, plan, budget, cache_dir, channel, progress)

    before = allocator_report(_local_device(mesh))   # (for the retry's warning: what compiling took)
    compile_s = compiled(plan)   # over the pool's shapes, then the pool (``_runner``)
    first_pages, page_bytes = plan.num_pages, pool_page_bytes(config, draft.cfg if draft else None)
    hold = 0 if budget is None else budget.pool_hold_bytes
    for attempt in range(POOL_ATTEMPTS):
        last = attempt == POOL_ATTEMPTS - 1
        # Room for the compiled programs' temporaries: the activations held, plus the pages a
        # retry dropped (a temporary that grows with the pool escapes the 2-page probe).
        over = (0 if budget is None else
                runner.steps_peak - budget.activation_bytes - (first_pages - plan.num_pages) * page_bytes)
        if over > 0 and channel is None and not last:
            pages = plan.num_pages - -(-over // page_bytes) - 1
            why = (f"the compiled step programs' activation peak passes the activations held by "
                   f"{over / 2**20:.1f} MiB")
        else:
            try:
                runner.attach_pool(*allocated_pool(config, mesh, draft, plan.num_pages, hold))
                break
            except PoolDoesNotFit as e:
                if channel is not None or last:
                    raise MemoryError(f"{e}; lower gpu_memory_utilization or set num_pages") from e
                why = str(e)
                found = _pages_that_fit(config, mesh, draft, plan.num_pages, e.pages_that_fit(plan.num_pages),
                                        hold)
                pages = found - max(1, found // FIT_TOLERANCE)   # (room for the next compile's holes)
        pages = addressable_pages(config, draft.cfg if draft else None, pages)   # (it may enter the band)
        if pages < 2:
            raise MemoryError(f"{why}: no pool fits; lower gpu_memory_utilization or set num_pages")
        memory = (f" (device memory before compiling: {before}; now: "
                  f"{allocator_report(_local_device(mesh))})" if before else "")
        log.warning("%s: allocating %d pages instead of %d (%.1f%% fewer) and compiling the step "
                    "programs again for them%s", why, pages, plan.num_pages,
                    100 * (1 - pages / plan.num_pages), memory)
        plan = dataclasses.replace(plan, num_pages=pages)
        _set_pool_shapes(runner, config, mesh, draft, plan)
        compile_s += compiled(plan)
    compile_s += runner.warm()
    if budget is not None:
        log.info(memory_after_warmup(_local_device(mesh), budget))
    if channel is not None:
        if not channel.is_leader:
            follow(runner, channel)
            raise SystemExit(0)
        runner = LeaderRunner(runner, channel)
    build = BuildInfo(plan, startup_seconds=time.perf_counter() - t0, compile_seconds=compile_s,
                      memory=budget)
    engine = LLMEngine(config, runner, tokenizer, plan.num_pages, build)
    log.info("engine ready in %.1f s (compile %.1f s)", build.startup_seconds, compile_s)
    return engine
