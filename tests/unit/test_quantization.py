"""Quantized weights end to end on CPU: the ``linear()`` seam, quantize-on-load
(``quantization="int8" | "fp8" | "fp8_w8a8"``), the fused output-major layout, accuracy of the
bundled code-small against bf16 (the issue's tolerances), the engine and ``jserve plan``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import quant_eval as qe
from engine_helpers import run_tokens
from fixture_paths import GOLDEN
from quant_fixtures import random_tensors, tiny_config, write_model

from checkpoints import HFModelDir
from jserve.config import ModelConfig
from jserve.llm import LLM
from jserve.model.linear import QuantizedWeight
from jserve.model.params import load_params, params_bytes
from jserve.model.quant_params import PROJECTIONS, resolve_scheme, weight_bytes
from jserve.plan import plan_capacity
from jserve.sampling_params import SamplingParams
from sharding import make_mesh

# method -> perplexity increase allowed over bf16 (the issue: +1% fp8, +2% int8)
TOLERANCE = {"int8": 0.02, "fp8": 0.01, "fp8_w8a8": 0.01}


def dequantized(params: dict) -> dict:
    """The dense param tree (``[L, K, *out]``) whose weights are the quantized ones' values."""
    out = dict(params)
    for name in PROJECTIONS:
        w = params[name]
        assert isinstance(w, QuantizedWeight) and w.group is None
        real = w.q.astype(jnp.float32) * w.scale[..., None]
        out[name] = jnp.moveaxis(real, -1, 1)
    return out


@pytest.fixture(scope="module")
def uneven_model(tmp_path_factory):
    """A float32 Llama with 3 query heads per kv head (padded to 4 in the fused layout)."""
    cfg = tiny_config()
    return write_model(tmp_path_factory.mktemp("uneven"), cfg, random_tensors(cfg))


@pytest.mark.parametrize("model,method", [("uneven", "int8"), ("uneven", "fp8"), ("uneven", "fp8_w8a8"),
                                          ("qwen2", "fp8")])
def test_layout_is_the_dense_model_with_quantized_values(model, method, uneven_model):
    """Quantized params == the dense model whose weights are their dequantized values: q/k/v
    fusion, padded query heads, o/gate/up/down orientation and the per-channel scales all line
    up (bias and GQA padding included). fp8_w8a8 also rounds every activation to fp8 (a 3-bit
    mantissa) per token, which moves this random model's logits by ~6%: its bound only says
    the same layout is in use (the activation rounding itself is tested in tests/kernels)."""
    path = uneven_model if model == "uneven" else GOLDEN / "qwen2"
    mdir = HFModelDir(path)
    cfg = ModelConfig.from_hf_config(mdir.config, dtype="float32")
    qp = load_params(mdir, cfg, make_mesh(1), method)
    for name in PROJECTIONS:
        w = qp[name]
        assert w.q.dtype == (jnp.int8 if method == "int8" else jnp.float8_e4m3fn)
        assert w.scale.dtype == jnp.float32 and w.scale.shape == w.q.shape[:-1]
        assert w.act_quant == (method == "fp8_w8a8")
    if cfg.q_per_kv_padded != cfg.q_per_kv:   # padded heads: exact zeros, finite scales
        pad = np.asarray(qp["wqkv"].q[:, :, cfg.q_per_kv:cfg.q_per_kv_padded], np.float32)
        assert pad.size and not pad.any() and np.isfinite(np.asarray(qp["wqkv"].scale)).all()
    prompt = list(range(3, 40))
    got = qe.prefill_logits(cfg, qp, prompt)
    want = qe.prefill_logits(cfg, dequantized(qp), prompt)
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < (0.1 if method == "fp8_w8a8" else 1e-5)
    dense = load_params(mdir, cfg, make_mesh(1))
    assert params_bytes(qp) < 0.6 * params_bytes(dense) or model == "qwen2"
    assert params_bytes(qp) == weight_bytes(cfg, resolve_scheme(mdir.config, method, "x"))


