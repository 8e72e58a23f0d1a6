"""The stacked, fused, head-padded parameter layout computes the HF model exactly.

A random HF-layout checkpoint with 3 query heads per kv head (padded to 4 in the fused QKV) and
qkv bias is loaded through ``load_params`` and run through ``decoder.forward``; the logits equal
a float64 numpy forward of the same HF tensors (no padding, no fusion, dense causal attention).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from checkpoints import HFModelDir
from jserve.config import ModelConfig
from jserve.kv_cache import allocate_kv_cache
from jserve.model.decoder import forward
from jserve.model.params import load_params, param_specs
from jserve.step_input import StepInput
from sharding import make_mesh

CFG = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 64, "hidden_size": 48,
       "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 6,
       "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
       "max_position_embeddings": 128, "tie_word_embeddings": True, "torch_dtype": "float32"}


def _checkpoint(root, rng):
    h, i, d, n = 48, 40, 8, 2
    t = {"model.embed_tokens.weight": rng.normal(size=(64, h)),
         "model.norm.weight": 1 + 0.1 * rng.normal(size=h)}
    for li in range(n):
        p = f"model.layers.{li}."
        t.update({p + "input_layernorm.weight": 1 + 0.1 * rng.normal(size=h),
                  p + "post_attention_layernorm.weight": 1 + 0.1 * rng.normal(size=h),
                  p + "self_attn.q_proj.weight": rng.normal(size=(6 * d, h)) / 7,
                  p + "self_attn.k_proj.weight": rng.normal(size=(2 * d, h)) / 7,
                  p + "self_attn.v_proj.weight": rng.normal(size=(2 * d, h)) / 7,
                  p + "self_attn.q_proj.bias": 0.1 * rng.normal(size=6 * d),
                  p + "self_attn.k_proj.bias": 0.1 * rng.normal(size=2 * d),
                  p + "self_attn.v_proj.bias": 0.1 * rng.normal(size=2 * d),
                  p + "self_attn.o_proj.weight": rng.normal(size=(h, 6 * d)) / 7,
                  p + "mlp.gate_proj.weight": rng.normal(size=(i, h)) / 7,
                  p + "mlp.up_proj.weight": rng.normal(size=(i, h)) / 7,
                  p + "mlp.down_proj.weight": rng.normal(size=(h, i)) / 7})
    t = {k: v.astype(np.float32) for k, v in t.items()}
    save_file(t, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(CFG))
    return t


def _reference_logits(t, ids):
    """float64 HF forward (rotate-half RoPE, GQA, causal) -> logits of the last token [V]."""
    d, nq, nkv = 8, 6, 2
    x = t["model.embed_tokens.weight"][ids].astype(np.float64)
    pos = np.arange(len(ids))
    inv = 1.0 / (10000.0 ** (np.arange(0, d, 2) / d))
    ang = np.concatenate([pos[:, None] * inv[None]] * 2, axis=1)
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(z):  # [T, heads, d]
        rot = np.concatenate([-z[..., d // 2:], z[..., :d // 2]], axis=-1)
        return z * cos[:, None] + rot * sin[:, None]

    def norm(z, w):
        return w * z / np.sqrt(np.mean(z * z, axis=-1, keepdims=True) + 1e-6)

    for li in range(2):
        p = f"model.layers.{li}."

        def g(k, p=p):
            return t[p + k].astype(np.float64)
        hdn = norm(x, g("input_layernorm.weight"))
        q = (hdn @ g("self_attn.q_proj.weight").T + g("self_attn.q_proj.bias")).reshape(-1, nq, d)
        k = (hdn @ g("self_attn.k_proj.weight").T + g("self_attn.k_proj.bias")).reshape(-1, nkv, d)
        v = (hdn @ g("self_attn.v_proj.weight").T + g("self_attn.v_proj.bias")).reshape(-1, nkv, d)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, nq // nkv, axis=1), np.repeat(v, nq // nkv, axis=1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
        s = np.where(np.tril(np.ones((len(ids), len(ids)), bool))[None], s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", a, v).reshape(len(ids), nq * d)
        x = x + o @ g("self_attn.o_proj.weight").T
        hdn = norm(x, g("post_attention_layernorm.weight"))
        gate, up = hdn @ g("mlp.gate_proj.weight").T, hdn @ g("mlp.up_proj.weight").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ g("mlp.down_proj.weight").T
    x = norm(x, t["model.norm.weight"].astype(np.float64))
    return x[-1] @ t["model.embed_tokens.weight"].astype(np.float64).T


def test_padded_fused_layout_equals_the_hf_forward(tmp_path):
    rng = np.random.default_rng(0)
    tensors = _checkpoint(tmp_path, rng)
    cfg = ModelConfig.from_hf_config(CFG)
    assert (cfg.q_per_kv, cfg.q_per_kv_padded) == (3, 4)
    mesh = make_mesh(1)
    params = load_params(HFModelDir(tmp_path), cfg, mesh)
    assert set(params) == set(param_specs(cfg))
    assert params["wqkv"].shape == (2, 48, 2, 4 + 2, 8) and params["wo"].shape == (2, 2 * 4 * 8, 48)
    assert not np.asarray(params["wqkv"][:, :, :, 3]).any()    # the padded query head is zero
    n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert n_bytes == cfg.num_weight_elements() * 4
    ids = rng.integers(0, 64, 11)
    batch = StepInput.fresh_prompts([ids], 16, 4, 2, 16)
    kv = allocate_kv_cache(cfg, 4, 16, "float32", mesh)
    _, logits = jax.jit(lambda p, kv, b: forward(cfg, p, kv, b))(params, kv, jax.device_put(batch))
    want = _reference_logits(tensors, ids)
    got = np.asarray(logits[0], np.float64)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max(), (got[:5], want[:5])
    assert jnp.argmax(logits[0]) == np.argmax(want)
