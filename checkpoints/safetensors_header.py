"""Read a ``.safetensors`` header without touching tensor data.

Where it sits: ``HFModelDir`` parses every checkpoint file's header once at start-up to learn
each tensor's dtype, shape and byte range; ``loader`` later memory-maps exactly those ranges.

File layout (all offsets in bytes)::

    [0, 8)          N: little-endian u64, length of the JSON header
    [8, 8 + N)      JSON: {"<tensor>": {"dtype": "BF16", "shape": [..], "data_offsets": [b, e]},
                           "__metadata__": {...}}            (optional string->string map)
    [8 + N, EOF)    data region; a tensor's bytes are [8 + N + b, 8 + N + e), row-major
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from checkpoints.errors import CheckpointError

# safetensors dtype code -> numpy dtype (ml_dtypes provides the types numpy lacks).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

# The reference implementation refuses headers above 100 MB; a larger length means corruption.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: ``file`` bytes ``[data_start, data_end)`` hold ``shape`` of ``dtype``."""

    name: str
    file: Path
    dtype: str                # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    data_start: int           # absolute byte offset in ``file``
    data_end: int

    @property
    def numpy_dtype(self) -> np.dtype:
        """The numpy dtype of the stored data; CheckpointError for codes we cannot read."""
        if self.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {self.name!r} in {self.file}: unsupported safetensors dtype "
                                  f"{self.dtype!r} (supported: {sorted(SAFETENSORS_DTYPES)})")
        return SAFETENSORS_DTYPES[self.dtype]


def _parse_entry(path: Path, name: str, raw: object, header_end: int, file_size: int) -> TensorEntry:
    where = f"tensor {name!r} in {path}"
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: corrupt safetensors header (entry is not an object)")
    dtype, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if not isinstance(dtype, str):
        raise CheckpointError(f"{where}: corrupt safetensors header (dtype {dtype!r})")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CheckpointError(f"{where}: corrupt safetensors header (shape {shape!r})")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: corrupt safetensors header (data_offsets {offsets!r})")
    begin, end = offsets
    if dtype in SAFETENSORS_DTYPES:
        need = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if end - begin != need:
            raise CheckpointError(f"{where}: corrupt safetensors header: data_offsets span {end - begin} "
                                  f"bytes but shape {tuple(shape)} of {dtype} needs {need}")
    if header_end + end > file_size:
        raise CheckpointError(f"{where}: truncated file: the tensor's data ends at byte {header_end + end} "
                              f"but the file has {file_size} bytes")
    return TensorEntry(name=name, file=path, dtype=dtype, shape=tuple(shape),
                       data_start=header_end + begin, data_end=header_end + end)


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Parse ``path``'s header: ``{tensor name: TensorEntry}``, in header order.

    Checks the header length, the JSON, every entry's dtype/shape/offsets, that byte ranges
    match shapes, and that no tensor's data runs past the end of the file (truncation).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({file_size} bytes, "
                                      f"shorter than the 8-byte header length)")
            n = int.from_bytes(prefix, "little")
            if n > MAX_HEADER_BYTES or n > file_size - 8:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header: header length "
                                      f"{n} bytes, file size {file_size} bytes")
            header_bytes = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from e
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header_end = 8 + n
    return {name: _parse_entry(path, name, raw, header_end, file_size)
            for name, raw in header.items() if name != "__metadata__"}
