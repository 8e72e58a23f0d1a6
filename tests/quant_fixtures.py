"""Tiny HF checkpoints for the quantization tests, written on the fly: a float Llama with an
uneven query-head group (6 q heads over 2 kv heads: padded to 4 per kv head), and its
pre-quantized twins in the formats checkpoints/quant_config.py reads (fine-grained FP8 with
block scales, compressed-tensors FP8 per-tensor / per-channel with dynamic or static input
scales), each with the float32 weights its 8-bit tensors dequantize to."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

FP8 = ml_dtypes.float8_e4m3fn
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_config(heads: int = 6, kv_heads: int = 2, head_dim: int = 32, hidden: int = 128,
                inter: int = 256, layers: int = 2, vocab: int = 96) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": head_dim, "num_hidden_layers": layers, "vocab_size": vocab,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 1}


def random_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
              "mlp.down_proj": (h, i)}
    t = {"model.embed_tokens.weight": rng.standard_normal((cfg["vocab_size"], h)),
         "model.norm.weight": 1 + 0.1 * rng.standard_normal(h),
         "lm_head.weight": rng.standard_normal((cfg["vocab_size"], h)) * 0.1}
    for li in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{li}."
        t[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(h)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(h)
        for name, shape in shapes.items():
            # rows of different magnitudes, so per-channel and per-tensor scales differ
            rows = np.exp(rng.uniform(-2, 0, (shape[0], 1)))
            t[p + name + ".weight"] = rng.standard_normal(shape) * rows * 0.2
    return {k: v.astype(np.float32) for k, v in t.items()}


def write_model(root: Path, cfg: dict, tensors: dict[str, np.ndarray],
                quantization_config: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (root / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(root / "model.safetensors"))
    return root


def _fp8(x: np.ndarray) -> np.ndarray:
    return np.clip(x, -448, 448).astype(FP8)


def fine_grained_fp8(tensors: dict[str, np.ndarray], block: tuple[int, int] = (32, 32)
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """HF fine-grained FP8: weight F8_E4M3 + weight_scale_inv [ceil(out/bn), ceil(in/bk)].
    -> (stored tensors, float32 tensors they dequantize to, quantization_config)."""
    bn, bk = block
    out, deq = {}, {}
    for name, w in tensors.items():
        if not any(name.endswith(p + ".weight") for p in PROJ):
            out[name] = deq[name] = w
            continue
        n, k = w.shape
        gn, gk = -(-n // bn), -(-k // bk)
        pad = np.zeros((gn * bn, gk * bk), np.float32)
        pad[:n, :k] = w
        blocks = np.abs(pad.reshape(gn, bn, gk, bk)).max(axis=(1, 3))
        scale = np.maximum(blocks, 1e-12) / 448.0
        full = np.repeat(np.repeat(scale, bn, 0), bk, 1)[:n, :k]
        q = _fp8(w / full)
        out[name] = q
        out[name[:-len("weight")] + "weight_scale_inv"] = scale.astype(np.float32)
        deq[name] = q.astype(np.float32) * full
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
          "weight_block_size": [bn, bk]}
    return out, deq, qc


def compressed_tensors_fp8(tensors: dict[str, np.ndarray], strategy: str, activations: str | None
                           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """compressed-tensors FP8 (``strategy`` "tensor" | "channel"; ``activations`` None |
    "dynamic" | "static") -> (stored tensors, dequantized float32 tensors, quantization_config)."""
    out, deq = {}, {}
    for name, w in tensors.items():
        if not any(name.endswith(p + ".weight") for p in PROJ):
            out[name] = deq[name] = w
            continue
        amax = np.abs(w).max(axis=1, keepdims=True) if strategy == "channel" else np.abs(w).max(keepdims=True)
        scale = (np.maximum(amax, 1e-12) / 448.0).astype(np.float32)
        q = _fp8(w / scale)
        out[name] = q
        base = name[:-len("weight")]
        out[base + "weight_scale"] = scale if strategy == "channel" else scale.reshape(1)
        if activations == "static":
            proj = next(i for i, p in enumerate(PROJ) if name.endswith(p + ".weight"))
            out[base + "input_scale"] = np.asarray([0.02 + 0.005 * proj + 0.001 * len(name)], np.float32)
        deq[name] = q.astype(np.float32) * scale
    act = None
    if activations == "dynamic":
        act = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True, "symmetric": True}
    elif activations == "static":
        act = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
    qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
          "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": act,
                                        "weights": {"num_bits": 8, "type": "float", "strategy": strategy,
                                                    "symmetric": True, "dynamic": False}}}}
    return out, deq, qc
