"""Engine options, declared once: name, type, default, help, validation, CLI aliases, commands.

Where it sits: before start-up. Everything a user can set on the engine is one ``Option`` in
``ENGINE_OPTIONS``; every front-end reads that table instead of repeating it::

    ENGINE_OPTIONS --> EngineArgs (a generated frozen dataclass)  <-- LLM(**keywords)
                   --> argparse flags of `jserve generate|serve|plan` (jserve/cli.py)
                   --> defaults + validation of CacheConfig / SchedulerConfig / ... (config.py)
    EngineArgs --make_engine_config--> EngineConfig (jserve/builder.py)

Adding an option means adding one ``Option`` here (and reading it in ``make_engine_config``).
Validation errors name the field: ``page_size must be a power of two >= 1, got 12``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from checkpoints.quant_config import ON_LOAD_METHODS
from jserve.spec.config import canonical_json

GENERATE, SERVE, PLAN = "generate", "serve", "plan"
COMMANDS = (GENERATE, SERVE, PLAN)
_ENGINE = (GENERATE, SERVE)          # the commands that build an engine

DTYPES = ("bfloat16", "float16", "float32")
KV_QUANT_DTYPES = ("fp8", "int8")   # 1-byte KV pools with per-page, per-head scales
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "fp32": "float32", "float": "float32"}
_KINDS = {bool: "a bool", int: "an integer", float: "a number", str: "a string",
          tuple: "a list of integers"}   # tuple: a CLI value is comma-separated ("0,1")


def normalize_dtype(name: str, field_name: str = "dtype") -> str:
    """The canonical dtype name for ``name`` (``bf16`` -> ``bfloat16``); ValueError naming the field."""
    name = _DTYPE_ALIASES.get(str(name), str(name))
    if name not in DTYPES:
        raise ValueError(f"{field_name} must be one of {DTYPES}, got {name!r}")
    return name


@dataclass(frozen=True)
class Alias:
    """Another flag for an option, on some commands (``--context`` is ``plan``'s ``--max-model-len``)."""

    flag: str
    commands: tuple[str, ...] = COMMANDS


@dataclass(frozen=True)
class Option:
    """One engine option. ``rule`` + ``check`` state a constraint beyond the type, ``choices``
    and ``minimum``: ``check(value)`` is True for a valid value, ``rule`` says so in words
    (``"a power of two >= 1"``). ``normalize`` maps accepted spellings to the canonical one
    before the checks. ``default_text`` describes a None default in ``--help``;
    ``command_defaults`` overrides the default of one command's flag (never the Python one).
    """

    name: str
    type: type
    default: Any
    help: str
    commands: tuple[str, ...] = _ENGINE
    nullable: bool = False
    choices: tuple[Any, ...] | None = None
    minimum: int | float | None = None
    rule: str | None = None
    check: Callable[[Any], bool] | None = None
    normalize: Callable[[Any], Any] | None = None
    aliases: tuple[str | Alias, ...] = ()
    default_text: str | None = None
    command_defaults: Mapping[str, Any] = field(default_factory=dict)
    mapping: bool = False   # a str option holding a JSON object: a mapping is accepted too

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"Option.name must be an identifier, got {self.name!r}")
        if self.type not in _KINDS:
            raise ValueError(f"{self.name}: Option.type must be one of bool, int, float, str, tuple")
        if not self.commands or set(self.commands) - set(COMMANDS):
            raise ValueError(f"{self.name}: Option.commands must be a non-empty subset of {COMMANDS}")
        if (self.rule is None) != (self.check is None):
            raise ValueError(f"{self.name}: Option.rule and Option.check go together")
        aliases = tuple(a if isinstance(a, Alias) else Alias(a) for a in self.aliases)
        for a in aliases:
            if not a.flag.startswith("--") or set(a.commands) - set(COMMANDS):
                raise ValueError(f"{self.name}: bad alias {a!r}")
        object.__setattr__(self, "aliases", aliases)
        if set(self.command_defaults) - set(self.commands):
            raise ValueError(f"{self.name}: Option.command_defaults names a command without the flag")
        object.__setattr__(self, "default", self.validate(self.default))
        object.__setattr__(self, "command_defaults", MappingProxyType(
            {c: self.validate(v) for c, v in self.command_defaults.items()}))

    @property
    def flag(self) -> str:
        """The main CLI flag: ``--page-size`` for ``page_size``."""
        return "--" + self.name.replace("_", "-")

    @property
    def annotation(self) -> Any:
        """The field type of ``EngineArgs``: ``int``, or ``int | None`` when nullable."""
        kind = tuple[int, ...] if self.type is tuple else self.type
        return kind | None if self.nullable else kind

    def flags(self, command: str) -> tuple[str, ...]:
        """The flag and the aliases ``command`` accepts."""
        return (self.flag, *(a.flag for a in self.aliases if command in a.commands))

    def default_for(self, command: str) -> Any:
        return self.command_defaults.get(command, self.default)

    def describe(self) -> str:
        """What a valid value is, in words: ``an integer >= 1``, ``'swap' or 'recompute'``."""
        if self.rule is not None:
            text = self.rule
        elif self.choices is not None:
            names = [repr(c) for c in self.choices] + (["None"] if self.nullable else [])
            return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        elif self.minimum is not None:
            text = f"{_KINDS[self.type]} >= {self.minimum}"
        else:
            text = _KINDS[self.type]
        return text + (" or None" if self.nullable else "")

    def validate(self, value: Any) -> Any:
        """``value`` in canonical form (ints given for a float become floats), or ValueError
        naming the option."""
        if value is None and self.nullable:
            return None
        value = self._typed(value)
        if self.normalize is not None:
            value = self.normalize(value)
        if self.choices is not None and value not in self.choices:
            raise self._error(value)
        if self.minimum is not None and value < self.minimum:
            raise self._error(value)
        if self.check is not None and not self.check(value):
            raise self._error(value)
        return value

    def parse(self, text: str) -> Any:
        """A CLI string -> the validated value (argparse's ``type=``); ValueError naming the option."""
        if self.type in (int, float):
            try:
                number = self.type(text)
            except ValueError:
                raise self._error(text) from None
            return self.validate(number)
        if self.type is tuple:
            try:
                return self.validate(tuple(int(t) for t in text.replace(" ", "").split(",")))
            except ValueError:
                raise self._error(text) from None
        return self.validate(text)

    def _typed(self, value: Any) -> Any:
        if self.type is bool:
            ok = isinstance(value, bool)
        elif self.type is int:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            value = int(value) if ok else value
        elif self.type is float:
            ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
                  and math.isfinite(value))
            value = float(value) if ok else value
        elif self.type is tuple:
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
            value = tuple(int(v) for v in value) if ok else value
        else:
            ok = isinstance(value, str) or (self.mapping and isinstance(value, Mapping))
        if not ok:
            raise self._error(value)
        return value

    def _error(self, value: Any) -> ValueError:
        return ValueError(f"{self.name} must be {self.describe()}, got {value!r}")


