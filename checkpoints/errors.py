"""The one error type for bad checkpoints (missing files, corrupt headers, shape mismatches).

Where it sits: raised by ``checkpoints.hf_dir`` while validating a model directory and by
``checkpoints.loader`` while streaming tensors; the engine reports it to the user as is, so every
message names the file and, where there is one, the tensor.
"""


class CheckpointError(ValueError):
    """A model directory or checkpoint file that cannot be used; the message says which and why."""
