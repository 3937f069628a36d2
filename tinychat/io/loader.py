"""Load a model from a GGUF file, a Hugging Face directory or hub id, or the default package."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tinychat.config import ModelConfig
from tinychat.errors import ModelLoadError
from tinychat.io.default import default_model_path
from tinychat.io.gguf import read_gguf
from tinychat.io.hf import TensorRef, read_hf_dir, read_json, resolve_hub_id
from tinychat.model import Transformer
from tinychat.tokenizer import Tokenizer

# Tensors of Hugging Face checkpoints that carry no weights (recomputed at load)
IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None


def resolve_source(source: str | os.PathLike | None) -> Path:
    """A model argument -> a local GGUF file or model directory (downloading a hub id if needed)."""
    if source is None:
        return default_model_path()
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(".gguf"):
        return resolve_hub_id(text)
    raise ModelLoadError(f"{path}: no such file or directory")


def load_model(
    source: str | os.PathLike | None = None, *, device: str | torch.device = "cpu", dtype="float32"
) -> tuple[Transformer, Tokenizer]:
    """Load weights, config and tokenizer; the model comes back in eval mode on `device` in `dtype`."""
    path = resolve_source(source)
    dtype = resolve_dtype(dtype)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: a model file must be GGUF (.gguf); otherwise pass the model directory")
        cfg_dict, tensors, reader = read_gguf(path)
        config = ModelConfig.from_hf(cfg_dict, source=str(path))
        tokenizer = Tokenizer.from_gguf(reader, path)
    else:
        cfg_dict, tensors = read_hf_dir(path)
        config = ModelConfig.from_hf(cfg_dict, source=str(path / "config.json"))
        gen_file = path / "generation_config.json"
        eos = read_json(gen_file).get("eos_token_id") if gen_file.exists() else cfg_dict.get("eos_token_id")
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        tokenizer = Tokenizer.from_dir(path, eos_token_ids=eos_ids)
    model = build_model(config, tensors, dtype)
    return model.to(device).eval().requires_grad_(False), tokenizer


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a Hugging Face checkpoint of this config -> its shape."""
    C, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": (C,), "post_attention_layernorm.weight": (C,),
            "self_attn.q_proj.weight": (q, C), "self_attn.k_proj.weight": (kv, C), "self_attn.v_proj.weight": (kv, C),
            "self_attn.o_proj.weight": (C, q),
            "mlp.gate_proj.weight": (I, C), "mlp.up_proj.weight": (I, C), "mlp.down_proj.weight": (C, I),
        }
        if cfg.qkv_bias:
            layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
        if cfg.o_bias:
            layer["self_attn.o_proj.bias"] = (C,)
        if cfg.mlp_bias:
            layer.update({"mlp.gate_proj.bias": (I,), "mlp.up_proj.bias": (I,), "mlp.down_proj.bias": (C,)})
        shapes.update({p + k: v for k, v in layer.items()})
    return shapes


def build_model(cfg: ModelConfig, tensors: Mapping[str, TensorRef], dtype: torch.dtype) -> Transformer:
    """Check names and shapes of Hugging Face-named tensors, then load them one at a time (converted to `dtype`),
    fuse q/k/v and gate/up, and build the model on the CPU."""
    expected = hf_tensor_shapes(cfg)
    if "rope_freqs" in tensors:
        expected["rope_freqs"] = (cfg.head_dim // 2,)
    extra = [n for n in tensors if n not in expected and not n.endswith(IGNORED_TENSOR_SUFFIXES)]
    if extra:
        raise ModelLoadError(
            f"{tensors[extra[0]].file}: unexpected tensor(s) {', '.join(extra[:5])} for a {cfg.architecture} config"
        )
    missing = [n for n in expected if n not in tensors]
    if missing:
        where = next(iter(tensors.values())).file if tensors else "checkpoint"
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"{where}: missing tensor(s) {', '.join(missing[:5])}{more}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ModelLoadError(
                f"{tensors[name].file}: tensor {name!r} has shape {tensors[name].shape}, expected {shape}"
            )

    bar = tqdm(total=len(expected) - ("rope_freqs" in expected), desc="loading weights", unit="tensor", disable=None, leave=False)

    def get(name: str) -> torch.Tensor:
        bar.update()
        return tensors[name].load().to(dtype)

    freq_factors = tensors["rope_freqs"].load().float() if "rope_freqs" in tensors else None
    with torch.device("meta"):
        model = Transformer(cfg, freq_factors)
    sd = {"embed.weight": get("model.embed_tokens.weight"), "norm": get("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = get("lm_head.weight")
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        sd[o + "attn_norm"] = get(p + "input_layernorm.weight")
        sd[o + "mlp_norm"] = get(p + "post_attention_layernorm.weight")
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            sd[o + f"attn.wqkv.{kind}"] = torch.cat([get(p + f"self_attn.{x}_proj.{kind}") for x in "qkv"])
        for kind in ("weight", "bias") if cfg.mlp_bias else ("weight",):
            sd[o + f"mlp.w13.{kind}"] = torch.cat([get(p + f"mlp.{x}_proj.{kind}") for x in ("gate", "up")])
            sd[o + f"mlp.w2.{kind}"] = get(p + f"mlp.down_proj.{kind}")
        for kind in ("weight", "bias") if cfg.o_bias else ("weight",):
            sd[o + f"attn.wo.{kind}"] = get(p + f"self_attn.o_proj.{kind}")
    bar.close()
    result = model.load_state_dict(sd, strict=False, assign=True)
    unexpected_missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    assert not unexpected_missing and not result.unexpected_keys, result
    model.tie_weights()
    return model
