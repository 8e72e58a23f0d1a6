"""Named model shapes (HF config.json fields) for random-weight benchmarks and ``jserve plan``.

Where it sits: ``build_engine(model="llama3.1-8b", random_weights=True)`` and the capacity
planner resolve these names to a ``ModelConfig`` without any checkpoint on disk.
"""

from __future__ import annotations

from typing import Any

from jserve.config import ModelConfig

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

NAMED_SHAPES: dict[str, dict[str, Any]] = {
    "llama3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE, "max_position_embeddings": 131072,
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128009],
        "torch_dtype": "bfloat16"},
    "llama3.1-70b": {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 8192,
        "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": _LLAMA3_ROPE, "max_position_embeddings": 131072,
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128009],
        "torch_dtype": "bfloat16"},
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "tie_word_embeddings": True, "sliding_window": 32768,
        "use_sliding_window": False, "max_window_layers": 21, "bos_token_id": 151643,
        "eos_token_id": 151645, "torch_dtype": "bfloat16"},
}


def named_shape(name: str, dtype: str | None = None) -> ModelConfig:
    key = name.lower()
    if key not in NAMED_SHAPES:
        raise ValueError(f"model: unknown named shape {name!r}; known: {', '.join(NAMED_SHAPES)}")
    return ModelConfig.from_hf_config(NAMED_SHAPES[key], source=f"named shape {key}", dtype=dtype)
