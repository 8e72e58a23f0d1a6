"""A test helper: record the calls of a kernel entry point (its first operand's shape each time it
is traced) while the real function runs."""

from typing import Any


def recorded(monkeypatch: Any, module: Any, name: str) -> list[tuple[int, ...]]:
    """Wrap ``module.name`` for the test: each call appends its first argument's shape to the
    returned list, then runs the real function."""
    calls: list[tuple[int, ...]] = []
    real = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls
