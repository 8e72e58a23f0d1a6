"""Start-up measurements kept beside JAX's compilation cache, so a warm start skips them.

Where it sits: start-up (jserve/builder.py). The activation probe (jserve/activation_peak.py)
lowers and compiles the largest step programs over a 2-page pool to read their memory
analysis; on a restart of the same engine JAX's cache serves those executables, but lowering
them again still costs seconds per program. Its result, one integer, is stored here instead::

    <compilation_cache_dir>/jserve_startup.json    {fingerprint: {"activation_bytes": n}}

The fingerprint covers everything the measured programs depend on: the engine configuration,
the parameters' tree, shapes, dtypes and shardings, the mesh and its devices, the JAX, jaxlib
and jserve versions, JAX's x64 and matmul-precision settings, every ``XLA_*`` / ``JAX_*`` /
``LIBTPU_*`` environment variable (``XLA_FLAGS`` among them), and the source of the packages
that build the programs (jserve, pallas_kernels, sharding). Any change to one of them is a new
fingerprint, measured again. With the compilation cache off (an empty
``compilation_cache_dir``) nothing is kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

log = logging.getLogger(__name__)

FILE_NAME = "jserve_startup.json"
_PACKAGES = ("jserve", "pallas_kernels", "sharding")   # the code that builds the step programs
_ENV_PREFIXES = ("XLA_", "JAX_", "LIBTPU_")   # XLA_FLAGS, JAX's config variables, TPU flags


def _source_digest() -> str:
    """sha256 of every Python file of the packages that build the step programs."""
    import importlib

    h = hashlib.sha256()
    for name in _PACKAGES:
        root = Path(importlib.import_module(name).__file__).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _leaf_text(path: tuple, leaf: Any) -> str:
    sharding = getattr(leaf, "sharding", None)
    spec = getattr(sharding, "spec", sharding)
    kind = f"{getattr(leaf, 'shape', ())}:{getattr(leaf, 'dtype', type(leaf))}"
    return f"{jax.tree_util.keystr(path)}:{kind}:{spec}"


def engine_fingerprint(config: Any, params: Any, mesh: Mesh, *extra: Any) -> str:
    """A hex digest of everything a start-up measurement of this engine depends on (module
    docstring); ``extra``: more objects whose ``repr`` takes part (a draft model's config)."""
    import jaxlib

    from jserve import __version__

    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    parts = [repr(config), str(treedef), *(_leaf_text(p, x) for p, x in leaves),
             repr(dict(mesh.shape)), *(f"{d.platform}:{d.device_kind}" for d in mesh.devices.flat),
             jax.__version__, jaxlib.__version__, __version__,
             f"x64={jax.config.jax_enable_x64} precision={jax.config.jax_default_matmul_precision}",
             *(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)),
             _source_digest(), *map(repr, extra)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: a concurrent start-up
    reads the old file or the new one, never a part. Raises OSError (the temporary file gone)."""
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


class StartupCache:
    """The measurements of ``FILE_NAME`` in a compilation cache folder (None: kept nowhere)."""

    def __init__(self, folder: str | None) -> None:
        self.path = Path(folder) / FILE_NAME if folder else None

    def _load(self) -> dict[str, dict[str, int]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:   # a damaged file is measured again, then rewritten
            log.warning("ignoring %s: %s", self.path, e)
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, fingerprint: str, name: str) -> int | None:
        value = self._load().get(fingerprint, {}).get(name)
        return value if isinstance(value, int) else None

    def put(self, fingerprint: str, name: str, value: int) -> None:
        if self.path is None:
            return
        data = self._load()
        data.setdefault(fingerprint, {})[name] = int(value)
        try:
            write_atomically(self.path, json.dumps(data, indent=1, sort_keys=True).encode())
        except OSError as e:
            log.warning("could not keep the start-up measurement in %s: %s", self.path, e)
