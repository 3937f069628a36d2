"""The catalogue of known architecture shapes (`tinychat bench --shape`): data only."""

from __future__ import annotations

import dataclasses

from tinychat.config import ModelConfig, RopeConfig
from tinychat.errors import TinychatError

# Public Hugging Face configs (config.json) of well-known models; random weights in these shapes need no download.
_LLAMA3_ROPE = {"theta": 500000.0, "type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
SHAPES: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                num_heads=9, num_kv_heads=3, head_dim=64, rope=RopeConfig(theta=100000.0),
                                max_position_embeddings=8192, tie_word_embeddings=True),
    "smollm2-1.7b": ModelConfig(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_layers=24,
                                num_heads=32, num_kv_heads=32, head_dim=64, rope=RopeConfig(theta=130000.0),
                                max_position_embeddings=8192, tie_word_embeddings=True),
    "tinyllama-1.1b": ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                                  num_heads=32, num_kv_heads=4, head_dim=64, max_position_embeddings=2048),
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                                num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6,
                                rope=RopeConfig(theta=1000000.0), max_position_embeddings=32768,
                                tie_word_embeddings=True, qkv_bias=True, architecture="Qwen2ForCausalLM"),
    "llama-3.2-1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                                num_heads=32, num_kv_heads=8, head_dim=64, rope=RopeConfig(factor=32.0, **_LLAMA3_ROPE),
                                max_position_embeddings=131072, tie_word_embeddings=True),
    "llama-2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                              num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096),
    "llama-2-13b": ModelConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                               num_heads=40, num_kv_heads=40, head_dim=128, max_position_embeddings=4096),
    "llama-3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                              num_heads=32, num_kv_heads=8, head_dim=128, rope=RopeConfig(theta=500000.0),
                              max_position_embeddings=8192),
    "llama-3.1-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                num_heads=32, num_kv_heads=8, head_dim=128, rope=RopeConfig(factor=8.0, **_LLAMA3_ROPE),
                                max_position_embeddings=131072),
    "mistral-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                              num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=32768,
                              sliding_window=4096, architecture="MistralForCausalLM"),  # v0.1
    "qwen2-7b": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                            num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
                            rope=RopeConfig(theta=1000000.0), max_position_embeddings=32768, qkv_bias=True,
                            architecture="Qwen2ForCausalLM"),  # the Instruct model's context
}


def shape_config(name: str, layers: int | None) -> ModelConfig:
    cfg = SHAPES.get(name.lower())
    if cfg is None:
        raise TinychatError(f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}")
    if layers is not None:
        if layers < 1:
            raise TinychatError(f"--layers must be >= 1, got {layers}")
        cfg = dataclasses.replace(cfg, num_layers=min(layers, cfg.num_layers))
    return cfg
