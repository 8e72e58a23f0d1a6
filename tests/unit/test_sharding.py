"""sharding/: mesh construction, logical axis rules, divisibility fallback, multi-host init checks."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from sharding import (
    DEFAULT_AXIS_RULES,
    AxisRules,
    initialize_multihost,
    logical_constraint,
    logical_sharding,
    logical_sharding_for_shape,
    logical_spec,
    logical_spec_for_shape,
    make_mesh,
)

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- mesh

def test_make_mesh_shapes():
    assert len(jax.devices()) == 2
    m1 = make_mesh()
    assert m1.axis_names == ("data", "stage", "tensor")
    assert dict(m1.shape) == {"data": 1, "stage": 1, "tensor": 1}
    m2 = make_mesh(2)
    assert dict(m2.shape) == {"data": 1, "stage": 1, "tensor": 2}
    assert m2.devices.shape == (1, 1, 2)
    assert set(m2.devices.flat) == set(jax.devices())
    m3 = make_mesh(1, pipeline_parallel_size=2)
    assert dict(m3.shape) == {"data": 1, "stage": 2, "tensor": 1}
    assert list(m3.devices.flat) == jax.devices()[:2]


def test_make_mesh_explicit_devices():
    d = jax.devices()
    m = make_mesh(1, devices=[d[1]])
    assert list(m.devices.flat) == [d[1]]
    assert list(make_mesh(1, devices=d).devices.flat) == [d[0]]


@pytest.mark.parametrize("tp", [0, -1, 1.5, True, "2"])
def test_make_mesh_bad_tp(tp):
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        make_mesh(tp)
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        make_mesh(1, pipeline_parallel_size=tp)


def test_make_mesh_too_many_devices():
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 needs 4 devices but only 2"):
        make_mesh(4)
    with pytest.raises(ValueError, match="only 1"):
        make_mesh(2, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=2 x tensor_parallel_size=2 needs 4"):
        make_mesh(2, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="empty"):
        make_mesh(1, devices=[])


# ---------------------------------------------------------------- rules

EXPECTED_DEFAULTS = {
    "vocab": "tensor", "embed": None, "heads": "tensor", "kv_heads": "tensor", "head_dim": None,
    "mlp": "tensor", "layers": "stage", "stage": "stage", "kv_pages": None, "page_slot": None,
    "batch": None, "tokens": None,
}


@pytest.mark.parametrize("name,axis", sorted(EXPECTED_DEFAULTS.items()))
def test_default_rule_per_axis(name, axis):
    mesh = make_mesh(2)
    assert DEFAULT_AXIS_RULES.mesh_axes(name) == axis
    assert logical_spec(mesh, (name,)) == PartitionSpec(axis)
    sharding = logical_sharding(mesh, (name,))
    assert isinstance(sharding, NamedSharding) and sharding.mesh == mesh
    assert sharding.spec == PartitionSpec(axis)


def test_multi_dim_specs():
    mesh = make_mesh(2)
    assert logical_spec(mesh, ("embed", "mlp")) == PartitionSpec(None, "tensor")
    assert logical_spec(mesh, ("mlp", "embed")) == PartitionSpec("tensor", None)
    assert logical_spec(mesh, ("layers", "kv_pages", "page_slot", "kv_heads", "head_dim")) == \
        PartitionSpec("stage", None, None, "tensor", None)
    assert logical_spec(mesh, ("kv_pages", "stage", "page_slot", "kv_heads", "head_dim")) == \
        PartitionSpec(None, "stage", None, "tensor", None)
    assert logical_spec(mesh, (None, "vocab")) == PartitionSpec(None, "tensor")
    assert logical_spec(mesh, ()) == PartitionSpec()


def test_rules_errors():
    mesh = make_mesh(2)
    with pytest.raises(ValueError, match="unknown logical axis 'nope'"):
        logical_spec(mesh, ("embed", "nope"))
    with pytest.raises(ValueError, match="'heads' and 'mlp'.*'tensor'"):
        logical_spec(mesh, ("heads", "mlp"))
    with pytest.raises(ValueError, match="sequence of names"):
        logical_spec(mesh, "embed")
    with pytest.raises(ValueError, match="not in the mesh"):
        logical_spec(mesh, ("x",), AxisRules((("x", "pipeline"),)))
    with pytest.raises(ValueError, match="more than once"):
        AxisRules((("a", None), ("a", "tensor")))
    with pytest.raises(ValueError, match="must map to"):
        AxisRules((("a", 3),))
    with pytest.raises(ValueError, match="repeated mesh axis"):
        AxisRules((("a", ("tensor", "tensor")),))
    with pytest.raises(ValueError, match="pairs"):
        AxisRules(("a",))


def test_rules_overrides_and_multi_axis():
    mesh = make_mesh(2)
    rules = DEFAULT_AXIS_RULES.with_overrides(embed="tensor", vocab=None, experts=("data", "tensor"))
    assert rules.mesh_axes("embed") == "tensor"
    assert rules.mesh_axes("vocab") is None
    assert logical_spec(mesh, ("experts", "embed"), DEFAULT_AXIS_RULES.with_overrides(
        experts=["data", "tensor"])) == PartitionSpec(("data", "tensor"), None)
    assert DEFAULT_AXIS_RULES.mesh_axes("embed") is None  # original untouched
    hash(rules)  # usable as a static jit argument


def test_divisibility_fallback():
    mesh = make_mesh(2)
    # 2 KV heads over tp=2 shard; 1 KV head (or 3) cannot split and is replicated.
    axes = ("kv_pages", "page_slot", "kv_heads", "head_dim")
    assert logical_spec_for_shape(mesh, (8, 4, 2, 16), axes) == PartitionSpec(None, None, "tensor", None)
    assert logical_spec_for_shape(mesh, (8, 4, 1, 16), axes) == PartitionSpec(None, None, None, None)
    assert logical_spec_for_shape(mesh, (8, 4, 3, 16), axes) == PartitionSpec(None, None, None, None)
    assert logical_sharding_for_shape(mesh, (7, 6), ("vocab", "embed")).spec == PartitionSpec(None, None)
    assert logical_sharding_for_shape(mesh, (8, 6), ("vocab", "embed")).spec == PartitionSpec("tensor", None)
    assert logical_sharding_for_shape(mesh, (6, 7), ("embed", "mlp")).spec == PartitionSpec(None, None)
    with pytest.raises(ValueError, match="2 dims"):
        logical_spec_for_shape(mesh, (4, 4), ("embed",))
    # A replicated fallback still places a real array on the mesh.
    fallback = logical_sharding_for_shape(mesh, (3, 4), ("heads", None))
    x = jax.device_put(np.arange(12.0).reshape(3, 4), fallback)
    assert x.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(x), np.arange(12.0).reshape(3, 4))


def test_column_sharded_matmul_matches_unsharded():
    mesh = make_mesh(2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 8), dtype=np.float32)
    w = rng.standard_normal((8, 6), dtype=np.float32)
    xs = jax.device_put(x, logical_sharding(mesh, ("tokens", "embed")))
    ws = jax.device_put(w, logical_sharding(mesh, ("embed", "mlp")))
    assert ws.addressable_shards[0].data.shape == (8, 3)

    @jax.jit
    def f(a, b):
        y = a @ b
        return logical_constraint(jnp.tanh(y), mesh, ("tokens", "mlp"))

    y = f(xs, ws)
    assert y.sharding.spec == PartitionSpec(None, "tensor")
    np.testing.assert_allclose(np.asarray(y), np.tanh(x @ w), rtol=1e-5, atol=1e-5)
    # Row-parallel second matmul (contracting over the sharded dim) reduces across devices.
    w2 = rng.standard_normal((6, 8), dtype=np.float32)
    w2s = jax.device_put(w2, logical_sharding(mesh, ("mlp", "embed")))
    z = jax.jit(lambda a, b: a @ b)(y, w2s)
    np.testing.assert_allclose(np.asarray(z), np.tanh(x @ w) @ w2, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- multi-host

def test_initialize_multihost_single_process_noop():
    assert initialize_multihost() is False
    assert initialize_multihost(None, 1, 0) is False
    assert initialize_multihost("localhost:1234", 1, None) is False
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("args,match", [
    (("localhost:1234", None, 0), "num_processes is required"),
    ((None, None, 0), "num_processes is required"),
    (("localhost:1234", 0, 0), "num_processes must be a positive integer"),
    (("localhost:1234", 2, 2), r"process_id must be an integer in \[0, 2\)"),
    (("localhost:1234", 2, -1), "process_id"),
    ((None, 2, 0), "also needs coordinator_address"),
    (("localhost:1234", 2, None), "also needs process_id"),
    (("localhost", 2, 0), "host:port"),
    (("localhost:99999", 2, 0), "host:port"),
    ((":1234", 2, 0), "host:port"),
    ((None, 1, 1), "process_id"),
])
def test_initialize_multihost_validation(args, match):
    with pytest.raises(ValueError, match=match):
        initialize_multihost(*args)
    assert not jax.distributed.is_initialized()


def test_initialize_multihost_two_processes():
    """Two real CPU processes join one job through the helper and see each other's devices."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(f"""
        import sys, jax
        sys.path.insert(0, {str(REPO)!r})
        from sharding import initialize_multihost
        ok = initialize_multihost("localhost:{port}", 2, int(sys.argv[1]))
        print(ok, jax.process_count(), jax.process_index(), len(jax.devices()), len(jax.local_devices()))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, err
        assert out.split() == ["True", "2", str(i), "2", "1"]
