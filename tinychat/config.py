"""One configuration for every supported Llama-family architecture.

Architecture differences are data: q/k/v bias (Qwen2), tied embeddings (SmolLM2, TinyLlama, small Qwen2),
grouped-query attention, rotary scaling (Llama 3), sliding window (Mistral v0.1). Nothing branches on class names
beyond the table of accepted `architectures` below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tinychat.errors import ModelLoadError

# architectures[0] of config.json -> the flags that architecture fixes (the others come from config.json)
SUPPORTED_ARCHITECTURES: dict[str, dict] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {"qkv_bias": False, "o_bias": False},
    "Qwen2ForCausalLM": {"qkv_bias": True, "o_bias": False},
}
ROPE_TYPES = ("default", "linear", "llama3", "gguf_freqs")
# Bounds of the sizes a config may give, far beyond any released model (the largest have ~256k vocabularies, 126
# layers, 16k hidden); a value outside is a broken or hostile file, refused before anything is allocated.
SIZE_LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 24),
    "hidden_size": (1, 1 << 17),
    "intermediate_size": (1, 1 << 20),
    "num_layers": (1, 1024),
    "num_heads": (1, 1024),
    "num_kv_heads": (1, 1024),
    "head_dim": (2, 1024),
    "max_position_embeddings": (1, (1 << 31) - 1),
}


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama's attention_bias)
    mlp_bias: bool = False
    sliding_window: int | None = None
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self):
        """ValueError naming the field for sizes no model has (checked before anything is allocated); merely large
        context lengths are fine: tables and caches are sized to the context in use (Engine, setup_kv_cache)."""
        for name, (low, high) in SIZE_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be a whole number in {low} .. {high}, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary embedding pairs), got {self.head_dim}")
        if not (0 < self.rms_norm_eps < 1):
            raise ValueError(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
        r = self.rope
        if not (0 < r.theta < math.inf) or not (0 < r.factor < math.inf):
            raise ValueError(f"rope theta and factor must be finite and > 0, got theta={r.theta}, factor={r.factor}")
        if r.type == "llama3" and not (0 < r.low_freq_factor < r.high_freq_factor < math.inf
                                       and r.original_max_position_embeddings >= 1):
            raise ValueError("llama3 rope needs 0 < low_freq_factor < high_freq_factor and "
                             f"original_max_position_embeddings >= 1, got {r}")

    @property
    def context_length(self) -> int:
        """Longest sequence the runtime serves: the trained context, capped by a sliding window if any."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, cfg: dict, source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face `config.json` dict (transformers v4 and v5 spellings)."""
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{source}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        implied = SUPPORTED_ARCHITECTURES[arch]
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or (hidden // heads if heads > 0 else 0)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope=_rope_from_hf(cfg, source),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bool(implied.get("qkv_bias", cfg.get("attention_bias", False))),
                o_bias=bool(implied.get("o_bias", cfg.get("attention_bias", False))),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                sliding_window=int(sliding) if sliding else None,
                architecture=arch,
            )
        except KeyError as e:
            raise ModelLoadError(f"{source}: missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: invalid value: {e}") from None


def _rope_from_hf(cfg: dict, source: str) -> RopeConfig:
    # transformers v5 writes `rope_parameters` (theta inside); v4 writes `rope_theta` + `rope_scaling`
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"{source}: rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    return RopeConfig(
        theta=theta,
        type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def rope_inv_freq(rope: RopeConfig, head_dim: int, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] (fp32) of the rotary embedding, scaling applied."""
    inv_freq = 1.0 / rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
        inv_freq = torch.where(
            wavelen < high_wavelen, inv_freq, torch.where(wavelen > low_wavelen, inv_freq / rope.factor, smoothed)
        )
    elif rope.type == "gguf_freqs":
        if freq_factors is None:
            raise ModelLoadError("rope type 'gguf_freqs' needs the rope_freqs tensor of the GGUF file")
        inv_freq = inv_freq / freq_factors.to(torch.float64)
    return inv_freq.float()