@pytest.mark.parametrize("model,method", [("llama", "int8"), ("llama", "fp8_w8a8"), ("qwen2", "fp8")])
def test_quantized_lm_head_is_the_dense_head_with_quantized_values(model, method):
    """``quantize_lm_head``: the lm_head (qwen2: a copy of the tied embedding, which stays for
    the token gather) is 8-bit [1, V, H] with per-row scales, weight-only under any method, and
    the logits are the hidden states times its dequantized values, in float32; the plan's
    weight bytes are what the tree holds."""
    mdir = HFModelDir(GOLDEN / model)
    cfg = ModelConfig.from_hf_config(mdir.config, dtype="float32")
    qp = load_params(mdir, cfg, make_mesh(1), method, quantize_lm_head=True)
    head = qp["lm_head"]
    assert isinstance(head, QuantizedWeight) and not head.act_quant
    assert head.q.shape == (1, cfg.vocab_size, cfg.hidden_size) and head.scale.shape == (1, cfg.vocab_size)
    assert head.q.dtype == (jnp.int8 if method == "int8" else jnp.float8_e4m3fn)
    assert isinstance(qp["embed"], jax.Array) and qp["embed"].dtype == jnp.float32
    from jserve.model.decoder import logits_from_hidden

    h = jax.random.normal(jax.random.key(0), (5, cfg.hidden_size), jnp.float32)
    got = np.asarray(jax.jit(lambda p, h: logits_from_hidden(cfg, p, h))(qp, h))
    real = np.asarray(head.q[0], np.float32) * np.asarray(head.scale[0])[:, None]   # [V, H]
    want = np.asarray(h) @ real.T
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    dense = np.asarray(qp["embed"]).T if cfg.tie_word_embeddings else None
    if dense is not None:   # the copy quantizes the embedding itself
        assert np.abs(real.T - dense).max() <= np.abs(dense).max() / (127 if method == "int8" else 8)
    scheme = resolve_scheme(mdir.config, method, "x", lm_head=True)
    assert params_bytes(qp) == weight_bytes(cfg, scheme) and "lm_head" in scheme.describe()


def test_quantize_lm_head_alone_is_refused_by_name():
    with pytest.raises(ValueError, match="quantize_lm_head: .*set quantization"):
        load_params(HFModelDir(GOLDEN / "llama"), ModelConfig.from_hf_config(
            HFModelDir(GOLDEN / "llama").config, dtype="float32"), make_mesh(1), quantize_lm_head=True)


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (XLA_FLAGS host count)")
@pytest.mark.parametrize("method,lm_head", [("int8", False), ("fp8_w8a8", False), ("int8", True)])
def test_tensor_parallel_quantized_matches_tp1(method, lm_head):
    """tp=2: the 8-bit stacks shard like the dense ones (kv heads / MLP columns / rows; a
    quantized lm_head by vocabulary rows) and the logits equal tp=1's (per-token activation
    scales reduce over the whole hidden size)."""
    mdir = HFModelDir(GOLDEN / "llama")
    cfg = ModelConfig.from_hf_config(mdir.config, dtype="float32")
    mesh = make_mesh(2)
    p2 = load_params(mdir, cfg, mesh, method, lm_head)
    for name in PROJECTIONS + (("lm_head",) if lm_head else ()):
        assert len(p2[name].q.sharding.device_set) == 2 and not p2[name].q.sharding.is_fully_replicated
    prompt = list(range(5, 30))
    one = qe.prefill_logits(cfg, load_params(mdir, cfg, make_mesh(1), method, lm_head), prompt)
    two = qe.prefill_logits(cfg, p2, prompt, mesh)
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def base():
    ids = qe.heldout_ids(4 * qe.SEQ_LEN)
    cfg, params = qe.load(None)
    prompt = ids[:32].tolist()
    return ids, prompt, qe.evaluate(cfg, params, ids), qe.greedy(cfg, params, prompt, 64)


