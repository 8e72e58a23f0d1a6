"""``linear_rope_write`` (jserve/model/linear.py): a decode step's fused QKV projection, RoPE and
K/V write in one kernel after the decode matmul. A tiny int8 Llama of head_dim 128 (the kernel's
shapes), wqkv on the Mosaic GPU decode kernel interpreted on CPU: the fused epilogue
(``pallas_kernels/kv_write/rope_write.py``) keeps the tokens of XLA's sum, RoPE and scatters
after the same kernel, and so does the bf16 model through XLA's GEMM and the same kernel; where
it does not apply the seam hands back to the decoder. An int8 / fp8 pool takes RoPE and the
quantizing write in one Triton kernel (``gpu_rope_quant``) after the finished projection."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest
import quant_eval as qe
import quant_fixtures as qf
from kernel_calls import recorded

import pallas_kernels
from jserve.model.linear import QuantizedWeight, linear_rope_write
from pallas_kernels.kv_write import api, gpu_rope_quant, rope_write

PROMPT = [5, 17, 33, 2, 71, 40, 9, 12]
STEPS = 3   # the prompt's step and two decode steps, the kernels interpreted


def _model(tmp_path, quantization="int8"):
    hf = qf.tiny_config(heads=8, kv_heads=2, head_dim=128, hidden=256, inter=256, layers=2)
    qf.write_model(tmp_path, hf, qf.random_tensors(hf))
    cfg, params = qe.load(quantization, dtype="bfloat16", path=tmp_path)
    if quantization is None:
        return cfg, params
    return cfg, {k: dataclasses.replace(v, interpret="gpu") if k == "wqkv" else v for k, v in params.items()}


def test_fused_qkv_epilogue_in_the_decoder_keeps_the_greedy_tokens(tmp_path, monkeypatch):
    cfg, params = _model(tmp_path)
    assert cfg.q_per_kv_padded == 4 and cfg.head_dim == 128
    monkeypatch.setattr(api, "ROPE_WRITE_ON_HOPPER", False)   # (on by default)
    want = qe.greedy(cfg, params, PROMPT, STEPS)          # the decode kernel, then XLA's epilogue
    calls = recorded(monkeypatch, rope_write, "rope_write")
    monkeypatch.setattr(api, "ROPE_WRITE_ON_HOPPER", True)
    jax.clear_caches()
    got = qe.greedy(cfg, params, PROMPT, STEPS)
    assert len(calls) == 2   # traced once per step shape (8 and 1 tokens), one trace for both layers
    assert got == want


def test_fused_epilogue_after_xlas_gemm_keeps_the_greedy_tokens(tmp_path, monkeypatch):
    """A bf16 model: XLA's GEMM, then the same kernel, interpreted (no Hopper here: the
    dispatchers' own predicate and entry point, with interpret on)."""
    cfg, params = _model(tmp_path, None)
    monkeypatch.setattr(api, "ROPE_WRITE_DENSE_ON_HOPPER", False)   # (on by default)
    want = qe.greedy(cfg, params, PROMPT, STEPS)
    calls = recorded(monkeypatch, rope_write, "rope_write")
    monkeypatch.setattr(api, "ROPE_WRITE_DENSE_ON_HOPPER", True)
    for name in ("rope_write_fuses", "write_rope"):
        monkeypatch.setattr(pallas_kernels, name, functools.partial(getattr(api, name), interpret=True))
    jax.clear_caches()
    got = qe.greedy(cfg, params, PROMPT, STEPS)
    assert [c[0] for c in calls] == [1, 1] and got == want   # the projection itself: one "partial"


def test_the_seam_hands_back_where_the_kernel_does_not_run(tmp_path, monkeypatch):
    cfg, params = _model(tmp_path)
    monkeypatch.setattr(api, "ROPE_WRITE_ON_HOPPER", True)
    w = params["wqkv"]
    x = jnp.zeros((4, cfg.hidden_size), jnp.bfloat16)
    cos = sin = jnp.zeros((4, 128), jnp.float32)
    slots = jnp.zeros((4,), jnp.int32)
    pool = (jnp.zeros((2, 16, 2, 128), jnp.bfloat16),) * 2

    def seam(w=w, x=x, pool=pool):
        return linear_rope_write(x, w, 0, None, cos, sin, slots, pool, cfg.q_per_kv_padded)

    assert seam() is not None
    assert seam(w=dataclasses.replace(w, interpret=None)) is None       # CPU, not interpreted
    assert seam(w=jnp.zeros((1, cfg.hidden_size, 2, 6, 128), jnp.bfloat16)) is None   # dense, no GPU
    assert seam(w=dataclasses.replace(w, act_quant=True)) is None       # w8a8
    assert seam(x=x.astype(jnp.float32)) is None                         # the kernel's x: bf16 / f16
    assert seam(pool=pool + (jnp.ones((2, 2)),) * 2) is None             # an int8 / fp8 pool
    monkeypatch.setattr(api, "ROPE_WRITE_ON_HOPPER", False)
    assert seam() is None
    assert isinstance(w, QuantizedWeight)


