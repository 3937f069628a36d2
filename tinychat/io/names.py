"""The Hugging Face names of the decoder's tensors: the one map between a checkpoint's tensors and the model's.

The model declares its linears and their row blocks (`tinychat.model.layer_linears`); this module says which Hugging
Face tensor each block, norm and embedding is. GGUF files are read into these names too (tinychat/io/gguf.py maps
llama.cpp's names to them), and checkpoints are written in them (tinychat/pipeline/checkpoint.py).
"""

from __future__ import annotations

from collections.abc import Callable

from tinychat.config import ModelConfig
from tinychat.model import LinearSpec, layer_linears

# row block of a decoder linear -> its Hugging Face module within a layer
HF_LINEAR_PARTS = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
# the model's other parameters -> their Hugging Face tensors (lm_head only when not tied to the embedding)
HF_GLOBALS = {"embed.weight": "model.embed_tokens.weight", "norm": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}


def hf_layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def hf_layer_norms(cfg: ModelConfig) -> dict[str, str]:
    """A decoder layer's norm parameters -> their Hugging Face tensors within the layer. Gemma 3's names differ:
    its post_attention_layernorm is the attention's output norm (Llama's is the MLP's input norm)."""
    if cfg.post_norms:
        norms = {"attn_norm": "input_layernorm.weight", "mlp_norm": "pre_feedforward_layernorm.weight",
                 "post_attn_norm": "post_attention_layernorm.weight",
                 "post_mlp_norm": "post_feedforward_layernorm.weight"}
    else:
        norms = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight"}
    if cfg.qk_norm:
        norms.update({"attn.q_norm": "self_attn.q_norm.weight", "attn.k_norm": "self_attn.k_norm.weight"})
    return norms


def hf_modules(spec: LinearSpec) -> list[tuple[str, int]]:
    """The Hugging Face modules whose rows make up the decoder linear `spec`, in row order, with their row counts."""
    return [(HF_LINEAR_PARTS[part], rows) for part, rows in spec.parts]


def hf_linear_modules(cfg: ModelConfig) -> list[tuple[str, tuple[int, int]]]:
    """Every Hugging Face linear module of the decoder ("model.layers.0.self_attn.q_proj", ...) with its weight
    shape [out_features, in_features]."""
    return [(hf_layer_prefix(i) + module, (rows, spec.in_features))
            for i in range(cfg.num_layers) for spec in layer_linears(cfg) for module, rows in hf_modules(spec)]


def hf_tensor_shapes(cfg: ModelConfig,
                     linear_tensors: Callable[[int, int], dict[str, tuple[int, ...]]] | None = None
                     ) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a Hugging Face checkpoint of this config -> its shape.

    With `linear_tensors` (a checkpoint format's: (N, K) -> {suffix: shape}, e.g. AutoAWQ's qweight, qzeros and
    scales), each decoder linear's `weight` is replaced by those tensors.
    """
    C, V = cfg.hidden_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {HF_GLOBALS["embed.weight"]: (V, C), HF_GLOBALS["norm"]: (C,)}
    if not cfg.tie_word_embeddings:
        shapes[HF_GLOBALS["lm_head.weight"]] = (V, C)
    for i in range(cfg.num_layers):
        p = hf_layer_prefix(i)
        shapes.update({p + hf: (cfg.head_dim,) if name.startswith("attn.") else (C,)
                       for name, hf in hf_layer_norms(cfg).items()})
        for spec in layer_linears(cfg):
            for module, rows in hf_modules(spec):
                if linear_tensors is None:
                    shapes[f"{p}{module}.weight"] = (rows, spec.in_features)
                else:
                    shapes.update({f"{p}{module}.{suffix}": shape
                                   for suffix, shape in linear_tensors(rows, spec.in_features).items()})
                if spec.bias:
                    shapes[f"{p}{module}.bias"] = (rows,)
    return shapes