@pytest.mark.parametrize("method", list(TOLERANCE))
def test_code_small_quantized_accuracy(method, base):
    """Held-out perplexity within the issue's tolerance of bf16; the next-token argmax agrees
    with bf16's at >= 95% of held-out positions; a greedy continuation starts the same (it
    diverges for good at the first near-tie that rounding flips: benchmarks/quant_accuracy.py
    reports how far each one runs)."""
    ids, prompt, (base_nll, base_top1), base_tokens = base
    cfg, params = qe.load(method)
    nll, top1 = qe.evaluate(cfg, params, ids)
    ppl, base_ppl = qe.perplexity(nll), qe.perplexity(base_nll)
    assert ppl <= base_ppl * (1 + TOLERANCE[method]), (method, ppl, base_ppl)
    assert np.mean(top1 == base_top1) >= 0.95
    tokens = qe.greedy(cfg, params, prompt, 64)
    assert qe.agreement(tokens, base_tokens) >= 8, (tokens, base_tokens)


@pytest.mark.parametrize("method,lm_head", [("int8", False), ("int8", True), ("fp8_w8a8", False)])
def test_engine_serves_quantized_weights(make_engine, method, lm_head):
    """LLM/engine path: the engine's greedy tokens are the quantized model's own, and the
    plan's weight bytes are what the engine holds (``quantize_lm_head``: the option reaches
    the loaded tree and the plan); w8a8 projections are held one array per layer
    (``unstack_layers``), int8 ones stacked."""
    engine = make_engine("llama", quantization=method, quantize_lm_head=lm_head)
    wgu = engine.runner.params["wgu"]
    assert isinstance(wgu, QuantizedWeight) and isinstance(wgu.q, tuple) == (method == "fp8_w8a8")
    assert isinstance(engine.runner.params["lm_head"], QuantizedWeight) == lm_head
    prompts = [[5, 9, 11, 3], list(range(20, 45))]
    got = run_tokens(engine, prompts, SamplingParams(temperature=0.0, max_tokens=12))
    cfg, params = qe.load(method, "float32", GOLDEN / "llama", lm_head=lm_head)
    for p, toks in zip(prompts, got, strict=True):
        assert toks == qe.greedy(cfg, params, p, 12)
    plan = plan_capacity(str(GOLDEN / "llama"), dtype="float32", quantization=method,
                         quantize_lm_head=lm_head)
    assert plan.weight_bytes_total == params_bytes(engine.runner.params)
    assert "projections 8-bit" in plan.render()
    assert ("--quantize-lm-head" in plan.render()) != lm_head


def test_bad_quantization_is_named():
    with pytest.raises(ValueError, match="quantization must be .int8., .fp8., .fp8_w8a8. or None, got .awq."):
        LLM(quantization="awq")


def test_near_tie_rule_of_the_gpu_greedy_checks():
    """The rule the GPU quantized-greedy tests apply: a divergence passes only at a near tie
    among the base's candidates (two or more), never at a clear winner or a token outside them."""
    from jserve.outputs import CompletionOutput, Logprob

    def out(ids, at, cands):
        lps = [{t: Logprob(logprob=-0.1, rank=1)} for t in ids]
        lps[at] = {t: Logprob(logprob=lp, rank=r) for r, (t, lp) in enumerate(cands, 1)}
        return CompletionOutput(index=0, text="", token_ids=ids, cumulative_logprob=None, logprobs=lps)

    three_way = out([5, 6, 7, 8], 2, [(7, -2.446), (1, -2.459), (9, -2.47)])
    assert qe.diverges_only_at_near_tie(three_way, [5, 6, 9, 3])       # third of a near tie
    assert not qe.diverges_only_at_near_tie(three_way, [5, 6, 4, 3])   # not a candidate
    clear = out([5, 6, 7, 8], 2, [(7, -0.1), (1, -2.5)])
    assert not qe.diverges_only_at_near_tie(clear, [5, 6, 1, 3])
    assert qe.diverges_only_at_near_tie(clear, [5, 6, 7, 8, 1])        # agrees long enough
