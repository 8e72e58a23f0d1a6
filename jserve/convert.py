"""``jserve convert``: an HF safetensors directory -> an orbax model directory.

Where it sits: offline, before serving. The HF checkpoint is streamed into jserve's param
layout exactly as start-up does it (``load_params`` on a mesh of ``tensor_parallel_size``
devices, so a model larger than one device converts too), then written with orbax together
with ``config.json`` and the tokenizer files (``jserve/model/orbax_params.py``). Serving that
directory (``LLM(model=<dir>)``, ``jserve serve --model <dir>``) restores the arrays straight
into the serving mesh's shardings, whatever mesh converted them::

    HF dir --load_params(mesh)--> params --[transform]--> save_params --> <output>/
                                              ^ where quantize-on-convert plugs in: it returns
                                                the quantized tree and names its format, which
                                                the metadata records and restore checks

    jserve convert --model HF_DIR --output OUT_DIR [--dtype bfloat16] [--tp 1] [--overwrite]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from jserve.options import normalize_dtype


def convert(model: str | None, output: str, *, dtype: str | None = None,
            tensor_parallel_size: int = 1, overwrite: bool = False) -> Path:
    """Convert the HF directory ``model`` (None: the bundled model) into an orbax model
    directory at ``output``, weights in ``dtype`` (None: the checkpoint's). -> the output path."""
    from checkpoints import CheckpointError, HFModelDir
    from checkpoints.orbax_dir import is_orbax_dir
    from jserve.builder import default_model_path
    from jserve.config import ModelConfig
    from jserve.model.orbax_params import save_params
    from jserve.model.params import load_params
    from sharding import make_mesh

    source = Path(model) if model is not None else default_model_path()
    if is_orbax_dir(source):
        raise CheckpointError(f"model: {source} is already an orbax model directory")
    if dtype is not None:
        dtype = normalize_dtype(dtype)
    model_dir = HFModelDir(source)
    cfg = ModelConfig.from_hf_config(model_dir.config, source=str(source / "config.json"), dtype=dtype)
    mesh = make_mesh(tensor_parallel_size)
    params = load_params(model_dir, cfg, mesh)
    return save_params(output, params, cfg, source, overwrite=overwrite)


def _cmd_convert(ns: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = convert(ns.model, ns.output, dtype=ns.dtype, tensor_parallel_size=ns.tensor_parallel_size,
                  overwrite=ns.overwrite)
    print(f"[jserve] wrote {out} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an HF safetensors model into an orbax model directory",
                       description="Write the model's params (jserve's layout) with orbax, plus "
                       "config.json and the tokenizer files; serve the output with --model OUTPUT "
                       "on any tensor-parallel size.")
    p.add_argument("--model", default=None, help="HF model directory (default: the bundled model)")
    p.add_argument("--output", required=True, help="output directory (must not exist, see --overwrite)")
    p.add_argument("--dtype", default=None, help="stored weight dtype: bfloat16, float16 or float32 "
                   "(default: the checkpoint's)")
    p.add_argument("--tensor-parallel-size", "--tp", dest="tensor_parallel_size", type=int, default=1,
                   help="devices to load the model across while converting (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing orbax output directory")
    p.set_defaults(func=_cmd_convert)
