"""Paths of the committed test fixtures (importable from any test directory)."""

from pathlib import Path

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
ARCHS = ("llama", "qwen2", "mistral")
