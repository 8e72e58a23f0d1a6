"""Start-up of a disaggregated engine: check the device groups, build one engine per group.

Where it sits: ``build_engine`` hands over here when ``prefill_devices`` / ``decode_devices``
are set. Each group is built by ``build_engine`` itself on its devices (its own mesh, weights,
KV pool sized from its own memory, compiled steps; tensor parallel over the group's devices),
the decode group without a prefix cache (it lives on the prefill side); then the handoff's
page mover is compiled for every bucket, and the two runners are wrapped in a ``DisaggEngine``::

    check_groups      both given, non-empty, distinct, disjoint, existing device indices
    refuse            data parallelism, pipeline parallelism, multi-process jobs, speculative
                      decoding (not yet)
    check_fits        weights per device of each group against that group's device memory
    build_engine x 2  prefill group (prefix cache on), decode group (prefix cache off)
    KVHandoffMover    compiled per page bucket, run once on the null pages
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import jax

from jserve.disagg.engine import DisaggEngine
from jserve.disagg.group import Group
from jserve.disagg.handoff import Handoff
from jserve.disagg.schedulers import DecodeScheduler, PrefillScheduler
from jserve.disagg.transfer import KVHandoffMover
from jserve.engine import LLMEngine
from jserve.engine_api import BuildInfo
from jserve.kv_manager import make_kv_manager
from jserve.model.kv_replicas import serving_model_config
from jserve.options import EngineArgs
from sharding.multihost import check_launch, launch_values

log = logging.getLogger(__name__)


def check_groups(prefill: Sequence[int] | None, decode: Sequence[int] | None,
                 num_devices: int, platform: str = "device") -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The two groups' device indices, or ValueError naming the option at fault."""
    if prefill is None or decode is None:
        missing = "decode_devices" if decode is None else "prefill_devices"
        raise ValueError(f"{missing}: disaggregation needs both prefill_devices and decode_devices "
                         f"(e.g. --prefill-devices 0 --decode-devices 1)")
    for name, group in (("prefill_devices", prefill), ("decode_devices", decode)):
        if not group:
            raise ValueError(f"{name}: the group is empty")
        if len(set(group)) != len(group):
            raise ValueError(f"{name}: device indices repeat: {list(group)}")
        bad = [i for i in group if not 0 <= i < num_devices]
        if bad:
            raise ValueError(f"{name}: device index {bad[0]} does not exist: {num_devices} {platform} "
                             f"device(s), indices 0..{num_devices - 1}")
    both = sorted(set(prefill) & set(decode))
    if both:
        raise ValueError(f"prefill_devices and decode_devices overlap on device(s) {both}: the "
                         f"groups must be disjoint")
    return tuple(prefill), tuple(decode)


def check_supported(args: EngineArgs) -> None:
    """Combinations not built yet: ValueError naming the option."""
    if args.data_parallel_size > 1:
        raise ValueError("data_parallel_size > 1 cannot be combined with prefill_devices / "
                         "decode_devices yet")
    if args.speculative_config is not None:
        raise ValueError("speculative_config cannot be combined with prefill_devices / "
                         "decode_devices yet")
    if args.pipeline_parallel_size > 1:
        raise ValueError("pipeline_parallel_size > 1 cannot be combined with prefill_devices / "
                         "decode_devices yet")
    if check_launch(*launch_values(args.coordinator_address, args.num_processes, args.process_id)):
        raise ValueError("prefill_devices / decode_devices need a single-process job for now "
                         "(both groups on one host)")
    tp = args.tensor_parallel_size
    sizes = {len(args.prefill_devices), len(args.decode_devices)}
    if tp != 1 and sizes != {tp}:
        raise ValueError(f"tensor_parallel_size={tp}: with disaggregation each group is tensor "
                         f"parallel over its own devices; leave tensor_parallel_size at 1 or make "
                         f"both groups {tp} devices")


