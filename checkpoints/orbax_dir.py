"""Orbax checkpoint directories: a model's arrays written once, restored onto any mesh.

Where it sits: ``jserve convert`` writes one (``save_orbax_dir``) from params it has already
laid out; ``LLM(model=<that dir>)`` recognises it (``is_orbax_dir``), validates it
(``OrbaxModelDir``) and restores every array straight into the ``NamedSharding`` the serving
mesh asks for (``restore_arrays``). Orbax reads only the chunks each device's shard covers, so
restoring onto a different tensor-parallel size (or a mesh spanning several processes) is the
same call with different target shardings::

    <dir>/jserve_checkpoint.json   format, layout name, dtype, quantization, {array: shape, dtype}
    <dir>/config.json              the HF config, verbatim
    <dir>/tokenizer.json ...       the tokenizer files, verbatim
    <dir>/params/                  orbax (OCDBT) tree {array name: array}

The arrays are opaque here: what they mean (the layout) is the caller's business, named by
``layout`` in the metadata so a reader can refuse a layout it does not know. Depends on jax and
orbax only.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from checkpoints.errors import CheckpointError
from checkpoints.hf_dir import CONFIG_FILE, TOKENIZER_FILES

METADATA_FILE = "jserve_checkpoint.json"
PARAMS_DIR = "params"
FORMAT = "jserve-orbax"
FORMAT_VERSION = 1
COPIED_FILES = (*TOKENIZER_FILES, "chat_template.jinja")


def is_orbax_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``save_orbax_dir`` (it has the metadata file)."""
    return (Path(path) / METADATA_FILE).is_file()


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON in {what}: {e}") from e


class OrbaxModelDir:
    """A validated orbax model directory. Attributes: ``path``, ``config`` (the HF config dict),
    ``metadata`` (the jserve_checkpoint.json dict), ``arrays`` ({name: (shape, dtype name)}),
    ``layout``, ``dtype``, ``quantization`` (None: plain weights)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).resolve()
        meta_path = self.path / METADATA_FILE
        if not meta_path.is_file():
            raise CheckpointError(f"{self.path}: not an orbax model directory (no {METADATA_FILE}); "
                                  f"write one with `jserve convert`")
        meta = _read_json(meta_path, "checkpoint metadata")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{meta_path}: 'format' must be {FORMAT!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{meta_path}: format version {meta.get('version')!r} is not "
                                  f"supported (this jserve reads version {FORMAT_VERSION})")
        arrays = meta.get("arrays")
        if not isinstance(arrays, dict) or not arrays:
            raise CheckpointError(f"{meta_path}: 'arrays' must be a non-empty object")
        self.arrays: dict[str, tuple[tuple[int, ...], str]] = {}
        for name, info in arrays.items():
            try:
                self.arrays[name] = (tuple(int(n) for n in info["shape"]), str(info["dtype"]))
            except (TypeError, KeyError, ValueError):
                raise CheckpointError(f"{meta_path}: array {name!r} needs 'shape' and 'dtype'") from None
        self.metadata: dict[str, Any] = meta
        self.layout: str = str(meta.get("layout"))
        self.dtype: str = str(meta.get("dtype"))
        self.quantization: str | None = meta.get("quantization")
        config_path = self.path / CONFIG_FILE
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: missing config.json in orbax model directory")
        config = _read_json(config_path, "model config")
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: model config must be a JSON object")
        self.config: dict[str, Any] = config
        if not (self.path / PARAMS_DIR).is_dir():
            raise CheckpointError(f"{self.path / PARAMS_DIR}: missing the orbax params directory")

    def check_arrays(self, expected: Mapping[str, tuple[tuple[int, ...], Any]]) -> None:
        """CheckpointError naming the array unless the stored names and shapes are ``expected``'s
        ({name: (shape, dtype)}; dtypes may differ: restore casts)."""
        meta = self.path / METADATA_FILE
        missing = sorted(set(expected) - set(self.arrays))
        extra = sorted(set(self.arrays) - set(expected))
        if missing or extra:
            raise CheckpointError(f"{meta}: arrays do not match this jserve's layout {self.layout!r} "
                                  f"(missing {missing}, unexpected {extra}); re-run `jserve convert`")
        for name, (shape, _) in expected.items():
            if self.arrays[name][0] != tuple(shape):
                raise CheckpointError(f"{meta}: array {name!r} has shape {self.arrays[name][0]}, expected "
                                      f"{tuple(shape)}; re-run `jserve convert` with this jserve")

    def __repr__(self) -> str:
        return f"OrbaxModelDir({str(self.path)!r}, {len(self.arrays)} arrays, layout {self.layout!r})"


def save_orbax_dir(output: str | os.PathLike, arrays: Mapping[str, jax.Array], *,
                   source_dir: str | os.PathLike, layout: str, dtype: str, quantization: str | None = None,
                   extra_files: Iterable[str] = COPIED_FILES, overwrite: bool = False) -> Path:
    """Write ``arrays`` (any sharding) with orbax plus the metadata, and copy ``config.json`` and
    the tokenizer files from ``source_dir``. Every process of a multi-process job calls it (orbax
    writes each process's shards); -> the output path."""
    out = Path(output).resolve()
    if out.exists():
        if not overwrite:
            raise CheckpointError(f"output {out} already exists (pass overwrite=True / --overwrite "
                                  f"to replace it)")
        if not is_orbax_dir(out):
            raise CheckpointError(f"output {out} exists and is not an orbax model directory; "
                                  f"refusing to replace it")
        if jax.process_index() == 0:
            shutil.rmtree(out)
    source = Path(source_dir)
    if not (source / CONFIG_FILE).is_file():
        raise CheckpointError(f"{source / CONFIG_FILE}: missing config.json to copy")
    import orbax.checkpoint as ocp  # a heavy import, only where a checkpoint is written or read

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out / PARAMS_DIR, dict(arrays))
    checkpointer.wait_until_finished()
    checkpointer.close()
    if jax.process_index() == 0:
        for name in (CONFIG_FILE, *extra_files):
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "layout": layout, "dtype": dtype,
                "quantization": quantization,
                "arrays": {k: {"shape": list(v.shape), "dtype": np.dtype(v.dtype).name}
                           for k, v in arrays.items()}}
        tmp = out / (METADATA_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        tmp.replace(out / METADATA_FILE)   # written last: its presence means the directory is whole
    return out


def restore_arrays(model_dir: OrbaxModelDir,
                   targets: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """Restore every array into its target (shape, dtype, sharding): orbax reads only the chunks
    each addressable device's shard covers and casts to the target dtype."""
    model_dir.check_arrays({k: (t.shape, t.dtype) for k, t in targets.items()})
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    try:
        restored = checkpointer.restore(model_dir.path / PARAMS_DIR, dict(targets))
    except (ValueError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"{model_dir.path / PARAMS_DIR}: cannot restore the orbax checkpoint: "
                              f"{e}") from e
    finally:
        checkpointer.close()
    return dict(restored)