def _power_of_two(v: int) -> bool:
    return v >= 1 and not v & (v - 1)


def _device_list(v: tuple[int, ...]) -> bool:
    return len(v) > 0 and min(v) >= 0 and len(set(v)) == len(v)


def _dtype_alias(v: str) -> str:
    return _DTYPE_ALIASES.get(v, v)


def _kv_dtype_alias(v: str) -> str:
    return {"fp8_e4m3": "fp8", "float8_e4m3fn": "fp8"}.get(v, _dtype_alias(v))


# The declaration. Order is the order of EngineArgs fields and of the flags in --help.
ENGINE_OPTIONS: tuple[Option, ...] = (
    Option("model", str, None, nullable=True, commands=COMMANDS, default_text="the bundled code-small model",
           help="HF model directory, or a named shape (llama3.1-8b, qwen2.5-0.5b, llama3.1-70b: "
           "generate and serve run one with --random-weights)"),
    Option("dtype", str, None, nullable=True, commands=COMMANDS, choices=DTYPES, normalize=_dtype_alias,
           default_text="the checkpoint's", help="weight and activation dtype"),
    Option("quantization", str, None, nullable=True, commands=COMMANDS, choices=ON_LOAD_METHODS,
           default_text="none, or a pre-quantized checkpoint's own",
           help="quantize the projection weights on load: int8 or fp8 weight-only (per-channel "
           "scales), or fp8_w8a8 (fp8 weights and per-token fp8 activations)"),
    Option("quantize_lm_head", bool, False, commands=COMMANDS,
           help="quantize the lm_head (the tied embedding's copy) on load too, weight-only with "
           "per-row scales in the quantization's 8-bit dtype: a batch-1 decode step streams it "
           "every step (needs --quantization or a pre-quantized checkpoint)"),
    Option("max_model_len", int, None, nullable=True, minimum=1, commands=COMMANDS,
           aliases=(Alias("--context", (PLAN,)),), default_text="min(model max positions, 4096)",
           help="context length per sequence (prompt + output tokens)"),
    Option("max_num_seqs", int, 64, minimum=1, commands=COMMANDS, command_defaults={GENERATE: 8},
           help="most sequences running at once (request rows of a step)"),
    Option("max_num_batched_tokens", int, None, nullable=True, minimum=1, commands=COMMANDS,
           command_defaults={GENERATE: 128},
           default_text="max(512, max_num_seqs)",
           help="token budget of one step (prefill chunks + decode tokens); a small budget "
           "compiles fewer step buckets"),
    Option("num_pages", int, None, nullable=True, minimum=2, default_text="sized by gpu_memory_utilization",
           help="KV pool size in pages, page 0 being the null page"),
    Option("gpu_memory_utilization", float, 0.9, commands=COMMANDS, rule="a fraction in (0, 1]",
           check=lambda v: 0.0 < v <= 1.0,
           help="share of each device's memory the engine may use for weights, activations and "
           "the KV pool (vLLM's name): JAX's GPU allocator is set to it before the backend "
           "starts, and the pool takes what the weights, the runner's state and the measured "
           "activation peak leave of it"),
    Option("activation_memory_bytes", int, None, nullable=True, minimum=0, commands=COMMANDS,
           default_text="measured at start-up (the step programs' peak); plan: estimated",
           help="device bytes kept free for a step's activations (temporaries, logits, sampler); "
           "set it to skip the start-up measurement, or to plan with the figure start-up logs"),
    Option("kv_cache_memory_fraction", float, None, nullable=True, commands=COMMANDS,
           rule="a fraction in (0, 1]", check=lambda v: 0.0 < v <= 1.0, default_text="unset",
           help="deprecated alias of gpu_memory_utilization (a warning says so)"),
    Option("page_size", int, 16, commands=COMMANDS, rule="a power of two >= 1", check=_power_of_two,
           help="tokens per KV page"),
    Option("kv_cache_dtype", str, "auto", commands=COMMANDS, choices=("auto", *DTYPES, *KV_QUANT_DTYPES),
           normalize=_kv_dtype_alias,
           help="KV cache dtype (auto = the weight dtype); fp8 (e4m3) and int8 store 1 byte per "
           "value with a float32 scale per page and kv head, chosen when the page is started "
           "(pallas_kernels/kv_write/scales.py)"),
    Option("tensor_parallel_size", int, 1, minimum=1, commands=COMMANDS, aliases=("--tp",),
           help="devices of one host that shard attention heads and MLP columns"),
    Option("pipeline_parallel_size", int, 1, minimum=1, commands=COMMANDS, aliases=("--pp",),
           help="pipeline stages: the layers split into this many groups, each on its own "
           "tensor_parallel_size devices (pp x tp in all); a step's tokens flow through the "
           "stages in micro-batches (docs/architecture.md); pp > 1 turns flash prefill off"),
    Option("data_parallel_size", int, 1, minimum=1, aliases=("--dp",),
           help="engine replicas (each on tensor_parallel_size devices of its own) behind one "
           "API; requests are routed by load and prompt-prefix affinity"),
    Option("prefill_devices", tuple, None, nullable=True, rule="a non-empty list of distinct "
           "device indices >= 0", check=_device_list, default_text="off (prefill and decode share devices)",
           help="prefill/decode disaggregation: the device indices (comma-separated on the CLI) of "
           "the prefill group, which prefills prompts and samples their first token; set with "
           "decode_devices (docs/disaggregation.md)"),
    Option("decode_devices", tuple, None, nullable=True, rule="a non-empty list of distinct "
           "device indices >= 0", check=_device_list, default_text="off",
           help="prefill/decode disaggregation: the device indices of the decode group, which "
           "takes each prefilled request's KV pages and generates the rest"),
    Option("coordinator_address", str, None, nullable=True,
           default_text="$JSERVE_COORDINATOR_ADDRESS, else one process",
           help="host:port of process 0's coordinator, for a job of several processes "
           "(jax.distributed; scripts/launch_multihost)"),
    Option("num_processes", int, None, nullable=True, minimum=1, default_text="$JSERVE_NUM_PROCESSES, else 1",
           help="processes of a multi-process job; the mesh spans all their devices"),
    Option("process_id", int, None, nullable=True, minimum=0, default_text="$JSERVE_PROCESS_ID",
           help="this process's index in [0, num_processes): process 0 schedules and serves, the "
           "others run the same steps and exit when it stops"),
    Option("distributed_timeout_s", int, 60, minimum=1,
           help="seconds the processes of a job wait to join, and for a step's results, before "
           "a peer is declared dead (the others exit with an error)"),
    Option("seed", int, 0, minimum=0, help="seed of random weights and of requests sent without a seed"),
    Option("random_weights", bool, False,
           help="run a named shape (llama3.1-8b, qwen2.5-0.5b, ...) with random weights: benchmarks"),
    Option("compilation_cache_dir", str, None, nullable=True, default_text="~/.cache/jserve/xla",
           help="JAX persistent compilation cache of the step functions ('' disables it)"),
    Option("max_waiting", int, 1024, minimum=1, commands=(SERVE,),
           help="bounded waiting queue; requests past it get 429 / RESOURCE_EXHAUSTED"),
    Option("enable_prefix_caching", bool, True, help="reuse the KV of shared prompt prefixes"),
    Option("swap_space_gb", float, 4.0, aliases=("--swap-space",), rule="a number of GiB >= 0",
           commands=COMMANDS, check=lambda v: v >= 0,
           help="host memory (GiB) for the KV pages of preempted requests"),
    Option("host_kv_cache_gb", float, 0.0, rule="a number of GiB >= 0", check=lambda v: v >= 0,
           commands=COMMANDS,
           help="host memory (GiB) that keeps KV pages evicted from the device prefix cache, "
           "for later hits (0 = off)"),
    Option("preemption_mode", str, "swap", choices=("swap", "recompute"), commands=COMMANDS,
           help="what a preempted request's KV does: move to host memory, or be recomputed"),
    Option("flash_prefill_min_tokens", int, 1024, minimum=0,
           help="steps of at least this many tokens made only of fresh prompts attend with the "
           "flash kernel instead of the paged one (0 = never)"),
    Option("speculative_config", str, None, nullable=True, mapping=True, normalize=canonical_json,
           default_text="off", commands=COMMANDS,
           help="speculative decoding, vLLM's JSON: {\"method\": \"ngram\", "
           "\"num_speculative_tokens\": k, \"prompt_lookup_min\": a, \"prompt_lookup_max\": b} "
           "or {\"method\": \"draft_model\", \"model\": \"code-draft\", "
           "\"num_speculative_tokens\": k}; optional \"disable_by_batch_size\": N"),
    Option("num_scheduler_steps", int, 1, minimum=1, commands=COMMANDS,
           help="decode steps run by one device program when every running request decodes with "
           "no logprobs, grammar or top-k/top-p/min-p and at most the smallest token bucket's "
           "rows run (vLLM's multi-step "
           "scheduling: the host's per-step cost is paid once per N tokens; tokens after a stop "
           "inside the N are computed and dropped; 1 = off; at pipeline parallelism any number "
           "of rows, circling through the stages in groups, even while requests wait; not with "
           "speculative decoding, several processes or disaggregation)"),
    Option("grammar_device_states", int, None, nullable=True, minimum=0, commands=COMMANDS,
           default_text="as many as 256 MiB holds, at most 2048; 0 with speculative decoding, "
           "several processes or disaggregation",
           help="rows of the on-device token-automaton table (int16 [states, vocab], counted in "
           "the memory budget): a JSON schema, regex or choice that compiles to a token "
           "automaton this small is masked and advanced inside the step, with no host work per "
           "token; grammars, any-JSON objects and larger specs run on the host (llguidance); "
           "0 = all on the host"),
    Option("async_scheduling", bool, True,
           help="overlap host scheduling of step N+1 with the device running step N (off: a "
           "synchronous loop, the reference)"),
)

