"""Engine configuration: frozen dataclasses validated on construction.

Where it sits: ``LLM(...)`` / ``jserve serve`` flags -> ``EngineArgs`` -> ``EngineConfig`` ->
read by the page pool (``CacheConfig``), the scheduler (``SchedulerConfig``) and the runner
(``ModelConfig``, buckets). ``ModelConfig`` is parsed from an HF ``config.json``. Fields that are
user options take their defaults and validation from the one declaration in jserve/options.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from jserve.options import DTYPES as DTYPES  # re-exported: the dtype names live with the options
from jserve.options import default_of, normalize_dtype, validate_fields
from jserve.spec.config import SpeculativeConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1, "int8": 1}  # fp8/int8: KV only


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (``rope_scaling.rope_type == "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, as read from an HF ``config.json``. Shapes for one model replica."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    # Per layer: None (full attention) or the sliding window size in tokens.
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {SUPPORTED_ARCHITECTURES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError("ModelConfig.sliding_windows must have one entry per layer")
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype, "ModelConfig.dtype"))

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def q_per_kv_padded(self) -> int:
        """Query heads per kv head as the weights hold them: the next power of two. The GPU
        attention kernel tiles a power-of-two group; padding the weights (zero q rows, zero wo
        columns: the extra heads add exactly 0) saves a pad and a slice kernel per layer."""
        g = self.q_per_kv
        return 1 << (g - 1).bit_length()

    @property
    def num_q_heads_padded(self) -> int:
        return self.num_kv_heads * self.q_per_kv_padded

    def num_weight_elements(self) -> int:
        """Elements the engine holds for the weights: ``num_params`` plus the zero padding of
        the query heads (``q_per_kv_padded``)."""
        extra = (self.num_q_heads_padded - self.num_heads) * self.head_dim
        per_layer = extra * (2 * self.hidden_size + (1 if self.qkv_bias else 0))
        return self.num_params() + self.num_layers * per_layer

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * self.num_heads * d + 2 * h * self.num_kv_heads * d + self.num_heads * d * h
        if self.qkv_bias:
            attn += (self.num_heads + 2 * self.num_kv_heads) * d
        layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json",
                       dtype: str | None = None) -> ModelConfig:
        """Parse an HF ``config.json`` mapping. Errors name ``source`` and the field."""
        archs = cfg.get("architectures") or []
        if not archs:
            raise ValueError(f"{source}: missing 'architectures'")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"{source}: unsupported architecture {arch!r}; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

        def need(key: str) -> Any:
            if key not in cfg:
                raise ValueError(f"{source}: missing required field {key!r}")
            return cfg[key]

        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        head_dim = cfg.get("head_dim") or hidden // num_heads
        num_layers = int(need("num_hidden_layers"))
        # transformers >= 5 writes one ``rope_parameters`` dict (theta + scaling) instead.
        rope_params = cfg.get("rope_parameters") or {}
        rs = cfg.get("rope_scaling") or (rope_params if rope_params.get("rope_type") not in
                                         (None, "default") else None)
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = None
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind == "llama3":
                rope_scaling = RopeScaling(
                    factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                    high_freq_factor=float(rs["high_freq_factor"]),
                    original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
            elif kind not in (None, "default"):
                raise ValueError(f"{source}: unsupported rope_scaling type {kind!r} (supported: llama3)")
        windows = _sliding_windows(cfg, arch, num_layers)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        tie = bool(cfg.get("tie_word_embeddings", False))
        model_dtype = dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
        return cls(
            architecture=arch, vocab_size=int(need("vocab_size")), hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")), num_layers=num_layers,
            num_heads=num_heads, num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta), rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=tie,
            qkv_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            sliding_windows=windows, bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids, dtype=normalize_dtype(model_dtype),
        )


def _sliding_windows(cfg: dict[str, Any], arch: str, num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types:
        return tuple(window if t == "sliding_attention" and window else None for t in layer_types)
    if not window:
        return (None,) * num_layers
    if arch == "Qwen2ForCausalLM":
        if not cfg.get("use_sliding_window", False):
            return (None,) * num_layers
        first = int(cfg.get("max_window_layers", num_layers))
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    return (int(window),) * num_layers


@dataclass(frozen=True)
class CacheConfig:
    """The KV page pool. Either ``num_pages`` or the memory budget sizes it: the
    ``gpu_memory_utilization`` share of each device, less the weights, the runner's state and the
    activation peak (``activation_memory_bytes``; None: measured at start-up).

    Prefix caching keeps full pages for reuse by later requests; ``swap_space_gb`` of host
    memory holds preempted requests' pages (``preemption_mode="swap"``; recompute when it is
    full or 0); ``host_kv_cache_gb`` of host memory keeps pages evicted from the device prefix
    cache (0 = off).
    """

    page_size: int = default_of("page_size")
    num_pages: int | None = default_of("num_pages")
    gpu_memory_utilization: float = default_of("gpu_memory_utilization")
    activation_memory_bytes: int | None = default_of("activation_memory_bytes")
    kv_cache_dtype: str = default_of("kv_cache_dtype")  # "auto" = the model dtype
    enable_prefix_caching: bool = default_of("enable_prefix_caching")
    swap_space_gb: float = default_of("swap_space_gb")
    host_kv_cache_gb: float = default_of("host_kv_cache_gb")
    preemption_mode: str = default_of("preemption_mode")  # "swap" | "recompute"

    def __post_init__(self) -> None:
        validate_fields(self)   # every field is an option: jserve/options.py holds the rules


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits. Token and request counts are padded to ``token_buckets``.

    flash_prefill_min_tokens: a step of at least this token bucket whose chunks are all fresh
    prompts (no cached context: the first chunk of each) attends with the flash kernel over the
    chunk's own K/V instead of the paged kernel (one more compiled step per such bucket); 0 = never.

    async_scheduling: overlap host scheduling of step N+1 with the device running step N (False:
    the synchronous reference loop).

    num_scheduler_steps: N > 1 lets a plan of one-token decode rows with nothing the host adds
    per token that fits the smallest token bucket run N decode steps in one device program (a
    burst, ``Scheduler._burst``).

    grammar_device_states: rows of the token-automaton table (None: sized by the vocabulary,
    ``structured.automaton_pool.device_states``).

    ``max_num_batched_tokens`` and ``max_model_len`` are resolved values here (``EngineArgs``
    lets them be None: ``make_engine_config`` derives them).
    """

    max_num_seqs: int = default_of("max_num_seqs")
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    max_waiting: int = default_of("max_waiting")
    min_token_bucket: int = 16
    flash_prefill_min_tokens: int = default_of("flash_prefill_min_tokens")
    async_scheduling: bool = default_of("async_scheduling")
    num_scheduler_steps: int = default_of("num_scheduler_steps")
    grammar_device_states: int | None = default_of("grammar_device_states")

    def __post_init__(self) -> None:
        validate_fields(self)   # the option fields; then the resolved and internal ones
        for name in ("max_num_batched_tokens", "max_model_len", "min_token_bucket"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.max_num_seqs > self.max_num_batched_tokens:
            raise ValueError(f"max_num_seqs ({self.max_num_seqs}) must be <= "
                             f"max_num_batched_tokens ({self.max_num_batched_tokens})")

    @property
    def token_buckets(self) -> tuple[int, ...]:
        """Powers of two from ``min_token_bucket`` up to (and including) the token budget."""
        out, b = [], min(self.min_token_bucket, self.max_num_batched_tokens)
        while b < self.max_num_batched_tokens:
            out.append(b)
            b *= 2
        out.append(self.max_num_batched_tokens)
        return tuple(out)

    def flash_prefill(self, token_bucket: int) -> bool:
        """Whether all-fresh steps of this bucket have a flash-attention variant."""
        return 0 < self.flash_prefill_min_tokens <= token_bucket

    def seq_bucket(self, token_bucket: int) -> int:
        """Request rows compiled with a token bucket: one seq bucket per token bucket."""
        return min(token_bucket, self.max_num_seqs)

    @property
    def burst_rows(self) -> int:
        """The most rows a burst of ``num_scheduler_steps`` decode steps runs (the smallest
        bucket's; 0 when bursts are off)."""
        return self.seq_bucket(self.token_buckets[0]) if self.num_scheduler_steps > 1 else 0


@dataclass(frozen=True)
class ParallelConfig:
    """The mesh and the processes that share it (jserve/multiprocess.py). The launch values
    are checked together when the job starts (``sharding.initialize_multihost``)."""

    tensor_parallel_size: int = default_of("tensor_parallel_size")
    pipeline_parallel_size: int = default_of("pipeline_parallel_size")
    data_parallel_size: int = default_of("data_parallel_size")
    prefill_devices: tuple[int, ...] | None = default_of("prefill_devices")   # jserve/disagg/
    decode_devices: tuple[int, ...] | None = default_of("decode_devices")
    coordinator_address: str | None = default_of("coordinator_address")
    num_processes: int | None = default_of("num_processes")
    process_id: int | None = default_of("process_id")
    distributed_timeout_s: int = default_of("distributed_timeout_s")

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = default_of("seed")
    speculative: SpeculativeConfig | None = None   # speculative decoding (jserve/spec/), off: None

    def __post_init__(self) -> None:
        validate_fields(self, "seed")   # `model` is a ModelConfig here, not the option
        m, s = self.model, self.scheduler
        if self.parallel.tensor_parallel_size > 1:
            tp = self.parallel.tensor_parallel_size
            for name, v in (("num_attention_heads", m.num_heads),
                            ("num_key_value_heads", m.num_kv_heads),
                            ("intermediate_size", m.intermediate_size)):
                if v % tp:
                    raise ValueError(f"{name} ({v}) is not divisible by tensor_parallel_size ({tp})")
        pp = self.parallel.pipeline_parallel_size
        if pp > 1:
            if m.num_layers % pp:
                raise ValueError(f"num_hidden_layers ({m.num_layers}) is not divisible by "
                                 f"pipeline_parallel_size ({pp})")
            per = m.num_layers // pp
            if any(m.sliding_windows[i] != m.sliding_windows[i % per] for i in range(m.num_layers)):
                raise ValueError(f"pipeline_parallel_size={pp}: the model's sliding windows differ "
                                 "between stages (every stage runs one layer program)")
            if self.speculative is not None:
                raise ValueError("speculative_config is not supported with pipeline_parallel_size > 1")
        if s.num_scheduler_steps > 1:
            if self.speculative is not None:
                raise ValueError("num_scheduler_steps > 1 is not supported with speculative_config "
                                 "(a speculative step already makes several tokens)")
            par = self.parallel
            if (par.num_processes or 1) > 1 or par.prefill_devices is not None:
                raise ValueError("num_scheduler_steps > 1 needs a single process and no "
                                 "prefill/decode disaggregation")
        if s.max_model_len > m.max_position_embeddings and m.rope_scaling is None:
            pass  # allowed (like vLLM with a warning); RoPE extrapolates.

    @property
    def pipelined_bursts(self) -> bool:
        """Bursts at pipeline_parallel_size > 1 are how the stages overlap (the rows circle
        through them in groups: decoder.pipelined_burst): any number of rows, waiting requests
        or not; one (plain-sampler) program per burst bucket."""
        return self.parallel.pipeline_parallel_size > 1

    @property
    def kv_dtype(self) -> str:
        return self.model.dtype if self.cache.kv_cache_dtype == "auto" else self.cache.kv_cache_dtype

    @property
    def pages_per_seq(self) -> int:
        return math.ceil(self.scheduler.max_model_len / self.cache.page_size)
