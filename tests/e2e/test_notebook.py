"""examples/quickstart.ipynb executes top to bottom on CPU (nbclient, the test's own interpreter)."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook test needs the test extras (nbformat)")
nbclient = pytest.importorskip("nbclient", reason="notebook test needs the test extras (nbclient)")

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "quickstart.ipynb"


def _text(cell, stream: str = "stdout") -> str:
    """The cell's ``stream`` text (stdout: what the cell prints; stderr: start-up progress) and,
    for stdout, its displayed values."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            if out.get("name", "stdout") == stream:
                parts.append(out["text"])
        elif stream != "stdout":
            continue
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def test_quickstart_notebook_executes():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()   # raises CellExecutionError on the first failing cell
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [_text(c) for c in code]
    assert all(not any(o.get("output_type") == "error" for o in c.get("outputs", [])) for c in code)
    assert outputs[1].startswith("def fibonacci(n):\n") and "--- " in outputs[1]
    assert "[jserve] compiled step 1/" in _text(code[1], "stderr")  # LLM() shows its progress
    assert outputs[2].count("=" * 40) == 3
    assert outputs[3].startswith("def is_prime(n):") and "\n--- " in outputs[3]
    assert "55 concurrent sequences of 8,192 tokens" in outputs[4]
    assert outputs[5] == ""   # the own-model cell does nothing until a path is set
