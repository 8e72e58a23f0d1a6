"""The option declaration (jserve/options.py) is the one source: every option is a flag of the
commands it names with its default in --help, an ``EngineArgs`` field / ``LLM`` keyword with the
same default, and reaches ``EngineConfig``; ``jserve plan`` uses the declared defaults. No model
is loaded or compiled here."""

import dataclasses
import inspect
import re
import warnings

import pytest
from fixture_paths import GOLDEN

from jserve.builder import make_engine_config, resolve_model
from jserve.cli import build_parser, engine_args_from, main, option_values
from jserve.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from jserve.options import (
    COMMANDS,
    ENGINE_OPTIONS,
    OPTIONS,
    EngineArgs,
    Option,
    default_of,
    options_for,
)
from jserve.plan import plan_capacity
from server.cli import build_full_parser

# Options start-up reads directly (model loading, compile cache) instead of EngineConfig.
_BUILD_ONLY = {"model", "dtype", "quantization", "quantize_lm_head", "random_weights",
               "compilation_cache_dir"}


def _parser_for(command: str):
    return (build_full_parser() if command == "serve" else build_parser())


def _help_blocks(command: str, capsys) -> dict[str, str]:
    """``--flag`` -> its entry (flags and help, whitespace-normalized) in ``jserve COMMAND --help``."""
    with pytest.raises(SystemExit):
        _parser_for(command).parse_args([command, "--help"])
    text = capsys.readouterr().out
    blocks: list[list[str]] = []
    for line in text.split("options:", 1)[1].splitlines():
        if re.match(r"^  -", line):
            blocks.append([line])
        elif blocks and line.strip():
            blocks[-1].append(line)
    out = {}
    for b in blocks:
        entry = " ".join(" ".join(b).split())
        for flag in re.findall(r"(?:^|, )(--[a-z0-9-]+)", entry):
            out[flag] = entry
    return out


