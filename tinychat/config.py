"""One configuration for every supported Llama-family architecture.

Architecture differences are data: q/k/v bias (Qwen2), tied embeddings (SmolLM2, TinyLlama, small Qwen2),
grouped-query attention, rotary scaling (Llama 3), sliding window (Mistral v0.1), q/k RMSNorm (Qwen3, Gemma 3), and
Gemma 3's set: a scaled embedding, norms applied as 1 + weight, norms on the attention's and MLP's outputs too, a
GELU (tanh) gated MLP, local layers with a sliding window and their own rotary base among global ones, and an
attention scale of its own. Nothing branches on class names beyond the table of accepted `architectures` below.
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
    "Qwen3ForCausalLM": {"qkv_bias": False, "o_bias": False, "qk_norm": True},
    "Gemma3ForCausalLM": {"qkv_bias": False, "o_bias": False, "qk_norm": True, "post_norms": True, "norm_offset": 1.0,
                          "scaled_embedding": True},
}
# hidden_act / hidden_activation of config.json -> the MLP's activation (tinychat.ops: silu_and_mul,
# gelu_tanh_and_mul)
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
LAYER_TYPES = ("full_attention", "sliding_attention")
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
    sliding_window: int | None = None  # the window of the sliding layers (all of them without layer_types)
    layer_types: tuple[str, ...] | None = None  # each layer's LAYER_TYPES entry (Gemma 3: 5 sliding, 1 full, ...)
    rope_local: RopeConfig | None = None  # the rotary embedding of sliding layers, where it differs (Gemma 3)
    hidden_act: str = "silu"  # one of ACTIVATIONS' values
    qk_norm: bool = False  # RMSNorm of each query and key head before the rotary embedding (Qwen3, Gemma 3)
    post_norms: bool = False  # RMSNorm of the attention's and the MLP's outputs before each residual add (Gemma 3)
    norm_offset: float = 0.0  # a checkpoint's norm weight w is applied as norm_offset + w (Gemma: 1)
    embed_scale: float = 1.0  # the embedding's rows are multiplied by this (Gemma: sqrt(hidden_size))
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (Gemma); None: head_dim ** -0.5
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
        if self.layer_types is not None and (len(self.layer_types) != self.num_layers
                                             or not set(self.layer_types) <= set(LAYER_TYPES)):
            raise ValueError(f"layer_types must give one of {', '.join(LAYER_TYPES)} for each of the "
                             f"{self.num_layers} layers, got {self.layer_types!r}")
        if self.hidden_act not in ACTIVATIONS.values():
            raise ValueError(f"hidden_act must be one of {', '.join(sorted(set(ACTIVATIONS.values())))}, got "
                             f"{self.hidden_act!r}")
        if not (0 < self.embed_scale < math.inf) or not (self.query_pre_attn_scalar is None
                                                          or 0 < self.query_pre_attn_scalar < math.inf):
            raise ValueError(f"embed_scale and query_pre_attn_scalar must be finite and > 0, got {self.embed_scale}, "
                             f"{self.query_pre_attn_scalar}")
        for r in (self.rope, self.rope_local or self.rope):
            _check_rope(r)

    @property
    def context_length(self) -> int:
        """Longest sequence the runtime serves: the trained context (sliding layers keep only their window)."""
        return self.max_position_embeddings

    @property
    def attn_scale(self) -> float:
        """The factor of the attention scores q.k."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_window(self, i: int) -> int:
        """The sliding window of layer i: how many positions (its own included) a token sees; 0 for all of them."""
        sliding = self.layer_types is None or self.layer_types[i] == "sliding_attention"
        return self.sliding_window if self.sliding_window and sliding else 0

    def layer_local_rope(self, i: int) -> bool:
        """Whether layer i takes rope_local (a sliding layer of a model that has one), else rope."""
        return self.rope_local is not None and self.layer_window(i) > 0

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
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        if act not in ACTIVATIONS:
            raise ModelLoadError(f"{source}: hidden activation {act!r} is not supported ({', '.join(ACTIVATIONS)})")
        if cfg.get("final_logit_softcapping") or cfg.get("attn_logit_softcapping"):
            raise ModelLoadError(f"{source}: logit soft-capping (Gemma 2) is not supported")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
            layer_types = cfg.get("layer_types")
            rope, rope_local = _ropes_from_hf(cfg, source)
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or (hidden // heads if heads > 0 else 0)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope=rope,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=bool(implied.get("qkv_bias", cfg.get("attention_bias", False))),
                o_bias=bool(implied.get("o_bias", cfg.get("attention_bias", False))),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                sliding_window=int(sliding) if sliding else None,
                layer_types=tuple(layer_types) if layer_types is not None else None,
                rope_local=rope_local,
                hidden_act=ACTIVATIONS[act],
                qk_norm=implied.get("qk_norm", False),
                post_norms=implied.get("post_norms", False),
                norm_offset=implied.get("norm_offset", 0.0),
                embed_scale=hidden**0.5 if implied.get("scaled_embedding") else 1.0,
                query_pre_attn_scalar=(float(cfg["query_pre_attn_scalar"]) if cfg.get("query_pre_attn_scalar")
                                       else None),
                architecture=arch,
            )
        except KeyError as e:
            raise ModelLoadError(f"{source}: missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{source}: invalid value: {e}") from None


def _check_rope(r: RopeConfig) -> None:
    """ValueError for a rotary embedding no model has."""
    if not (0 < r.theta < math.inf) or not (0 < r.factor < math.inf):
        raise ValueError(f"rope theta and factor must be finite and > 0, got theta={r.theta}, factor={r.factor}")
    if r.type == "llama3" and not (0 < r.low_freq_factor < r.high_freq_factor < math.inf
                                   and r.original_max_position_embeddings >= 1):
        raise ValueError("llama3 rope needs 0 < low_freq_factor < high_freq_factor and "
                         f"original_max_position_embeddings >= 1, got {r}")


def _ropes_from_hf(cfg: dict, source: str) -> tuple[RopeConfig, RopeConfig | None]:
    """The rotary embedding of the (global) layers, and that of the sliding layers where it differs: transformers v5
    writes one `rope_parameters` per layer type for Gemma 3, v4 a `rope_local_base_freq`."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        local = params.get("sliding_attention")
        return (_rope_from_hf(params["full_attention"] or {}, cfg, source),
                _rope_from_hf(local, cfg, source) if local else None)
    local = cfg.get("rope_local_base_freq")
    return (_rope_from_hf(params or cfg.get("rope_scaling") or {}, cfg, source),
            RopeConfig(theta=float(local)) if local else None)


def _rope_from_hf(params: dict, cfg: dict, source: str) -> RopeConfig:
    # transformers v5 writes `rope_parameters` (theta inside); v4 writes `rope_theta` + `rope_scaling`
    params = dict(params)
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
