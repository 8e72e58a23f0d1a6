"""Read pre-quantized projection weights: the 8-bit tensor streamed per shard, its scales on
the host in the model's form.

Where it sits: start-up, for a checkpoint whose ``quantization_config`` parsed into a
``QuantScheme`` (``quant_config.py``). ``jserve/model/quant_params.py`` calls
``load_quantized`` once per projection and chunk of layers and fuses the results into the
stacked layout. Scales are small (one float per output channel, or per row and K-block) and are
turned into the one form the model holds, exactly (no re-quantization)::

    per-tensor   weight_scale [] or [1]              -> [out]            (repeated)
    per-channel  weight_scale [out, 1] or [out]      -> [out]
    block        weight_scale(_inv) [ceil(out/bn), ceil(in/bk)] -> [out, ceil(in/bk)]
                                                        (each row takes its block row)
    static activations: input_scale [] or [1]        -> one float per layer
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints.errors import CheckpointError
from checkpoints.hf_dir import HFModelDir
from checkpoints.loader import load_stacked
from checkpoints.quant_config import QuantScheme


def read_host(model_dir: HFModelDir, name: str) -> np.ndarray:
    """A small tensor (scales) read whole into host memory as float32."""
    entry = model_dir.tensor_entry(name)
    count = math.prod(entry.shape)
    if count == 0:
        return np.zeros(entry.shape, np.float32)
    try:
        data = np.fromfile(entry.file, dtype=entry.numpy_dtype, count=count, offset=entry.data_start)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"tensor {name!r} in {entry.file}: cannot read: {e}") from e
    if data.size != count:
        raise CheckpointError(f"tensor {name!r} in {entry.file}: truncated file")
    return data.reshape(entry.shape).astype(np.float32)


def _weight_scale(model_dir: HFModelDir, name: str, scheme: QuantScheme, out: int, inp: int) -> np.ndarray:
    s = read_host(model_dir, name)
    entry = model_dir.tensor_entry(name)
    if scheme.weight_scales == "tensor":
        if s.size != 1:
            raise CheckpointError(f"tensor {name!r} in {entry.file} has shape {entry.shape}; a per-tensor "
                                  f"scale must have one element")
        return np.full((out,), s.reshape(()), np.float32)
    if scheme.weight_scales == "channel":
        if s.shape not in ((out,), (out, 1)):
            raise CheckpointError(f"tensor {name!r} in {entry.file} has shape {entry.shape}, expected "
                                  f"({out}, 1) (per-channel scale)")
        return s.reshape(out)
    bn, bk = scheme.block
    want = (-(-out // bn), -(-inp // bk))
    if s.shape != want:
        raise CheckpointError(f"tensor {name!r} in {entry.file} has shape {entry.shape}, expected {want} "
                              f"(block scales of a [{out}, {inp}] weight in {bn}x{bk} blocks)")
    return np.repeat(s, bn, axis=0)[:out]


def load_quantized(model_dir: HFModelDir, modules: Sequence[str], scheme: QuantScheme, *,
                   out: int, inp: int, sharding: jax.sharding.Sharding
                   ) -> tuple[jax.Array, np.ndarray, np.ndarray | None]:
    """Pre-quantized ``<module>.weight`` of each of ``modules`` (one per layer, each stored
    ``[out, inp]``) -> (8-bit stacked ``[len(modules), out, inp]`` laid out by ``sharding``,
    float32 scales ``[len, out]`` (or ``[len, out, ceil(inp / bk)]`` for block scales),
    float32 static input scales ``[len]`` or None)."""
    weight_names = [f"{m}.weight" for m in modules]
    for name in weight_names:
        info = model_dir.tensor_info(name)
        want = "I8" if scheme.weight_dtype == "int8" else "F8_E4M3"
        if info.dtype != want:
            raise CheckpointError(f"tensor {name!r} in {info.file} is {info.dtype}, but the checkpoint's "
                                  f"quantization_config ({scheme.method}) needs {want} weights")
    q = load_stacked(model_dir, weight_names, sharding=sharding, dtype=jnp.dtype(scheme.weight_dtype),
                     expected_shape=(out, inp))
    scales = np.stack([_weight_scale(model_dir, f"{m}.{scheme.scale_name}", scheme, out, inp)
                       for m in modules])
    input_scales = None
    if scheme.activations == "static":
        vals = []
        for m in modules:
            s = read_host(model_dir, f"{m}.input_scale")
            if s.size != 1:
                raise CheckpointError(f"tensor {m + '.input_scale'!r} must have one element, "
                                      f"got shape {s.shape}")
            vals.append(float(s.reshape(())))
        input_scales = np.asarray(vals, np.float32)
    return q, scales, input_scales