def _shown_default(opt: Option, command: str) -> str:
    if command in opt.command_defaults or opt.default_text is None:
        return str(opt.default_for(command))
    return opt.default_text


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_is_a_flag_with_its_default_in_help(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")   # no wrapping inside a default text
    blocks = _help_blocks(command, capsys)
    for opt in options_for(command):
        for flag in opt.flags(command):
            assert flag in blocks, f"{command} --help lacks {flag}"
            assert f"(default: {_shown_default(opt, command)})" in blocks[flag], blocks[flag]
        if opt.type is bool:
            assert f"--no-{opt.flag[2:]}" in blocks
    exposed = {o.name for o in options_for(command)}
    for opt in ENGINE_OPTIONS:
        if opt.name not in exposed:
            assert opt.flag not in blocks, f"{command} exposes {opt.flag} but the declaration does not"


def test_parsed_defaults_are_the_declared_ones():
    for command in COMMANDS:
        ns = _parser_for(command).parse_args([command])
        assert option_values(ns) == {o.name: o.default_for(command) for o in options_for(command)}
    # generate's small batch is a declared command default; the Python default is the engine's.
    assert OPTIONS["max_num_seqs"].default_for("generate") == 8
    assert engine_args_from(build_parser().parse_args(["generate"])).max_num_seqs == 8


def test_engine_args_fields_and_llm_keywords_are_the_declaration(monkeypatch):
    fields = dataclasses.fields(EngineArgs)
    assert [f.name for f in fields] == [o.name for o in ENGINE_OPTIONS]
    assert all(f.default == OPTIONS[f.name].default and f.kw_only for f in fields)
    assert EngineArgs() == EngineArgs(**{o.name: o.default for o in ENGINE_OPTIONS})

    import jserve.llm

    built = []
    monkeypatch.setattr(jserve.llm, "build_engine", lambda args, progress=None: built.append(args))
    jserve.llm.LLM(**{o.name: o.default for o in ENGINE_OPTIONS})
    jserve.llm.LLM()
    assert built == [EngineArgs(), EngineArgs()]


def test_config_dataclasses_take_the_declared_defaults():
    for cls in (CacheConfig, SchedulerConfig, ParallelConfig):
        for f in dataclasses.fields(cls):
            if f.name in OPTIONS and OPTIONS[f.name].default is not None:
                assert f.default == OPTIONS[f.name].default, f"{cls.__name__}.{f.name}"
    assert {f.name for f in dataclasses.fields(CacheConfig)} <= set(OPTIONS)


def _another_value(opt: Option):
    """A valid value other than the default (for a None default: a valid concrete one)."""
    if opt.type is bool:
        return not opt.default
    if opt.type is tuple:
        return (1,)
    if opt.choices:
        return next(c for c in opt.choices if c != opt.default)
    if opt.mapping:
        return opt.validate({"method": "ngram", "num_speculative_tokens": 2})
    if opt.type is str:
        return "some/dir"
    base = opt.default if opt.default is not None else 512
    for v in (base * 2, base + 1, 0.5):
        try:
            if opt.validate(v) != opt.default:
                return opt.validate(v)
        except ValueError:
            continue
    raise AssertionError(opt.name)


def _argv(opt: Option, value) -> list[str]:
    if opt.type is bool:
        return [opt.flag if value else f"--no-{opt.flag[2:]}"]
    if opt.type is tuple:
        return [opt.flag, ",".join(map(str, value))]
    return [opt.flag, str(value)]


def _config_value(config: EngineConfig, name: str):
    if name == "speculative_config":   # parsed into EngineConfig.speculative
        return config.speculative.to_json()
    if name == "kv_cache_memory_fraction":   # the deprecated alias sets gpu_memory_utilization
        return config.cache.gpu_memory_utilization
    for part in (config.cache, config.scheduler, config.parallel, config):
        if name in {f.name for f in dataclasses.fields(part)}:
            return getattr(part, name)
    raise AssertionError(f"{name} reaches no EngineConfig field")


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_a_value_from_the_cli_reaches_engine_config(command):
    model_cfg, _ = resolve_model(EngineArgs(model=str(GOLDEN / "llama")))
    for opt in options_for(command):
        value = _another_value(opt)
        ns = _parser_for(command).parse_args([command, *_argv(opt, value)])
        args = engine_args_from(ns)
        assert getattr(args, opt.name) == value, opt.name
        if opt.name in _BUILD_ONLY:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # kv_cache_memory_fraction: deprecated
            config = make_engine_config(args, model_cfg)
        assert _config_value(config, opt.name) == value, opt.name


def test_async_scheduling_and_aliases():
    ns = build_parser().parse_args(["generate", "--no-async-scheduling", "--tp", "2",
                                    "--swap-space", "2"])
    a = engine_args_from(ns)
    assert (a.async_scheduling, a.tensor_parallel_size, a.swap_space_gb) == (False, 2, 2.0)
    assert EngineArgs().async_scheduling is True and SchedulerConfig().async_scheduling is True
    serve = build_full_parser().parse_args(["serve", "--max-waiting", "7", "--async-scheduling"])
    assert (serve.max_waiting, serve.async_scheduling) == (7, True)
    assert build_parser().parse_args(["plan", "--context", "4096"]).max_model_len == 4096
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--context", "4096"])   # plan's alias only


def test_cli_usage_error_names_the_field(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--page-size", "12"])
    assert e.value.code == 2
    assert "argument --page-size: page_size must be a power of two >= 1, got 12" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--gpu-memory-utilization", "1.5"])
    assert "gpu_memory_utilization must be a fraction in (0, 1], got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize("opt", ENGINE_OPTIONS, ids=lambda o: o.name)
def test_bad_values_are_value_errors_naming_the_field(opt):
    with pytest.raises(ValueError, match=f"^{opt.name} must be "):
        EngineArgs(**{opt.name: object()})
    import jserve.llm

    with pytest.raises(ValueError, match=f"^{opt.name} must be "):
        jserve.llm.LLM(**{opt.name: [1.5]})   # a list of a float: no option's value


def test_every_integer_option_declares_its_bound():
    """No int option takes any integer: ``seed -1`` reached numpy as "expected non-negative
    integer", naming nothing."""
    unbounded = [o.name for o in ENGINE_OPTIONS
                 if o.type is int and o.minimum is None and o.check is None and not o.choices]
    assert not unbounded
    with pytest.raises(ValueError, match="^seed must be an integer >= 0, got -1"):
        EngineArgs(seed=-1)


def test_canonical_values():
    a = EngineArgs(dtype="bf16", kv_cache_dtype="fp16", swap_space_gb=2, page_size=8)
    assert (a.dtype, a.kv_cache_dtype, a.swap_space_gb) == ("bfloat16", "float16", 2.0)
    assert isinstance(a.swap_space_gb, float)
    with pytest.raises(ValueError, match="max_num_seqs must be an integer >= 1, got True"):
        EngineArgs(max_num_seqs=True)
    with pytest.raises(ValueError, match="num_pages must be an integer >= 2 or None, got 1"):
        EngineArgs(num_pages=1)


def test_unknown_llm_keyword_is_a_type_error_naming_it():
    from jserve.llm import LLM

    with pytest.raises(TypeError, match=r"LLM\(\) got an unexpected keyword argument 'max_num_seq'; "
                                        r"did you mean 'max_num_seqs'\?"):
        LLM(max_num_seq=4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'gpu_memory_utilisation'; "
                                        "did you mean 'gpu_memory_utilization'"):
        LLM(gpu_memory_utilisation=0.9)


def test_plan_uses_the_declared_defaults():
    assert list(inspect.signature(plan_capacity).parameters) == ["model", "gpu", "options"]
    c = plan_capacity("llama3.1-8b").config
    assert c.cache.gpu_memory_utilization == default_of("gpu_memory_utilization") == 0.9
    assert c.cache.page_size == default_of("page_size")
    assert c.scheduler.max_num_seqs == default_of("max_num_seqs")
    assert c.cache.kv_cache_dtype == default_of("kv_cache_dtype")
    assert c.parallel.tensor_parallel_size == default_of("tensor_parallel_size")
    ns = build_parser().parse_args(["plan"])
    assert {o.name: getattr(ns, o.name) for o in options_for("plan")} == \
        {o.name: o.default for o in options_for("plan")}
    with pytest.raises(TypeError, match="plan_capacity.*'num_pages'"):
        plan_capacity("llama3.1-8b", num_pages=100)   # not a plan option


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "bad-name"}, "identifier"),
    ({"type": list}, "Option.type"),
    ({"commands": ("bench",)}, "Option.commands"),
    ({"rule": "even"}, "rule and Option.check"),
    ({"aliases": ("-x",)}, "bad alias"),
    ({"command_defaults": {"plan": 3}}, "command_defaults"),
    ({"default": -1}, "^x must be an integer >= 0, got -1"),
])
def test_a_bad_declaration_fails_at_import(kwargs, match):
    base = dict(name="x", type=int, default=0, help="h", minimum=0)
    with pytest.raises(ValueError, match=match):
        Option(**(base | kwargs))