OPTIONS: Mapping[str, Option] = MappingProxyType({o.name: o for o in ENGINE_OPTIONS})


def options_for(command: str) -> tuple[Option, ...]:
    """The options ``command`` (generate, serve or plan) exposes as flags, in declaration order."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    return tuple(o for o in ENGINE_OPTIONS if command in o.commands)


def default_of(name: str) -> Any:
    """The declared default of option ``name`` (config dataclasses take their defaults here)."""
    return OPTIONS[name].default


def validate_fields(obj: Any, *names: str) -> None:
    """Validate the fields ``names`` of the frozen dataclass ``obj`` (none given: every field
    named like a declared option) by their options, and store the canonical values (``bf16`` ->
    ``bfloat16``, ``4`` -> ``4.0``). ValueError names the field."""
    for name in names or [f.name for f in dataclasses.fields(obj) if f.name in OPTIONS]:
        object.__setattr__(obj, name, OPTIONS[name].validate(getattr(obj, name)))


def check_keywords(owner: str, names: Iterable[str], allowed: Iterable[str] = OPTIONS) -> None:
    """TypeError naming the first keyword not in ``allowed``, as Python words it for a function."""
    allowed = list(allowed)
    for name in names:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}{hint}")


def _engine_args_post_init(self: Any) -> None:
    validate_fields(self)


EngineArgs = dataclasses.make_dataclass(
    "EngineArgs",
    [(o.name, o.annotation, field(default=o.default)) for o in ENGINE_OPTIONS],
    frozen=True, kw_only=True, module=__name__,
    namespace={"__post_init__": _engine_args_post_init,
               "__doc__": "User-facing start-up options (``LLM(...)`` keywords and ``jserve`` "
                          "flags): one field per ``ENGINE_OPTIONS`` entry, validated on construction."},
)
