"""The environment of a test's child process: this checkout first on PYTHONPATH, then whatever
the parent had there (on the GPU machine the wheels that travel with a run live there)."""

import os
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env(drop: Iterable[str] = (), **extra: str) -> dict[str, str]:
    """os.environ without the variables named in (or starting with a prefix in) ``drop``, with
    the checkout prepended to PYTHONPATH and ``extra`` set."""
    prefixes = tuple(drop)
    env = {k: v for k, v in os.environ.items() if not (prefixes and k.startswith(prefixes))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env
