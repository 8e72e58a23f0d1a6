"""Serialized step executables (jserve/executable_cache.py): a program kept once is loaded on the
next start without tracing or lowering and computes what the compiled one does; another engine
shape, other XLA options or a damaged file never load. On CPU over a small program: XLA:CPU's
step programs do not run after loading ("Function ... not found"), so the builder keeps
executables on GPUs and TPUs only, and the engine-level test (a warm start loads every step
variant, same tokens) is tests/gpu/test_engine_gpu.py's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jserve import executable_cache
from jserve.compile_pool import compile_in_order
from jserve.executable_cache import ExecutableCache


def _lowered():
    return jax.jit(lambda x, y: x * 2 + y).lower(jnp.ones((4,), jnp.float32), jnp.ones((4,), jnp.float32))


def _unloweable():
    raise AssertionError("a stored program must not be traced or lowered again")


def test_kept_once_then_loaded_without_lowering(tmp_path):
    first = ExecutableCache(tmp_path, "engine-a")
    timings: dict[str, float] = {}
    (exe,) = compile_in_order([(16, _lowered)], 2, False, timings=timings, stored=first, names=["p"])
    assert first.stored == 1 and first.loaded == 0 and timings["lower_s"] > 0
    again = ExecutableCache(tmp_path, "engine-a")   # the next start of the same engine
    timings = {}
    (loaded,) = compile_in_order([(16, _unloweable)], 2, False, timings=timings, stored=again, names=["p"])
    assert again.loaded == 1 and again.stored == 0 and "lower_s" not in timings
    x, y = jnp.arange(4.0), jnp.full((4,), 0.5)
    np.testing.assert_array_equal(np.asarray(loaded(x, y)), np.asarray(exe(x, y)))
    # another engine shape, another program name or other XLA options: nothing to load
    assert ExecutableCache(tmp_path, "engine-b").load("p", {}) is None
    assert again.load("q", {}) is None
    assert again.load("p", {"xla_gpu_enable_triton_gemm": False}) is None


def test_a_damaged_file_is_dropped_and_compiled_again(tmp_path, caplog):
    cache = ExecutableCache(tmp_path, "engine")
    compile_in_order([(16, _lowered)], 1, False, stored=cache, names=["p"])
    (path,) = (tmp_path / executable_cache.FOLDER).iterdir()
    path.write_bytes(b"not a pickle")
    again = ExecutableCache(tmp_path, "engine")
    (exe,) = compile_in_order([(16, _lowered)], 1, False, stored=again, names=["p"])
    assert again.loaded == 0 and again.stored == 1 and "dropping the stored executable" in caplog.text
    assert float(exe(jnp.ones(4), jnp.ones(4))[0]) == 3.0
    assert ExecutableCache(tmp_path, "engine").load("p", {}) is not None   # rewritten whole


def test_a_program_xla_cannot_serialize_is_compiled_every_time(tmp_path, monkeypatch):
    def refuse(compiled):
        raise RuntimeError("UNIMPLEMENTED: `LessThan` is not serializable.")

    monkeypatch.setattr(executable_cache.serialize_executable, "serialize", refuse)
    cache = ExecutableCache(tmp_path, "engine")
    (exe,) = compile_in_order([(16, _lowered)], 1, False, stored=cache, names=["p"])
    assert cache.stored == 0 and not (tmp_path / executable_cache.FOLDER).exists()
    assert float(exe(jnp.ones(4), jnp.ones(4))[0]) == 3.0


def test_a_program_over_two_devices_loads_onto_the_same_two(tmp_path):
    """A tensor-parallel program (its operands split over a 2-device mesh) is loaded onto the
    devices it was compiled for, in their order, and computes the same values."""
    devices = jax.devices()[:2]
    if len(devices) < 2:
        pytest.skip("needs 2 (forced host) devices")
    mesh = Mesh(np.array(devices[::-1]), ("tp",))   # an order other than the devices' ids
    split = NamedSharding(mesh, PartitionSpec("tp"))
    arg = jax.ShapeDtypeStruct((8,), jnp.float32, sharding=split)

    def lowered():
        return jax.jit(lambda x: x * 3 - 1, out_shardings=split).lower(arg)

    cache = ExecutableCache(tmp_path, "tp2")
    (exe,) = compile_in_order([(16, lowered)], 1, False, stored=cache, names=["p"])
    (loaded,) = compile_in_order([(16, _unloweable)], 1, False, stored=ExecutableCache(tmp_path, "tp2"),
                                 names=["p"])
    x = jax.device_put(jnp.arange(8.0), split)
    got, want = loaded(x), exe(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding.device_set == want.sharding.device_set == set(devices)
