"""Capacity planner (``jserve plan``): how many sequences of a context fit on an accelerator.

Where it sits: beside start-up, never on the data path. It runs the engine's own start-up
arithmetic with no device and no weights loaded: the model resolves as ``build_engine`` resolves
it (``resolve_model``, ``make_engine_config``), the pool comes from the same functions
(``kv_cache.MemoryBudget`` -> ``builder.pool_plan_for_budget`` -> ``PoolPlan``), so its
figures are the ones start-up logs for the same settings::

    usable        = chip memory x gpu_memory_utilization     (jserve/gpus.py)
    budget        = usable - weights - runner state - activations - headroom    (per device)
    KV bytes/token = 2 (K, V) x layers x kv heads per device x head_dim x KV dtype bytes
    pages         = budget // (KV bytes/token x page_size)   (page 0 is the null page; an
                    int8 / fp8 pool's layer arrays stay under 2 GiB where they would be 2-4 GiB:
                    kv_cache.POOL_CAP_REASON)
    sequences     = (pages - 1) // ceil(context / page_size)

One figure differs: start-up measures the activation peak on the device
(jserve/activation_peak.py); the planner estimates it from the shapes (an upper bound) unless
``activation_memory_bytes`` gives the figure start-up logged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from checkpoints import QuantScheme
from jserve.activation_peak import estimate_activation_bytes
from jserve.builder import (
    EngineArgs,
    make_engine_config,
    pool_plan_for_budget,
    resolve_model,
    runner_state_bytes,
)
from jserve.config import DTYPE_BYTES, EngineConfig, ModelConfig
from jserve.gpus import Accelerator, lookup_accelerator
from jserve.host_kv import host_slot_counts
from jserve.kv_cache import (
    HEADROOM_OF_ACTIVATIONS,
    HEADROOM_OF_USABLE,
    POOL_CAP_REASON,
    MemoryBudget,
    PoolPlan,
    kv_bytes_per_token,
    kv_scale_bytes_per_page,
    local_kv_heads,
    pages_for_budget,
)
from jserve.kv_transfer import transfer_buckets
from jserve.model.quant_params import resolve_scheme
from jserve.model.quant_params import weight_bytes as quantized_weight_bytes
from jserve.options import PLAN, check_keywords, options_for
from jserve.sampling_params import MAX_LOGIT_BIAS
from jserve.spec.draft import resolve_draft
from jserve.structured.automaton_pool import device_states
from jserve.structured.logit_state import mask_words

_TP_SIZES = (1, 2, 4, 8, 16, 32, 64)


def weight_bytes(cfg: ModelConfig, quantization: QuantScheme | None = None) -> int:
    """Bytes of every weight in ``cfg.dtype`` (what ``params_bytes`` of the loaded tree gives,
    query-head padding included); 8-bit projections plus their scales under ``quantization``."""
    return quantized_weight_bytes(cfg, quantization)


@dataclass(frozen=True)
class CapacityPlan:
    """Every figure ``jserve plan`` prints; all byte counts are per device unless named total."""

    model_label: str
    config: EngineConfig
    accelerator: Accelerator
    weight_bytes_total: int
    weight_bytes_per_device: int
    memory: MemoryBudget         # usable - weights - runner state - activations
    pool: PoolPlan | None        # None: fewer than 2 pages fit (the weights take the memory)
    min_fitting_tp: int | None   # smallest tensor-parallel size that fits, when this one doesn't
    draft: ModelConfig | None = None  # speculative decoding's draft model (its weights and twin
                                      # KV pages are counted in the figures above)
    quantization: QuantScheme | None = None   # 8-bit projection weights

    @property
    def budget_bytes(self) -> int:
        """Bytes left for the KV pool per device (negative: the rest does not fit)."""
        return self.memory.kv_bytes

    @property
    def fits(self) -> bool:
        return self.pool is not None and self.pool.max_concurrent_seqs >= 1

    @property
    def kv_bytes_per_token(self) -> int:
        """Target + draft KV bytes of one token, per device."""
        c = self.config
        return kv_bytes_per_token(c.model, c.kv_dtype, c.parallel.tensor_parallel_size,
                                  c.parallel.pipeline_parallel_size) + \
            self.draft_kv_bytes_per_token

    @property
    def draft_kv_bytes_per_token(self) -> int:
        c = self.config
        return (0 if self.draft is None
                else kv_bytes_per_token(self.draft, c.kv_dtype, c.parallel.tensor_parallel_size))

    def render(self) -> str:
        """The plan with its arithmetic, one line per figure."""
        c, m, acc = self.config, self.config.model, self.accelerator
        tp, pp = c.parallel.tensor_parallel_size, c.parallel.pipeline_parallel_size
        layers = m.num_layers // pp
        kv_heads = local_kv_heads(m, tp)
        per_token, page_size = self.kv_bytes_per_token, c.cache.page_size
        scale_bytes = kv_scale_bytes_per_page(m, c.kv_dtype, tp, pp) + (
            kv_scale_bytes_per_page(self.draft, c.kv_dtype, tp) if self.draft is not None else 0)
        page_bytes = per_token * page_size + scale_bytes
        ctx = c.scheduler.max_model_len
        lines = [
            f"jserve plan: {self.model_label} on {acc.name}, tp={tp}"
            f"{f', pp={pp}' if pp > 1 else ''}, context {ctx:,} tokens",
            f"model      {m.architecture}: {m.num_layers} layers, {m.num_heads} q / {m.num_kv_heads} kv "
            f"heads x head_dim {m.head_dim}, hidden {m.hidden_size}, vocab {m.vocab_size:,}",
            (f"weights    {m.num_params():,} params x {DTYPE_BYTES[m.dtype]} B ({m.dtype}) = "
             if self.quantization is None else
             f"weights    {m.num_params():,} params, projections 8-bit + float32 scales "
             f"({self.quantization.describe()}; --quantization), the rest {m.dtype} = ")
            + f"{_b(self.weight_bytes_total)}; / tp {tp} (--tp){f' x pp {pp} (--pp)' if pp > 1 else ''} = "
            f"{_b(self.weight_bytes_per_device)} per device"
            + (" (8-bit: --quantization)" if self.quantization is None else
               "" if self.quantization.lm_head else " (the lm_head 8-bit too: --quantize-lm-head)"),
            f"memory     {_memory_line(acc, c.cache.gpu_memory_utilization, self.memory.usable_bytes)}",
            f"state      runner state (penalty statistics: {c.scheduler.max_num_seqs} seqs "
            f"(--max-num-seqs) x {m.vocab_size:,} x 4 B, token masks and logit biases: "
            f"{c.scheduler.max_num_seqs + 1} x {mask_words(m.vocab_size) + 2 * MAX_LOGIT_BIAS:,} x 4 B"
            f"{'; speculative: draft q, verify masks' * bool(c.speculative)}"
            f"{_automata_note(c)}) = "
            f"{_b(self.memory.runner_state_bytes)}",
            f"activations {_b(self.memory.activation_bytes)} per device, "
            + ("given (--activation-memory-bytes)" if c.cache.activation_memory_bytes is not None
               else f"estimated for a step of {c.scheduler.token_buckets[-1]:,} tokens "
               f"(--max-num-batched-tokens) and {c.scheduler.seq_bucket(c.scheduler.token_buckets[-1])} "
               f"rows{_move_note(c)}: start-up measures the real peak and logs it; plan with it via "
               f"--activation-memory-bytes"),
            f"budget     {self.memory.usable_bytes:,} usable - {self.weight_bytes_per_device:,} weights - "
            f"{self.memory.runner_state_bytes:,} state - {self.memory.activation_bytes:,} activations "
            f"- {self.memory.headroom_bytes:,} allocator headroom (max(activations / "
            f"{HEADROOM_OF_ACTIVATIONS}, usable / {HEADROOM_OF_USABLE})) "
            f"= {_b(self.budget_bytes)} per device for the KV pool",
            f"KV/token   2 (K, V) x {layers} layers"
            f"{f' (of {m.num_layers}: this stage of pp {pp})' if pp > 1 else ''} x {kv_heads} kv heads"
            f"{' per device' if kv_heads != m.num_kv_heads else ''}"
            f"{' (replicated: kv heads do not divide tp)' if tp > 1 and kv_heads == m.num_kv_heads else ''}"
            f" x {m.head_dim} head_dim x {DTYPE_BYTES[c.kv_dtype]} B ({c.kv_dtype}; --kv-cache-dtype)"
            f" = {_b(per_token)}",
        ]
        if self.draft is not None:
            d = self.draft
            lines += [
                f"draft      {d.architecture}: {d.num_layers} layers, {d.num_kv_heads} kv heads x "
                f"head_dim {d.head_dim}, {_b(weight_bytes(d))} of weights (in the weights above); "
                f"its KV pool has a twin page per page: + {_b(self.draft_kv_bytes_per_token)} "
                f"per token = {_b(per_token)} per token"]
        lines.append(f"KV/page    {per_token:,} B x {page_size} tokens (--page-size)"
                     + (f" + {scale_bytes:,} B of float32 scales (per page and kv head, K and V, all "
                        "layers)" if scale_bytes else "") + f" = {_b(page_bytes)}")
        if self.pool is None:
            pages = pages_for_budget(self.budget_bytes, page_bytes) if self.budget_bytes > 0 else 0
            lines.append(f"pages      {max(self.budget_bytes, 0):,} // {page_bytes:,} = {pages} pages: "
                         f"DOES NOT FIT (the pool needs at least 2 pages)")
        else:
            p = self.pool
            per_seq = math.ceil(ctx / page_size)
            cap = f"-> {p.num_pages:,} ({POOL_CAP_REASON}) " if p.budget_pages else ""
            lines += [
                f"pages      {self.budget_bytes:,} // {page_bytes:,} = {p.budget_pages or p.num_pages:,} "
                f"pages {cap}(page 0 is the null page: {p.usable_pages:,} usable = {p.num_tokens:,} tokens, "
                f"{_b(p.pool_bytes)} per device)",
                f"sequences  {p.usable_pages:,} usable pages // (ceil({ctx:,} / {page_size}) = {per_seq:,} "
                f"pages per sequence) = {p.max_concurrent_seqs:,} concurrent sequences of {ctx:,} tokens "
                f"(--context)",
                f"start-up   {p.describe()}",
            ]
        if not self.fits:
            hint = (f"smallest tensor-parallel size that fits: --tp {self.min_fitting_tp}"
                    if self.min_fitting_tp else "no tensor-parallel size up to 64 fits")
            lines.append(f"verdict    not one sequence of {ctx:,} tokens fits; {hint}, or shorten the "
                         f"context / use a smaller KV dtype")
        return "\n".join(lines)


def plan_capacity(model: str | None = None, gpu: str | int = "H100-80GB", **options: Any) -> CapacityPlan:
    """Plan for ``model`` (an HF directory, None for the bundled model, or a named shape such as
    ``llama3.1-8b``) on ``gpu`` (a name from jserve/gpus.py or a byte count).

    ``options``: the engine options ``jserve plan`` exposes (jserve/options.py: max_model_len,
    dtype, kv_cache_dtype, tensor_parallel_size, pipeline_parallel_size, gpu_memory_utilization,
    activation_memory_bytes, page_size, max_num_seqs, ...), with the engine's declared defaults;
    any other keyword is a TypeError.
    """
    check_keywords("plan_capacity", options, [o.name for o in options_for(PLAN)])
    acc = lookup_accelerator(gpu)
    args = EngineArgs(**options, model=model, random_weights=True)
    model_cfg, model_dir = resolve_model(args)
    label = str(model_dir.path) if model_dir is not None else str(model)
    if model is None:
        label = f"bundled default model ({model_dir.path.name})" if model_dir is not None else label
    config = make_engine_config(args, model_cfg)
    draft = None
    spec = config.speculative
    if spec is not None and spec.method == "draft_model":
        draft, _ = resolve_draft(spec, model_cfg, model_dir.path if model_dir else None,
                                 model_cfg.dtype)
    scheme = resolve_scheme(model_dir.config if model_dir is not None else {}, args.quantization, label,
                            args.quantize_lm_head)
    return _plan(label, config, acc, args, draft, scheme)


def _weights(config: EngineConfig, draft: ModelConfig | None, scheme: QuantScheme | None) -> int:
    """Weight bytes of the model (quantized per ``scheme``) and of the draft (unquantized)."""
    return weight_bytes(config.model, scheme) + (weight_bytes(draft) if draft is not None else 0)


def _plan(label: str, config: EngineConfig, acc: Accelerator, args: EngineArgs,
          draft: ModelConfig | None = None, scheme: QuantScheme | None = None) -> CapacityPlan:
    tp = config.parallel.tensor_parallel_size
    total = _weights(config, draft, scheme)
    per_device = total // (tp * config.parallel.pipeline_parallel_size)
    budget = _memory(config, acc, per_device, draft)
    try:
        pool: PoolPlan | None = pool_plan_for_budget(config, budget.kv_bytes, draft)
    except ValueError:   # PoolPlan: fewer than 2 pages
        pool = None
    plan = CapacityPlan(label, config, acc, total, per_device, budget, pool, None, draft, scheme)
    if plan.fits:
        return plan
    return CapacityPlan(label, config, acc, total, per_device, budget, pool,
                        _min_fitting_tp(config, acc, args, draft, scheme), draft, scheme)


def _min_fitting_tp(config: EngineConfig, acc: Accelerator, args: EngineArgs,
                    draft: ModelConfig | None, scheme: QuantScheme | None) -> int | None:
    for tp in _TP_SIZES:
        if tp <= config.parallel.tensor_parallel_size:
            continue
        try:
            bigger = make_engine_config(dataclasses.replace(args, tensor_parallel_size=tp),
                                        config.model)
        except ValueError:   # heads or MLP not divisible by tp
            continue
        per_device = _weights(config, draft, scheme) // (tp * config.parallel.pipeline_parallel_size)
        budget = _memory(bigger, acc, per_device, draft)
        try:
            if pool_plan_for_budget(bigger, budget.kv_bytes, draft).max_concurrent_seqs >= 1:
                return tp
        except ValueError:
            continue
    return None


def _memory(config: EngineConfig, acc: Accelerator, weights_per_device: int,
            draft: ModelConfig | None) -> MemoryBudget:
    """Start-up's ``MemoryBudget`` without a device: activations given or estimated."""
    act = config.cache.activation_memory_bytes
    return MemoryBudget(acc.usable_bytes(config.cache.gpu_memory_utilization), weights_per_device,
                        runner_state_bytes(config),
                        estimate_activation_bytes(config, draft) if act is None else act)


