"""The param tree <-> an orbax model directory (``checkpoints.orbax_dir``).

Where it sits: ``jserve convert`` saves the tree ``load_params`` built from an HF checkpoint
(``save_params``); start-up restores it onto the serving mesh (``restore_params``) instead of
streaming safetensors, then ``replicate_kv_heads`` turns it into the served layout as for HF.

What is stored is the *checkpoint* layout of jserve/model/params.py (stacked, fused, query heads
padded per kv head, KV heads never replicated), named ``PARAM_LAYOUT``, independent of the mesh
it was written from: any tensor-parallel size restores it, orbax reading each device's slice.
A change of that layout must change ``PARAM_LAYOUT``, so old directories are refused by name
instead of being misread.

Quantization seam: ``save_params(..., quantization=...)`` records a quantized tree's format; a
reader that does not know the format refuses the directory (``restore_params``).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from checkpoints import CheckpointError
from checkpoints.orbax_dir import OrbaxModelDir, restore_arrays, save_orbax_dir
from jserve.config import ModelConfig
from jserve.model.params import Params, param_specs, spec_sharding

PARAM_LAYOUT = "jserve-stacked-fused-v1"


def save_params(output: str | os.PathLike, params: Params, cfg: ModelConfig,
                source_dir: str | os.PathLike, *, quantization: str | None = None,
                overwrite: bool = False) -> Path:
    """Write ``params`` (checkpoint layout of ``cfg``, any sharding) + config + tokenizer."""
    specs = param_specs(cfg)
    if quantization is None:
        for name, spec in specs.items():
            if name not in params or tuple(params[name].shape) != spec.shape:
                raise ValueError(f"save_params: param {name!r} is missing or not of shape {spec.shape} "
                                 f"(the checkpoint layout of this model)")
    return save_orbax_dir(output, params, source_dir=source_dir, layout=PARAM_LAYOUT, dtype=cfg.dtype,
                          quantization=quantization, overwrite=overwrite)


def restore_params(model_dir: OrbaxModelDir, cfg: ModelConfig, mesh: Mesh) -> Params:
    """Every param of ``cfg``'s checkpoint layout, restored in ``cfg.dtype`` straight into its
    sharding on ``mesh`` (resharding whatever mesh wrote it)."""
    if model_dir.layout != PARAM_LAYOUT:
        raise CheckpointError(f"{model_dir.path}: param layout {model_dir.layout!r} is not this "
                              f"jserve's {PARAM_LAYOUT!r}; re-run `jserve convert`")
    if model_dir.quantization is not None:
        raise CheckpointError(f"{model_dir.path}: quantization {model_dir.quantization!r} is not "
                              f"supported by this jserve")
    dtype = jnp.dtype(cfg.dtype)
    targets = {name: jax.ShapeDtypeStruct(spec.shape, dtype, sharding=spec_sharding(cfg, mesh, spec))
               for name, spec in param_specs(cfg).items()}
    return restore_arrays(model_dir, targets)
