"""HF safetensors checkpoints -> (sharded) JAX arrays, streamed per shard. Never imports jserve."""

from checkpoints.errors import CheckpointError
from checkpoints.hf_dir import CONFIG_FILE, INDEX_FILE, HFModelDir, TensorInfo
from checkpoints.loader import load_stacked, load_tensor
from checkpoints.quant_config import ON_LOAD_METHODS, QuantScheme, checkpoint_scheme, on_load_scheme
from checkpoints.quantized import load_quantized
from checkpoints.safetensors_header import SAFETENSORS_DTYPES, TensorEntry, read_safetensors_header

__all__ = [
    "CheckpointError", "CONFIG_FILE", "INDEX_FILE", "HFModelDir", "TensorInfo", "TensorEntry",
    "SAFETENSORS_DTYPES", "read_safetensors_header", "load_tensor", "load_stacked",
    "ON_LOAD_METHODS", "QuantScheme", "checkpoint_scheme", "on_load_scheme", "load_quantized",
]
