"""Step executables kept serialized beside JAX's compilation cache: a warm start loads them
without tracing or lowering.

Where it sits: start-up (``Runner.compile`` -> ``compile_pool.compile_in_order``). JAX's
persistent cache serves an executable only for a program that was traced, lowered and hashed
again: on an H200 a warm start of Llama-3.1-8B spent 11.1 of its 29.7 s compile phase tracing
and lowering its 16 step variants (benchmarks/RESULTS_v2_sessions_16-18.md, session 17). Each
step program that start-up compiles is also kept here, serialized
(``jax.experimental.serialize_executable``), under a key that covers what the program depends on::

    <compilation_cache_dir>/jserve_executables/<sha256 of the key>.exe
        key: the engine's fingerprint (``startup_cache.engine_fingerprint``: configuration,
             parameters' shapes, dtypes and shardings, mesh and devices, JAX / jaxlib / jserve
             versions, XLA and JAX environment variables, the source of jserve, pallas_kernels
             and sharding) + the KV pool's shape + the program's name + its XLA options
        file: pickle of (serialized executable, input tree, output tree, its devices' ids)

The key does not cover a module constant changed in-process (a kernel's A/B switch, which
benchmarks set): an engine built under one needs a cache folder of its own, or it loads the
programs an unpatched engine stored (``benchmarks/step_floor.ab_cache_dir``; session 43).

A program XLA cannot serialize is compiled on every start; a file that fails to load is
deleted and its program compiled again. GPU and TPU engines of one process only (the builder):
XLA:CPU refuses some sort comparators and its loaded step programs fail to run ("Function ...
not found"), and a job's executables name its processes' devices. Nothing is pruned: delete the
folder to reclaim its space (one file per step variant and engine shape). Loading unpickles
from that folder, so it is exactly as trusted as JAX's own cache beside it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import jax
from jax.experimental import serialize_executable

from jserve.startup_cache import write_atomically

log = logging.getLogger(__name__)

FOLDER = "jserve_executables"


class ExecutableCache:
    """Serialized executables of one engine shape (``fingerprint``) under ``folder``."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str) -> None:
        self.folder = Path(folder) / FOLDER
        self.fingerprint = fingerprint
        self.loaded = self.stored = 0   # counts, for the start-up log and tests
        self._lock = threading.Lock()   # loads and stores run on compile threads

    def _path(self, name: str, options: dict[str, Any]) -> Path:
        key = "\n".join((self.fingerprint, name, repr(sorted(options.items()))))
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()}.exe"

    def load(self, name: str, options: dict[str, Any]) -> Any | None:
        """The executable stored for ``name`` compiled with ``options``, or None."""
        path = self._path(name, options)
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        try:
            payload, in_tree, out_tree, device_ids = pickle.loads(blob)
            by_id = {d.id: d for d in jax.devices()}
            exe = serialize_executable.deserialize_and_load(
                payload, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids])
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: compile again
            log.warning("dropping the stored executable %s of %s: %s: %s", path.name, name,
                        type(e).__name__, str(e)[:200])
            path.unlink(missing_ok=True)
            return None
        with self._lock:
            self.loaded += 1
        return exe

    def store(self, name: str, options: dict[str, Any], compiled: Any) -> None:
        """Keep ``compiled`` for ``name`` (atomically; a program that cannot be serialized is
        skipped)."""
        try:
            devices = compiled._executable.xla_executable.local_devices()   # the program's own
            blob = pickle.dumps((*serialize_executable.serialize(compiled), [d.id for d in devices]))
        except Exception as e:  # noqa: BLE001 - XLA says which programs it cannot serialize
            log.debug("not keeping %s: %s: %s", name, type(e).__name__, str(e)[:200])
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomically(self._path(name, options), blob)
        except OSError as e:
            log.warning("could not keep the executable of %s in %s: %s", name, self.folder, e)
            return
        with self._lock:
            self.stored += 1


def load_again(compiled: Any) -> Any:
    """A second loaded executable of ``compiled``'s program (serialized and loaded on the same
    devices): its own runtime state, so its own CUDA graph (``host_outputs.HostOutputStep``'s
    twins). GPU and TPU only (XLA:CPU's loaded programs fail to run, as above)."""
    devices = compiled._executable.xla_executable.local_devices()
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree, execution_devices=devices)