def _move_note(c: EngineConfig) -> str:
    if not host_slot_counts(c):
        return ""
    bucket = transfer_buckets(max(c.pages_per_seq, c.scheduler.max_num_seqs))[-1]
    return (f", + {bucket} pages x 5 of the largest move to host memory (--swap-space 0 and "
            f"--host-kv-cache-gb 0 drop it)")


def _automata_note(c: EngineConfig) -> str:
    """The token-automaton table's part of the runner-state line."""
    states = device_states(c)
    return (f"; token automata: {states + 1:,} x {c.model.vocab_size:,} x 2 B (--grammar-device-states)"
            if states else "")


def _memory_line(acc: Accelerator, utilization: float, usable: int) -> str:
    if acc.platform == "bytes":
        return f"{_b(usable)} usable per device (given as bytes: start-up logs it as usable)"
    what = ("MiB nvidia-smi total; CUDA keeps ~0.4% of it: pass --gpu <usable bytes> for exact"
            if acc.platform == "gpu" else "GiB HBM per chip")
    size = acc.memory_bytes // (2**20 if acc.platform == "gpu" else 2**30)
    return (f"{size:,} {what.split(' ', 1)[0]} = {acc.memory_bytes:,} B x {utilization} "
            f"gpu_memory_utilization (--gpu-memory-utilization; start-up sets JAX's allocator to it) "
            f"= {_b(usable)} usable per device ({what.split(' ', 1)[1]})")


def _b(n: int) -> str:
    """``1,234 B (1.15 GiB)``: exact bytes, then a readable size."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n:,} B ({n / size:.2f} {unit})"
    return f"{n:,} B"