def test_a_ragged_batch_with_padding_rows_matches_xlas_epilogue(tmp_path, monkeypatch):
    """Two prompts of 5 and 9 tokens packed into a 16-token step (two padding rows on the null
    page), then a decode step of both in an 8-token step: the fused epilogue gives the logits and
    the pages of XLA's RoPE and scatters, row by row."""
    import numpy as np

    from jserve.kv_cache import allocate_kv_cache
    from jserve.model.decoder import forward
    from jserve.step_input import StepInput
    from sharding import make_mesh

    cfg, params = _model(tmp_path)
    page, pages_per_seq = 16, 2
    prompts = [np.array([5, 17, 33, 2, 71]), np.array([40, 9, 12, 8, 3, 60, 61, 62, 63])]
    first = StepInput.fresh_prompts(prompts, 16, 2, pages_per_seq, page)
    second = StepInput.empty(8, 2, pages_per_seq)
    second.page_table[:] = first.page_table
    for r, ids in enumerate(prompts):   # each prompt's next token at its next position
        pos = len(ids)
        second.token_ids[r], second.positions[r] = 7 + r, pos
        second.slot_mapping[r] = first.page_table[r, pos // page] * page + pos % page
        second.seq_lens[r], second.logits_indices[r] = pos + 1, r
        second.query_start_loc[r + 1:] = r + 1
    second.num_seqs[0] = 2

    def run():
        kv = allocate_kv_cache(cfg, 1 + 2 * pages_per_seq, page, cfg.dtype, make_mesh(1))
        fwd = jax.jit(lambda p, k, b: forward(cfg, p, k, b), donate_argnums=1)
        kv, a = fwd(params, kv, first)
        kv, b = fwd(params, kv, second)
        f32 = lambda x: np.asarray(x, np.float32)   # noqa: E731
        return f32(a), f32(b), [f32(x) for x in kv[0]]

    monkeypatch.setattr(api, "ROPE_WRITE_ON_HOPPER", False)   # (on by default)
    want = run()
    calls = recorded(monkeypatch, rope_write, "rope_write")
    monkeypatch.setattr(api, "ROPE_WRITE_ON_HOPPER", True)
    jax.clear_caches()
    got = run()
    assert [c[1] for c in calls] == [16, 8]   # both steps fused (Mp rows of partials)
    for g, w in zip(got[:2], want[:2], strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-2, atol=2e-2)
    for g, w in zip(got[2], want[2], strict=True):   # layer 0's pages, the null page aside
        np.testing.assert_allclose(g[1:], w[1:], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("quantization,kv_dtype", [(None, "fp8"), ("int8", "int8")])
def test_quantized_pool_fused_rope_write_keeps_the_greedy_tokens(tmp_path, monkeypatch, quantization,
                                                                 kv_dtype):
    """An fp8 / int8 pool: the projection (XLA's GEMM, or the decode kernel interpreted), then
    RoPE and the quantizing write in one kernel (``gpu_rope_quant``, interpreted), keeps the
    greedy tokens of XLA's RoPE and the quantizing write."""
    cfg, params = _model(tmp_path, quantization)
    want = qe.greedy(cfg, params, PROMPT, STEPS, kv_dtype=kv_dtype)
    calls = recorded(monkeypatch, gpu_rope_quant, "rope_write_quantized")
    monkeypatch.setattr(api, "ROPE_WRITE_QUANT_ON_GPU", True)
    for name in ("rope_write_quant_fuses", "write_rope_quantized"):
        monkeypatch.setattr(pallas_kernels, name, functools.partial(getattr(api, name), interpret=True))
    jax.clear_caches()
    got = qe.greedy(cfg, params, PROMPT, STEPS, kv_dtype=kv_dtype)
    assert calls and got == want


def test_quantized_pool_seam_adds_the_bias_before_the_kernel(tmp_path, monkeypatch):
    """A projection with a bias (Qwen's) into an fp8 pool: the bias is added to the projection
    before the kernel (where XLA fuses it into the GEMM) and the kernel takes the sum, whose
    result is the reference's RoPE and quantizing write of projection + bias."""
    import numpy as np

    from pallas_kernels.kv_write import reference as kv_ref

    cfg, params = _model(tmp_path, None)
    w = params["wqkv"]                                    # [1, H, Nkv, G + 2, d]
    t, nkv, g, d = 4, cfg.num_kv_heads, cfg.q_per_kv_padded, cfg.head_dim
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((t, cfg.hidden_size)), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal((nkv, g + 2, d)), jnp.bfloat16)
    emb = np.arange(t)[:, None] * (1.0 / 10000.0 ** (np.arange(0, d, 2) / d))[None]
    cos, sin = (jnp.asarray(f(np.concatenate([emb, emb], -1)), jnp.float32) for f in (np.cos, np.sin))
    slots = jnp.asarray([16, 17, 18, 40], jnp.int32)
    pool = (jnp.zeros((4, 16, nkv, d), jnp.uint8), jnp.zeros((4, 16, nkv, d), jnp.uint8),
            jnp.ones((4, nkv), jnp.float32), jnp.ones((4, nkv), jnp.float32))
    monkeypatch.setattr(api, "ROPE_WRITE_QUANT_ON_GPU", True)
    calls = recorded(monkeypatch, gpu_rope_quant, "rope_write_quantized")
    for name in ("rope_write_quant_fuses", "write_rope_quantized"):
        monkeypatch.setattr(pallas_kernels, name, functools.partial(getattr(api, name), interpret=True))
    q, got = linear_rope_write(x, w, 0, bias, cos, sin, slots, pool, g)
    qkv = (jnp.tensordot(x, w[0], axes=1) + bias).reshape(t, -1)
    want_q, k, v = kv_ref.split_rope(qkv, cos, sin, nkv, g)
    want = kv_ref.write_kv_quantized(*pool, k, v, slots)
    assert calls == [(t, nkv * (g + 2) * d)]
    np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(want_q, np.float32))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
