"""How many GPUs this process sees (0 without a GPU backend): the skip condition of the
multi-GPU tests in tests/gpu/."""

import jax


def gpu_count() -> int:
    try:
        return len(jax.devices("gpu"))
    except RuntimeError:
        return 0
