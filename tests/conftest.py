"""Test-wide setup: CPU by default, GPU tests skipped without a GPU."""

import os

# Two fake CPU devices so the tp=2 tests run on any machine. Must precede the first jax import.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------- shared engine fixtures
from fixture_paths import GOLDEN  # noqa: E402


@pytest.fixture(scope="session")
def xla_cache_dir(tmp_path_factory) -> str:
    """One persistent compilation cache for the whole test session (engines rebuilt with the
    same shapes hit it instead of recompiling)."""
    return str(tmp_path_factory.mktemp("xla_cache"))


@pytest.fixture(scope="session")
def make_engine(xla_cache_dir):
    """Factory: a tiny float32 engine over a golden fixture checkpoint."""
    from jserve.builder import EngineArgs, build_engine

    def make(arch: str = "llama", **overrides):
        args = dict(model=str(GOLDEN / arch), dtype="float32", max_model_len=128,
                    max_num_seqs=8, max_num_batched_tokens=64, num_pages=80,
                    compilation_cache_dir=xla_cache_dir)
        args.update(overrides)
        return build_engine(EngineArgs(**args))

    return make
