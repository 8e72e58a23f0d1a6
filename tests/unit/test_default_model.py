"""The bundled default models: HF layout under the size cap, loaded through ``checkpoints/``,
deterministic greedy text that parses as Python, and the no-argument entry points using them."""

import ast
import json
import math
from pathlib import Path

import pytest

from checkpoints import HFModelDir
from jserve.builder import DEFAULT_MODELS, EngineArgs, default_model_path, make_engine_config
from jserve.cli import main
from jserve.config import ModelConfig
from jserve.llm import LLM
from jserve.model.params import load_params, params_bytes
from jserve.sampling_params import SamplingParams
from sharding import make_mesh

SIZE_CAP_BYTES = 25_000_000
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md")


def _parsable_prefix_lines(source: str) -> int:
    """Lines in the longest line-prefix of ``source`` that parses as Python."""
    lines = source.splitlines()
    for n in range(len(lines), 0, -1):
        try:
            ast.parse("\n".join(lines[:n]))
            return n
        except SyntaxError:
            continue
    return 0


def test_hf_layout_size_cap_and_reported_figures():
    total = 0
    for name in DEFAULT_MODELS:
        d = default_model_path(name)
        for f in HF_FILES:
            assert (d / f).is_file(), f"{d / f} missing"
        total += sum(p.stat().st_size for p in d.glob("*.safetensors"))
        readme = (d / "README.md").read_text()
        assert "Held-out evaluation" in readme
        distilled = d / "distill_metrics.json"   # code-draft: layers of code-small, distilled from it
        if distilled.is_file():
            after = json.loads(distilled.read_text())["test_after"]
            assert f"| as shipped (distilled) | {after['ce']:.4f} | {math.exp(after['ce']):.2f} |" in readme
            assert f"{after['agreement']:.4f} as shipped" in readme
        else:                                    # code-small: trained from scratch
            metrics = json.loads((d / "training_metrics.json").read_text())
            assert f"| {metrics['test_loss']:.4f} | {metrics['test_perplexity']:.2f} |" in readme
    assert total <= SIZE_CAP_BYTES, f"bundled safetensors are {total} B, cap {SIZE_CAP_BYTES}"
    with pytest.raises(ValueError, match="no bundled model 'code-huge'"):
        default_model_path("code-huge")


def test_models_load_through_checkpoints_and_share_one_tokenizer():
    configs = []
    for name in DEFAULT_MODELS:
        model_dir = HFModelDir(default_model_path(name))
        cfg = ModelConfig.from_hf_config(model_dir.config, source=name)
        params = load_params(model_dir, cfg, make_mesh(1))
        assert cfg.architecture == "LlamaForCausalLM" and cfg.dtype == "bfloat16"
        assert params_bytes(params) == 2 * cfg.num_params()
        configs.append(cfg)
    small, draft = configs
    # A draft's cost at batch 1 is its depth (kernels per forward), not its width.
    assert draft.num_layers * 4 <= small.num_layers and draft.num_params() < small.num_params() / 2
    assert small.vocab_size == draft.vocab_size
    tok = [(default_model_path(n) / "tokenizer.json").read_bytes() for n in DEFAULT_MODELS]
    assert tok[0] == tok[1]


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory) -> Path:
    """An XDG cache root whose jserve/xla dir the LLM fixture fills, so the no-argument CLI run
    (which uses the default cache dir) finds its step functions compiled."""
    return tmp_path_factory.mktemp("xdg_cache")


@pytest.fixture(scope="module")
def llm(cli_cache) -> LLM:
    # The same engine shape as `jserve generate` with no flags (8 seqs, 128-token budget).
    return LLM(max_num_seqs=8, max_num_batched_tokens=128,
               compilation_cache_dir=str(cli_cache / "jserve" / "xla"))


def test_llm_without_a_model_is_code_small(llm):
    cfg = llm.engine.config
    assert llm.engine_args.model is None
    small = ModelConfig.from_hf_config(HFModelDir(default_model_path()).config)
    assert cfg.model == small
    assert cfg.scheduler.max_model_len == small.max_position_embeddings == 512
    assert make_engine_config(EngineArgs(), small).scheduler.max_model_len == 512


def test_greedy_is_deterministic_and_parses_as_python(llm):
    sp = SamplingParams(temperature=0.0, max_tokens=48)
    alone = llm.generate("def fibonacci(n):", sp)[0].outputs[0]
    batched = llm.generate(["class Stack:", "def fibonacci(n):", "import os\n"], sp)[1].outputs[0]
    assert alone.token_ids == batched.token_ids and alone.text == batched.text
    assert len(alone.token_ids) == 48 and len(set(alone.token_ids)) >= 12
    source = "def fibonacci(n):" + alone.text
    assert source.startswith("def fibonacci(n):\n    ")          # an indented body follows
    assert _parsable_prefix_lines(source) >= 3, source


def test_draft_model_generates_deterministically(xla_cache_dir):
    draft = LLM(model=str(default_model_path("code-draft")), max_model_len=128, max_num_seqs=4,
                max_num_batched_tokens=32, compilation_cache_dir=xla_cache_dir)
    sp = SamplingParams(temperature=0.0, max_tokens=24)
    a, b = (draft.generate(["def fibonacci(n):"], sp)[0].outputs[0] for _ in range(2))
    assert a.token_ids == b.token_ids and a.text.strip()


def test_jserve_generate_without_arguments(llm, cli_cache, monkeypatch, capsys):
    # The default compilation cache dir is $XDG_CACHE_HOME/jserve/xla: the one the llm fixture filled.
    monkeypatch.setenv("XDG_CACHE_HOME", str(cli_cache))
    assert main(["generate"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def fibonacci(n):\n")
    assert len(captured.out.strip().splitlines()) >= 3
    assert "tok/s" in captured.err
    expected = llm.generate("def fibonacci(n):", SamplingParams(temperature=0.0, max_tokens=64))[0]
    assert captured.out == "def fibonacci(n):" + expected.outputs[0].text + "\n"
    # The README shows this run's output: it must be what the command prints (stdout part).
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    sample = readme[readme.index("\ndef fibonacci(n):\n") + 1:readme.index("\n--- finish_reason=")]
    assert captured.out.rstrip("\n") == sample