def test_engine_config_lost_its_dead_fields():
    assert "compilation_cache_dir" not in {f.name for f in dataclasses.fields(EngineConfig)}
    assert not hasattr(EngineConfig, "replace")


def test_kv_cache_memory_fraction_is_a_deprecated_alias():
    """The old option still works, with a FutureWarning naming its replacement."""
    model_cfg, _ = resolve_model(EngineArgs(model=str(GOLDEN / "llama")))
    with pytest.warns(FutureWarning, match="kv_cache_memory_fraction is deprecated.*"
                                           "gpu_memory_utilization=0.7"):
        config = make_engine_config(EngineArgs(kv_cache_memory_fraction=0.7), model_cfg)
    assert config.cache.gpu_memory_utilization == 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the new name alone: no warning
        assert make_engine_config(EngineArgs(gpu_memory_utilization=0.7),
                                  model_cfg).cache.gpu_memory_utilization == 0.7
    ns = _parser_for("plan").parse_args(["plan", "--kv-cache-memory-fraction", "0.6"])
    assert engine_args_from(ns).kv_cache_memory_fraction == 0.6
    with pytest.warns(FutureWarning):
        plan = plan_capacity("llama3.1-8b", kv_cache_memory_fraction=0.6)
    assert plan.config.cache.gpu_memory_utilization == 0.6
