"""The fused decode layer compiled for a real GPU, against the pure-jnp reference (skipped
without a GPU): code-draft's shapes and a wider layer (d = 128, four q heads per kv head)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_layer import gpu, reference
from tests.kernels.test_decode_layer import _case

pytestmark = pytest.mark.gpu

SHAPES = {
    "code_draft": dict(hs=128, nkv=2, group=1, d=64, inter=384, ps=16, pages=32),
    "wide_bias": dict(hs=512, nkv=2, group=4, d=128, inter=1536, ps=16, pages=8, bias=True),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_decode_layer_gpu(name):
    args, kw = _case(jnp.bfloat16, **SHAPES[name])
    want = jax.jit(lambda *a: reference.decode_layer(*a, **kw))(*args)
    got = jax.jit(lambda *a: gpu.decode_layer(*a, **kw))(*args)
    out, ref = np.asarray(got[0], np.float32), np.asarray(want[0], np.float32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=5e-2, rtol=5e-2)
    for g, w in ((got[1], want[1]), (got[2], want[2])):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=5e-2, rtol=5e-2)
