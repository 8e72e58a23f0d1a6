"""The ``jserve`` command line a new user meets: help and defaults on every flag, ``--version``,
``--log-level`` choices, one-line errors (no traceback) that name CLI flags, no TPU probe noise.
None of these builds an engine: every error is found before anything is loaded."""

from __future__ import annotations

import argparse
import logging
import os
import re
import tomllib
from pathlib import Path

import pytest

import jserve
from jserve.builder import DEFAULT_MODELS
from jserve.cli import cli_message, configure_logging
from jserve.model.shapes import NAMED_SHAPES
from server.cli import build_full_parser, main

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "jserve" / "default_model" / "code-small"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    out = {"jserve": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.update(action.choices)
    return out


@pytest.mark.parametrize("command", ["jserve", "generate", "serve", "bench", "plan"])
def test_every_flag_has_help_and_shows_its_default(command):
    parser = _subparsers(build_full_parser())[command]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                               argparse._SubParsersAction)):
            continue
        flag = action.option_strings[0]
        assert action.help, f"{command} {flag}: no help text"
        assert "default" in action.help, f"{command} {flag}: the help does not show the default"
    text = parser.format_help()       # every %(default)s expands
    assert "%(" not in text


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"jserve {jserve.__version__}"
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "jserve.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", jserve.__version__)


def test_log_level_has_choices(capsys):
    with pytest.raises(SystemExit):
        main(["--log-level", "loud", "plan"])
    err = capsys.readouterr().err
    assert "--log-level" in err and "DEBUG" in err and "WARNING" in err
    ns = build_full_parser().parse_args(["--log-level", "debug", "plan"])
    assert ns.log_level == "DEBUG"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("jserve: error: ")
    assert "Traceback" not in err[0]
    return err[0]


def test_unknown_model_lists_named_shapes_and_bundled_models(capsys, tmp_path):
    assert main(["serve", "--model", str(tmp_path / "nope"), "--compilation-cache-dir", ""]) == 2
    line = _one_error_line(capsys)
    for name in (*NAMED_SHAPES, *DEFAULT_MODELS):
        assert name in line
    assert "random_weights=True" not in line and "--random-weights" in line


def test_named_shape_without_random_weights_names_the_flag(capsys):
    assert main(["generate", "--model", "qwen2.5-0.5b", "--compilation-cache-dir", ""]) == 2
    line = _one_error_line(capsys)
    assert "--random-weights" in line and "random_weights=True" not in line


def test_missing_tokenizer_json_is_one_line(capsys, tmp_path):
    for name in ("config.json", "model.safetensors"):
        os.symlink(BUNDLED / name, tmp_path / name)
    assert main(["serve", "--model", str(tmp_path), "--compilation-cache-dir", ""]) == 2
    line = _one_error_line(capsys)
    assert str(tmp_path / "tokenizer.json") in line


def test_empty_served_model_name_is_refused_before_the_engine_builds(capsys):
    assert main(["serve", "--model", "nowhere", "--served-model-name", " "]) == 2
    assert "--served-model-name" in _one_error_line(capsys)   # not the model's error: checked first


@pytest.mark.parametrize("args, said", [
    (["--max-tokens", "0"], "--max-tokens must be an integer >= 1, got 0"),
    (["--top-p", "2"], "--top-p must be in (0, 1], got 2.0")])
def test_bad_sampling_flags_are_named_before_the_engine_builds(capsys, args, said):
    assert main(["generate", "--model", "nowhere", *args]) == 2   # not the model's error
    assert _one_error_line(capsys).endswith(said)


def test_cli_message_spells_flags():
    assert cli_message(ValueError("pass random_weights=True")) == "pass --random-weights"
    assert cli_message(ValueError("set enable_prefix_caching=False")) == "set --no-enable-prefix-caching"
    assert cli_message(ValueError("use max_model_len=512")) == "use --max-model-len 512"
    assert cli_message(ValueError("temperature=0 is fine")) == "temperature=0 is fine"  # not an option


def test_tpu_probe_line_is_hidden(caplog):
    configure_logging("INFO")
    caplog.set_level(logging.INFO)
    bridge = logging.getLogger("jax._src.xla_bridge")
    bridge.info("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so")
    bridge.info("another line")
    assert "Unable to initialize backend 'tpu'" not in caplog.text
    assert "another line" in caplog.text


@pytest.mark.parametrize("args", [["--base-url", "http://127.0.0.1:1"],
                                  ["--backend", "grpc", "--grpc-target", "127.0.0.1:1"]])
def test_bench_without_a_server_is_one_line(capsys, args):
    assert main(["bench", *args, "--num-prompts", "1", "--warmup", "0"]) == 2
    line = _one_error_line(capsys)
    assert "cannot reach" in line and "127.0.0.1:1" in line
