"""Stream checkpoint tensors straight into (sharded) device arrays.

Where it sits: model start-up calls ``load_tensor`` once per parameter (or ``load_stacked`` once
per stacked-layer parameter) with the ``NamedSharding`` its logical axes give on the mesh. Data
goes file -> page cache -> one host buffer per *shard* -> device; the full tensor is never
materialised on the host when a device needs only a slice of it, so a 70B checkpoint loads on a
host with far less free RAM than the model.

    jax.make_array_from_callback(shape, sharding, read_shard)
        for each local device:  index = the slice of the result it holds
            read_shard(index) -> the file's bytes of that slice, read straight into the host buffer
                                 (or through memmap(file)[source index]) -> device
        then on the device: cast to dtype, transpose (one jitted op, only where needed)

Transposition is a flag, not a callable: ``transpose=True`` reverses the axes (a torch Linear
weight ``[out, in]`` becomes ``[in, out]``). The tensor is read in its stored layout, laid out by
the requested sharding with the axes reversed (each device still reads only the source slice its
shard of the result needs), and transposed on the device: a host transpose runs at ~0.3 GB/s
(numpy's strided copy; it made Llama-3.1-8B's bf16 load take 79 s on an H100 host, session 56),
a device transpose at HBM speed. Casts to the model dtype run there too (numpy's bf16 -> f16:
~0.9 GB/s). The cost is one transient copy of that tensor on the device, before the KV pool
exists. A generic ``transform`` callable could not be split per shard in general and is not
offered; elementwise post-processing belongs on the device after loading.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jax.typing import DTypeLike

from checkpoints.errors import CheckpointError
from checkpoints.hf_dir import HFModelDir
from checkpoints.safetensors_header import TensorEntry

Index = tuple[slice, ...]
_READ_CHUNK = 32 << 20   # bytes per read of a contiguous run
_READ_THREADS = 8        # reads in flight at once (page-cache copies scale with cores)


def _as_model_dir(model_dir: HFModelDir | str | os.PathLike) -> HFModelDir:
    return model_dir if isinstance(model_dir, HFModelDir) else HFModelDir(model_dir)


def _target_dtype(dtype: DTypeLike) -> np.dtype:
    return np.dtype(jax.dtypes.canonicalize_dtype(jnp.dtype(dtype)))


def _result_shape(entry: TensorEntry, transpose: bool) -> tuple[int, ...]:
    return entry.shape[::-1] if transpose else entry.shape


def _check_expected(entry: TensorEntry, transpose: bool, expected_shape: Sequence[int] | None,
                    what: str = "") -> None:
    if expected_shape is None:
        return
    shape = _result_shape(entry, transpose)
    if shape != tuple(expected_shape):
        stored = f" (stored as {entry.shape}, loaded transposed)" if transpose else ""
        raise CheckpointError(f"tensor {entry.name!r} in {entry.file} has shape {shape}{stored}, expected "
                              f"{tuple(expected_shape)}{what}")


class _MappedTensors:
    """Read-only memory maps of the tensors of one load call, opened on first use."""

    def __init__(self) -> None:
        self._maps: dict[str, np.ndarray] = {}

    def get(self, entry: TensorEntry) -> np.ndarray:
        mapped = self._maps.get(entry.name)
        if mapped is None:
            mapped = self._maps[entry.name] = self._open(entry)
        return mapped

    @staticmethod
    def _open(entry: TensorEntry) -> np.ndarray:
        np_dtype = entry.numpy_dtype
        count = math.prod(entry.shape)
        if count == 0:
            return np.zeros(entry.shape, np_dtype)
        try:
            size = os.path.getsize(entry.file)
            if size < entry.data_end:
                raise CheckpointError(f"tensor {entry.name!r} in {entry.file}: truncated file: data ends at "
                                      f"byte {entry.data_end} but the file has {size} bytes")
            flat = np.memmap(entry.file, dtype=np_dtype, mode="r", offset=entry.data_start, shape=(count,))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"tensor {entry.name!r} in {entry.file}: cannot map data: {e}") from e
        return flat.reshape(entry.shape)


def _normalize_index(index: Index | None, ndim: int) -> Index:
    if index is None:
        return (slice(None),) * ndim
    index = tuple(index)
    return index + (slice(None),) * (ndim - len(index))


def _byte_range(entry: TensorEntry, index: Index) -> tuple[int, int] | None:
    """The file bytes ``[start, end)`` that ``index`` selects from the stored (C-order) tensor
    when they are one contiguous run (leading axes picked one at a time, then one step-1 range,
    then whole axes: a whole tensor, or a range of its rows), else None."""
    spans = [range(size)[s] for size, s in zip(entry.shape, index, strict=True)]
    if not spans or any(len(r) == 0 for r in spans):
        return None
    lead = 0
    while lead < len(spans) - 1 and len(spans[lead]) == 1:
        lead += 1
    whole = all(len(r) == size for r, size in zip(spans[lead + 1:], entry.shape[lead + 1:], strict=True))
    if spans[lead].step != 1 or not whole:
        return None
    itemsize = entry.numpy_dtype.itemsize
    first = int(np.ravel_multi_index(tuple(r.start for r in spans), entry.shape))
    count = math.prod(len(r) for r in spans)
    return entry.data_start + first * itemsize, entry.data_start + (first + count) * itemsize


def _fill(maps: _MappedTensors, entry: TensorEntry, index: Index, out: np.ndarray) -> None:
    """``out[...] = stored[index]`` cast to ``out.dtype``. Where the stored dtype is ``out``'s
    and the slice is one run of bytes, the file is read straight into ``out`` (``_pread_into``;
    on one thread ~3x a memory map's page faults and copy, session 56); else through the map."""
    run = _byte_range(entry, index) if out.dtype == entry.numpy_dtype and out.flags.c_contiguous else None
    if run is None:
        out[...] = np.asarray(maps.get(entry)[index]).astype(out.dtype)
        return
    buf = out.reshape(-1).view(np.uint8)
    try:
        done = _pread_into(entry.file, run[0], buf)
    except OSError as e:
        raise CheckpointError(f"tensor {entry.name!r} in {entry.file}: cannot read data: {e}") from e
    if done != buf.size:
        raise CheckpointError(f"tensor {entry.name!r} in {entry.file}: truncated file: read {done} of "
                              f"{buf.size} bytes at offset {run[0]}")


def _pread_into(path: str, start: int, buf: np.ndarray) -> int:
    """Read ``buf.size`` bytes of ``path`` from ``start`` into ``buf`` (uint8), in chunks of
    ``_READ_CHUNK`` read by up to ``_READ_THREADS`` threads at once (``preadv`` releases the GIL;
    one thread copies from the page cache at ~6 GB/s). Returns the bytes read (fewer at EOF)."""
    chunks = [buf[i:i + _READ_CHUNK] for i in range(0, buf.size, _READ_CHUNK)]
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()

        def read(k: int) -> int:
            view, done = chunks[k], 0
            while done < view.size:
                got = os.preadv(fd, [view[done:]], start + k * _READ_CHUNK + done)
                if not got:
                    break
                done += got
            return done

        if len(chunks) == 1:
            return read(0)
        with ThreadPoolExecutor(min(_READ_THREADS, len(chunks))) as pool:
            return sum(pool.map(read, range(len(chunks))))


def _stored_sharding(sharding: jax.sharding.Sharding, ndim: int, lead: int) -> jax.sharding.Sharding:
    """The sharding of the stored (untransposed) layout whose device transpose is laid out by
    ``sharding``: its axes after the first ``lead`` reversed. Each device then holds exactly the
    source slice of its result shard, so the transpose moves no data between devices."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return NamedSharding(sharding.mesh, PartitionSpec(*spec[:lead], *spec[lead:][::-1]))
    if sharding.is_fully_replicated:
        return sharding
    raise TypeError(f"transpose=True needs a NamedSharding or a replicated sharding, got {sharding!r}")


def _read_dtype(stored: Sequence[np.dtype], target: np.dtype) -> np.dtype:
    """The dtype shards are read in: the stored one where the tensors share it and a device array
    can hold it (the cast then runs on the device; numpy's bf16 -> f16 runs at ~0.9 GB/s), else
    ``target`` (a 64-bit tensor without x64 is cast on the host)."""
    first = stored[0]
    same = all(d == first for d in stored)
    return first if same and np.dtype(jax.dtypes.canonicalize_dtype(first)) == first else target


def _on_device(stored: jax.Array, sharding: jax.sharding.Sharding, lead: int, transpose: bool,
               target: np.dtype) -> jax.Array:
    """``stored`` cast to ``target`` and, with ``transpose``, its axes after the first ``lead``
    reversed, laid out by ``sharding`` (one jitted transpose and convert; nothing when neither
    applies)."""
    if not transpose and stored.dtype == target:
        return stored
    order = (*range(lead), *range(stored.ndim - 1, lead - 1, -1)) if transpose else tuple(range(stored.ndim))
    return jax.jit(lambda a: jnp.transpose(a, order).astype(target), out_shardings=sharding)(stored)


def load_tensor(model_dir: HFModelDir | str | os.PathLike, name: str, *, sharding: jax.sharding.Sharding,
                dtype: DTypeLike, expected_shape: Sequence[int] | None = None,
                transpose: bool = False) -> jax.Array:
    """Load tensor ``name`` as a ``dtype`` array laid out by ``sharding``, one shard read at a time.

    ``transpose`` reverses the axes (``[out, in] -> [in, out]``); ``expected_shape`` is checked
    against the *result* shape (after transposition). Each device's shard is read from the file
    in the stored dtype and cast to ``dtype`` on the device; only this process's devices are filled.
    Raises CheckpointError (naming tensor and file) for a missing tensor, a shape mismatch, an
    unsupported stored dtype or a truncated file.
    """
    mdir = _as_model_dir(model_dir)
    entry = mdir.tensor_entry(name)
    _check_expected(entry, transpose, expected_shape)
    target = _target_dtype(dtype)
    maps = _MappedTensors()
    maps.get(entry)  # fail early (unsupported dtype, truncation) before any device work
    stored_sharding = _stored_sharding(sharding, len(entry.shape), 0) if transpose else sharding
    read = _read_dtype([entry.numpy_dtype], target)

    def read_shard(index: Index | None) -> np.ndarray:
        index = _normalize_index(index, len(entry.shape))
        out = np.empty(_sliced_shape(entry.shape, index), read)
        _fill(maps, entry, index, out)
        return out

    stored = jax.make_array_from_callback(entry.shape, stored_sharding, read_shard, dtype=read)
    return _on_device(stored, sharding, 0, transpose, target)


def load_stacked(model_dir: HFModelDir | str | os.PathLike, names: Sequence[str], *,
                 sharding: jax.sharding.Sharding, dtype: DTypeLike,
                 expected_shape: Sequence[int] | None = None, transpose: bool = False) -> jax.Array:
    """Load same-shaped tensors ``names`` (e.g. one per layer) stacked: ``[len(names), *shape]``.

    ``sharding`` describes the stacked result (its leading dim is usually logical ``"layers"``);
    ``expected_shape`` and ``transpose`` apply to each tensor (``transpose`` does not move the
    stacking dim). Each device reads only its layers and its slice of each of them.
    """
    names = list(names)
    if not names:
        raise ValueError("load_stacked needs at least one tensor name")
    mdir = _as_model_dir(model_dir)
    entries = [mdir.tensor_entry(n) for n in names]
    first = entries[0]
    for entry in entries:
        _check_expected(entry, transpose, expected_shape)
        if entry.shape != first.shape:
            raise CheckpointError(f"tensor {entry.name!r} in {entry.file} has shape {entry.shape}, but "
                                  f"{first.name!r} in {first.file} has {first.shape}; stacked tensors "
                                  f"must share one shape")
    target = _target_dtype(dtype)
    shape = (len(entries), *first.shape)
    maps = _MappedTensors()
    for entry in entries:
        maps.get(entry)
    stored_sharding = _stored_sharding(sharding, len(shape), 1) if transpose else sharding
    read = _read_dtype([e.numpy_dtype for e in entries], target)

    def read_shard(index: Index | None) -> np.ndarray:
        index = _normalize_index(index, len(shape))
        layers = range(len(entries))[index[0]]
        inner = index[1:]
        out = np.empty((len(layers), *_sliced_shape(first.shape, inner)), read)
        for i, layer in enumerate(layers):
            _fill(maps, entries[layer], inner, out[i])
        return out

    stored = jax.make_array_from_callback(shape, stored_sharding, read_shard, dtype=read)
    return _on_device(stored, sharding, 1, transpose, target)


def _sliced_shape(shape: tuple[int, ...], index: Index) -> tuple[int, ...]:
    return tuple(len(range(size)[s]) for size, s in zip(shape, index, strict=True))
