"""The README a new user reads first: its Python snippets run as scripts (no top-level
``await``), its links stay inside the repository and exist, the gRPC client it shows is
examples/grpc_client.py, and it says how long the tests take. scripts/setup shows pip's progress."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_every_python_snippet_compiles_as_a_script():
    blocks = _python_blocks()
    assert len(blocks) >= 4
    for block in blocks:
        compile(block, "README.md", "exec")       # top-level `async for` / `await` fail here


def test_the_async_snippet_defines_and_runs_a_coroutine():
    block = next(b for b in _python_blocks() if "AsyncEngine" in b)
    tree = ast.parse(block)
    assert any(isinstance(n, ast.AsyncFunctionDef) for n in tree.body)
    assert "asyncio.run(" in block
    imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names}
    assert {"LLM", "SamplingParams", "AsyncEngine", "DeltaTracker", "asyncio"} <= imported


def test_links_stay_in_the_repository_and_exist():
    links = re.findall(r"\]\(([^)]+)\)", README)
    local = [u for u in links if not u.startswith(("http://", "https://", "#"))]
    assert "docs/architecture.md" in local
    for target in local:
        assert not target.startswith(("../", "/")), target
        assert (ROOT / target.split("#")[0]).exists(), target
    assert "../shared" not in README


def test_grpc_client_is_the_example_file():
    code = (ROOT / "examples" / "grpc_client.py").read_text()
    body = code.split('"""', 2)[2].strip()          # without the docstring
    assert len([ln for ln in body.splitlines() if ln.strip()]) <= 10
    assert body in README
    assert "server/proto/jserve.proto" in README and (ROOT / "server/proto/jserve.proto").is_file()


def test_readme_says_how_long_the_tests_take():
    assert "about 30 minutes on 2 CPU cores" in README


def test_setup_shows_pip_progress():
    setup = (ROOT / "scripts" / "setup").read_text()
    installs = [ln for ln in setup.splitlines() if "pip install" in ln]
    assert installs and not any(" -q" in ln for ln in installs)


def test_the_feature_snippet_uses_real_options_and_fields():
    """The speculative / quantization / structured-outputs snippet, run with ``LLM`` standing in
    for an option check: every keyword is an engine option with a valid value, each
    speculative config parses, and the structured-outputs request builds."""
    from jserve import SamplingParams, StructuredOutputsParams
    from jserve.options import EngineArgs
    from jserve.spec.config import SpeculativeConfig

    block = next(b for b in _python_blocks() if "speculative_config" in b)
    seen = []

    def llm(**kw):
        EngineArgs(**kw)
        if "speculative_config" in kw:
            SpeculativeConfig.from_mapping(kw["speculative_config"])
        seen.append(kw)

    scope = {"LLM": llm, "SamplingParams": SamplingParams,
             "StructuredOutputsParams": StructuredOutputsParams}
    body = "\n".join(line for line in block.splitlines() if not line.startswith("from "))
    exec(compile(body, "README.md", "exec"), scope)
    assert len(seen) == 3 and scope["sp"].structured_outputs.json is not None


def test_the_plan_example_is_what_plan_prints(capsys):
    """The ``jserve plan`` example's lines, each cut short at its ``...``, are pieces of what the
    command it shows prints today (session 57 found the example three state changes behind)."""
    from jserve.cli import main

    block = re.search(r"\n\$ (jserve plan [^\n]*)\n(.*?)```", README, flags=re.S)
    command, lines = block.group(1).split()[1:], block.group(2).splitlines()
    assert main(command) == 0
    out = capsys.readouterr().out
    pieces = [p.strip() for line in lines for p in line.split("...") if len(p.strip()) > 3]
    assert len(pieces) >= 10 and any("concurrent sequences" in p for p in pieces)
    for piece in pieces:
        assert piece in out, piece