def check_fits(args: EngineArgs, groups: dict[str, tuple[int, ...]], devices: Sequence[jax.Device]) -> None:
    """The model's weights per device must fit each group's device memory (at
    ``gpu_memory_utilization``); the served kv heads must agree between the groups (the
    handoff copies pages as they are). Devices that report no memory limit (CPU) pass."""
    from jserve.builder import resolve_model  # jserve.builder imports this module lazily
    from jserve.model.quant_params import resolve_scheme, weight_bytes

    cfg, model_dir = resolve_model(args)
    heads = {name: serving_model_config(cfg, len(ids)).num_kv_heads for name, ids in groups.items()}
    if len(set(heads.values())) > 1:
        raise ValueError(f"prefill_devices / decode_devices: the groups' tensor-parallel sizes "
                         f"({len(groups['prefill'])} and {len(groups['decode'])}) serve {heads['prefill']} "
                         f"and {heads['decode']} kv heads; pick sizes that serve the same (the "
                         f"model has {cfg.num_kv_heads})")
    config = getattr(model_dir, "config", {}) if model_dir is not None else {}
    scheme = resolve_scheme(config, args.quantization, args.model or "the model", args.quantize_lm_head)
    for name, ids in groups.items():
        per_device = weight_bytes(serving_model_config(cfg, len(ids)), scheme) // len(ids)
        stats = devices[ids[0]].memory_stats() if hasattr(devices[ids[0]], "memory_stats") else None
        limit = (stats or {}).get("bytes_limit")
        share = args.kv_cache_memory_fraction or args.gpu_memory_utilization
        if limit is not None and per_device >= limit * share:
            raise ValueError(f"{name}_devices: the model's weights take {per_device / 2**30:.1f} GiB per "
                             f"device on {len(ids)} device(s), more than gpu_memory_utilization="
                             f"{share} of a device ({limit / 2**30:.1f} GiB); "
                             f"give the {name} group more devices")


def build_disaggregated(args: EngineArgs, progress: Callable[[str], None] | None = None) -> DisaggEngine:
    """The two groups' engines on their devices -> a warmed-up ``DisaggEngine``."""
    from jserve.builder import build_engine

    devices = jax.devices()
    prefill_ids, decode_ids = check_groups(args.prefill_devices, args.decode_devices, len(devices),
                                           devices[0].platform)
    check_supported(args)
    ids = {"prefill": prefill_ids, "decode": decode_ids}
    check_fits(args, ids, devices)
    say = progress or log.info
    built: dict[str, LLMEngine] = {}
    for name, group in ids.items():
        say(f"{name} group on devices {list(group)} (tensor parallel {len(group)})")
        # (grammar_device_states 0: two runners, two automaton tables; a request's automaton
        # state would have to move with its pages, so grammars take the host path here)
        one = dataclasses.replace(args, prefill_devices=None, decode_devices=None,
                                  tensor_parallel_size=len(group), grammar_device_states=0,
                                  enable_prefix_caching=args.enable_prefix_caching and name == "prefill")
        built[name] = build_engine(one, progress, devices=[devices[i] for i in group])
    pe, de = built["prefill"], built["decode"]
    prefill = Group("prefill", PrefillScheduler(pe.config.scheduler, _kv(pe)), pe.runner, pe.startup,
                    prefill_ids)
    decode = Group("decode", DecodeScheduler(de.config.scheduler, _kv(de)), de.runner, de.startup,
                   decode_ids)
    mover = KVHandoffMover(pe.runner.kv, de.runner.kv, max(pe.config.pages_per_seq, 1))
    de.runner.kv = mover.warmup(pe.runner.kv, de.runner.kv)
    say(f"KV handoff: {mover.page_bytes / 2**20:.2f} MiB per page, page buckets {mover.buckets}")
    pp, dp = pe.startup.pool_plan, de.startup.pool_plan
    plan = dataclasses.replace(pp, num_pages=pp.num_pages + dp.num_pages - 1)
    build = BuildInfo(plan, startup_seconds=pe.startup.startup_seconds + de.startup.startup_seconds,
                      compile_seconds=pe.startup.compile_seconds + de.startup.compile_seconds)
    config = dataclasses.replace(pe.config, parallel=dataclasses.replace(
        pe.config.parallel, prefill_devices=prefill_ids, decode_devices=decode_ids))
    return DisaggEngine(config, prefill, decode, Handoff(prefill, decode, mover), pe.tokenizer, build)


def _kv(engine: LLMEngine):
    """A fresh page bookkeeping over ``engine``'s pool (the group's scheduler replaces the one
    the plain engine made)."""
    return make_kv_manager(engine.config, engine.startup.pool_plan.num_pages)
