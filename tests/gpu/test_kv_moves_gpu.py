"""KVPageMover on a GPU: the mover's own host pages (addressed by store name and slot) live in
pinned host memory and round-trip bit-exactly (skipped without a GPU; the engine-level swap /
host-tier tests in tests/unit also run on it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jserve.kv_transfer import KVPageMover
from jserve.scheduler_output import KVTransfers

pytestmark = pytest.mark.gpu


def test_offload_and_load_round_trip_through_pinned_host():
    dev = jax.devices()[0]
    assert dev.platform == "gpu"
    sharding = NamedSharding(Mesh(np.array([dev]), ("tp",)), PartitionSpec())
    rng = np.random.default_rng(0)
    kv = [tuple(jax.device_put(jnp.asarray(rng.standard_normal((64, 16, 2, 64)), jnp.bfloat16), sharding)
                for _ in range(2)) for _ in range(3)]
    expect = [(np.asarray(k), np.asarray(v)) for k, v in kv]
    mover = KVPageMover(kv, 64, {"t": 21})
    assert mover.host_moves
    kv = mover.warmup(kv)
    slots = rng.permutation(21).tolist()
    src = rng.permutation(np.arange(1, 32))[:21].tolist()  # 21 = 16 + 4 + 1: three buckets
    kv = mover.move(kv, KVTransfers(to_host=list(zip(src, ["t"] * 21, slots, strict=True))))
    assert {mover.host.get("t", s).sharding.memory_kind for s in slots} == {"pinned_host"}
    dst = list(range(40, 61))
    kv = mover.move(kv, KVTransfers(from_host=list(zip(["t"] * 21, slots, dst, strict=True))))
    for (k, v), (ek, ev) in zip(kv, expect, strict=True):
        np.testing.assert_array_equal(np.asarray(k)[dst], ek[src])
        np.testing.assert_array_equal(np.asarray(v)[dst], ev[src])
        np.testing.assert_array_equal(np.asarray(k)[:40], ek[:40])
