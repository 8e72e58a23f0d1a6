"""A validated Hugging Face model directory: config, safetensors tensor map, tokenizer files.

Where it sits: the first thing ``LLM(model=path)`` touches. ``HFModelDir`` reads
``config.json`` (parsed into ``jserve.config.ModelConfig`` by the engine) and every safetensors
header, so a broken download fails at start-up with a message naming the file and tensor, before
any device memory is used. ``checkpoints.loader`` then streams tensors from the byte ranges
recorded here.

Accepted layouts::

    config.json + model.safetensors                               (one file)
    config.json + model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                                                  (sharded; index "weight_map"
                                                                   decides tensor -> file)
    config.json + several *.safetensors, no index                 (map built from the headers;
                                                                   a tensor in two files is an error)
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from checkpoints.errors import CheckpointError
from checkpoints.safetensors_header import TensorEntry, read_safetensors_header

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json")


class TensorInfo(NamedTuple):
    shape: tuple[int, ...]
    dtype: str   # safetensors dtype code, e.g. "BF16", "F32", "F8_E4M3"
    file: str    # path of the .safetensors file holding it


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what}: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON in {what}: {e}") from e


class HFModelDir:
    """An HF model directory whose config and safetensors headers have been checked.

    Attributes: ``path``, ``config`` (the parsed config.json dict), ``safetensors_files``,
    ``index_path`` (None without an index), ``tokenizer_files`` ({file name: path} of those present).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"model directory {self.path} does not exist")
        if not self.path.is_dir():
            raise CheckpointError(f"model path {self.path} is not a directory")
        config_path = self.path / CONFIG_FILE
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: missing config.json in model directory {self.path}")
        config = _read_json(config_path, "model config")
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: model config must be a JSON object")
        self.config: dict[str, Any] = config
        self.tokenizer_files: dict[str, Path] = {
            name: self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()}
        index_path = self.path / INDEX_FILE
        self.index_path: Path | None = index_path if index_path.is_file() else None
        if self.index_path is not None:
            self._entries = self._entries_from_index(self.index_path)
        else:
            self._entries = self._entries_from_headers()
        self.safetensors_files: tuple[Path, ...] = tuple(
            sorted({entry.file for entry in self._entries.values()}))

    def _entries_from_index(self, index_path: Path) -> dict[str, TensorEntry]:
        index = _read_json(index_path, "safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{index_path}: safetensors index needs a 'weight_map' object of "
                                  f"tensor name -> file name")
        if not weight_map:
            raise CheckpointError(f"{index_path}: safetensors index has an empty weight_map")
        headers: dict[str, dict[str, TensorEntry]] = {}
        entries: dict[str, TensorEntry] = {}
        for name, file_name in weight_map.items():
            if file_name not in headers:
                file_path = self.path / file_name
                if not file_path.is_file():
                    raise CheckpointError(f"{index_path}: tensor {name!r} is mapped to {file_path}, "
                                          f"which does not exist")
                headers[file_name] = read_safetensors_header(file_path)
            if name not in headers[file_name]:
                raise CheckpointError(f"{index_path}: tensor {name!r} is mapped to {self.path / file_name}, "
                                      f"but that file does not contain it")
            entries[name] = headers[file_name][name]
        return entries

    def _entries_from_headers(self) -> dict[str, TensorEntry]:
        files = sorted(p for p in self.path.glob("*.safetensors") if p.is_file())
        if not files:
            raise CheckpointError(f"no *.safetensors files in model directory {self.path}")
        entries: dict[str, TensorEntry] = {}
        for file_path in files:
            for name, entry in read_safetensors_header(file_path).items():
                if name in entries:
                    raise CheckpointError(f"tensor {name!r} is in both {entries[name].file} and {file_path} "
                                          f"and there is no {INDEX_FILE} to choose")
                entries[name] = entry
        return entries

    def tensor_names(self) -> list[str]:
        """All tensor names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def tensor_entry(self, name: str) -> TensorEntry:
        """Full location of ``name`` (file, dtype, shape, byte range); CheckpointError if absent."""
        entry = self._entries.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, self._entries, n=3)
            hint = f"; did you mean {close}?" if close else ""
            source = self.index_path or ", ".join(p.name for p in self.safetensors_files)
            raise CheckpointError(f"tensor {name!r} not found in model directory {self.path} "
                                  f"(looked in {source}){hint}")
        return entry

    def tensor_info(self, name: str) -> TensorInfo:
        """``(shape, dtype, file)`` of ``name`` from the header; no data is read."""
        entry = self.tensor_entry(name)
        return TensorInfo(entry.shape, entry.dtype, str(entry.file))

    def check_shape(self, name: str, expected_shape: tuple[int, ...]) -> None:
        """CheckpointError naming tensor and file unless ``name`` has ``expected_shape``."""
        entry = self.tensor_entry(name)
        if entry.shape != tuple(expected_shape):
            raise CheckpointError(f"tensor {name!r} in {entry.file} has shape {entry.shape}, "
                                  f"expected {tuple(expected_shape)}")

    def __repr__(self) -> str:
        return (f"HFModelDir({str(self.path)!r}, {len(self._entries)} tensors in "
                f"{len(self.safetensors_files)} file(s))")
