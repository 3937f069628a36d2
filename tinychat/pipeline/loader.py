"""Load a model from a GGUF file, a Hugging Face directory or hub id, or the default package."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tinychat.config import ModelConfig
from tinychat.errors import ModelLoadError
from tinychat.io.default import default_model_path
from tinychat.io.gguf import read_gguf
from tinychat.io.hf import TensorRef, read_hf_dir, read_json, resolve_hub_id
from tinychat.model import Transformer
from tinychat.quant.linear import LAYER_LINEARS, WQLinear, int8_lm_head
from tinychat.quant.pack import awq_gemm_shapes, awq_gemv_shapes, to_int4_op, unpack_awq_gemm, unpack_awq_gemv
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


def _require_gguf(path: Path) -> None:
    if path.suffix != ".gguf":
        raise ModelLoadError(f"{path}: a model file must be GGUF (.gguf); otherwise pass the model directory")


def read_source_config(path: Path) -> dict:
    """The Hugging Face-spelled config of a GGUF file (from its metadata) or a model directory (config.json)."""
    if path.is_file():
        _require_gguf(path)
        return read_gguf(path)[0]
    return read_json(path / "config.json")


def load_model(
    source: str | os.PathLike | None = None, *, device: str | torch.device = "cpu", dtype="float32",
    int8_head: bool | None = None,
) -> tuple[Transformer, Tokenizer]:
    """Load weights, config and tokenizer; the model comes back in eval mode on `device` in `dtype`.

    An AWQ checkpoint's decoder linears run in 4 bits. int8_head: run the output projection in 8 bits (Int8Linear);
    None (the default) does so for an AWQ checkpoint on the CPU, as llama.cpp keeps it in 8 bits for its 4-bit types.
    """
    path = resolve_source(source)
    dtype = resolve_dtype(dtype)
    if path.is_file():
        _require_gguf(path)
        cfg_dict, tensors, reader = read_gguf(path)
        config = ModelConfig.from_hf(cfg_dict, source=str(path))
        tokenizer = Tokenizer.from_gguf(reader, path)
        awq = None
    else:
        cfg_dict, tensors = read_hf_dir(path)
        config = ModelConfig.from_hf(cfg_dict, source=str(path / "config.json"))
        quant = cfg_dict.get("quantization_config")
        awq = awq_format_from_hf(quant, config, str(path / "config.json")) if quant is not None else None
        gen_file = path / "generation_config.json"
        eos = read_json(gen_file).get("eos_token_id") if gen_file.exists() else cfg_dict.get("eos_token_id")
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        tokenizer = Tokenizer.from_dir(path, eos_token_ids=eos_ids)
    model = build_model(config, tensors, dtype, awq=awq)
    if int8_head or (int8_head is None and awq is not None and torch.device(device).type == "cpu"):
        int8_lm_head(model)
    return model.to(device).eval().requires_grad_(False), tokenizer


@dataclass(frozen=True)
class AwqFormat:
    """The AutoAWQ layout of a quantized checkpoint's linears (tinychat/quant/pack.py): 4-bit, zero point."""

    version: str  # "gemm" or "gemv"
    group_size: int

    def shapes(self, N: int, K: int) -> dict[str, tuple[int, ...]]:
        """Tensor suffix (qweight, qzeros, scales) -> shape, for a linear with weight [N, K]."""
        return (awq_gemm_shapes if self.version == "gemm" else awq_gemv_shapes)(N, K, self.group_size)

    def unpack(self, qweight, qzeros, scales) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> the plain quantization (q uint8 [N, K], scales fp32 [N, K/G], zeros fp32 [N, K/G])."""
        return (unpack_awq_gemm if self.version == "gemm" else unpack_awq_gemv)(qweight, qzeros, scales,
                                                                                self.group_size)


AWQ_VERSIONS = ("gemm", "gemv")


def awq_format_from_hf(quant: object, cfg: ModelConfig, source: str) -> AwqFormat:
    """config.json's `quantization_config` -> AwqFormat; ModelLoadError naming `source` for anything tinychat cannot
    run. Reads what Hugging Face transformers (AwqConfig) and AutoAWQ write: quant_method, bits (or w_bit),
    group_size (or q_group_size), zero_point, version (or format), modules_to_not_convert."""
    if not isinstance(quant, Mapping):
        raise ModelLoadError(f"{source}: quantization_config must be an object, found {type(quant).__name__}")
    method = str(quant.get("quant_method", "")).lower()
    if method != "awq":
        raise ModelLoadError(f"{source}: quantization method {quant.get('quant_method')!r} is not supported "
                             "(tinychat loads AWQ checkpoints: quant_method 'awq')")
    bits = quant.get("bits", quant.get("w_bit"))
    if bits != 4:
        raise ModelLoadError(f"{source}: AWQ checkpoints with bits={bits!r} are not supported (only 4-bit)")
    if quant.get("zero_point", True) is not True:
        raise ModelLoadError(f"{source}: AWQ without zero point (zero_point={quant.get('zero_point')!r}) "
                             "is not supported")
    version = str(quant.get("version") or quant.get("format") or "gemm").lower()
    if version not in AWQ_VERSIONS:
        raise ModelLoadError(f"{source}: unknown AWQ version {version!r}; supported: {', '.join(AWQ_VERSIONS)}")
    group_size = quant.get("group_size", quant.get("q_group_size"))
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ModelLoadError(f"{source}: AWQ group_size must be a positive integer, got {group_size!r}")
    if version == "gemv" and not (group_size in (32, 64) or group_size >= 128):
        raise ModelLoadError(f"{source}: AWQ gemv checkpoints have group size 32, 64 or >= 128, not {group_size}")
    skipped = quant.get("modules_to_not_convert") or []
    linears = [name[: -len(".weight")] for name in hf_tensor_shapes(cfg) if _is_linear_weight(name)]
    kept_float = [m for m in skipped if any(str(m) in name for name in linears)]
    if kept_float:
        raise ModelLoadError(f"{source}: modules_to_not_convert {kept_float} leaves decoder linears unquantized; "
                             "tinychat loads AWQ checkpoints whose decoder linears are all quantized")
    for name, shape in hf_tensor_shapes(cfg).items():
        if _is_linear_weight(name) and (shape[1] % group_size or shape[0] % 8):
            raise ModelLoadError(f"{source}: {name[: -len('.weight')]} with weight {shape} cannot be AWQ-packed with "
                                 f"group size {group_size} (needs in_features % group_size == 0, out_features % 8 == 0)")
    return AwqFormat(version, group_size)


def _is_linear_weight(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def hf_tensor_shapes(cfg: ModelConfig, awq: AwqFormat | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a Hugging Face checkpoint of this config -> its shape.

    With `awq`, each decoder linear's `weight` is replaced by its AWQ `qweight`, `qzeros` and `scales`.
    """
    C, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    linears = {  # weight shapes [out_features, in_features]
        "self_attn.q_proj": (q, C), "self_attn.k_proj": (kv, C), "self_attn.v_proj": (kv, C),
        "self_attn.o_proj": (C, q),
        "mlp.gate_proj": (I, C), "mlp.up_proj": (I, C), "mlp.down_proj": (C, I),
    }
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layer: dict[str, tuple[int, ...]] = {"input_layernorm.weight": (C,), "post_attention_layernorm.weight": (C,)}
        for name, (n, k) in linears.items():
            if awq is None:
                layer[f"{name}.weight"] = (n, k)
            else:
                layer.update({f"{name}.{suffix}": shape for suffix, shape in awq.shapes(n, k).items()})
        if cfg.qkv_bias:
            layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
        if cfg.o_bias:
            layer["self_attn.o_proj.bias"] = (C,)
        if cfg.mlp_bias:
            layer.update({"mlp.gate_proj.bias": (I,), "mlp.up_proj.bias": (I,), "mlp.down_proj.bias": (C,)})
        shapes.update({p + k: v for k, v in layer.items()})
    return shapes


# fused module of a decoder layer -> (its Hugging Face linears, in row order; whether it has a bias)
def hf_fused_linears(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
    return {
        "attn.wqkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), cfg.qkv_bias),
        "attn.wo": (("self_attn.o_proj",), cfg.o_bias),
        "mlp.w13": (("mlp.gate_proj", "mlp.up_proj"), cfg.mlp_bias),
        "mlp.w2": (("mlp.down_proj",), cfg.mlp_bias),
    }


def build_model(
    cfg: ModelConfig, tensors: Mapping[str, TensorRef], dtype: torch.dtype, awq: AwqFormat | None = None
) -> Transformer:
    """Check names and shapes of Hugging Face-named tensors, then load them one at a time (converted to `dtype`),
    fuse q/k/v and gate/up, and build the model on the CPU.

    With `awq` the decoder linears are AWQ-quantized: each is unpacked, fused by concatenating rows of the plain
    quantization, and repacked into the int4 op's layout (a WQLinear); biases, norms and embeddings go to `dtype`.
    """
    expected = hf_tensor_shapes(cfg, awq)
    if "rope_freqs" in tensors:
        expected["rope_freqs"] = (cfg.head_dim // 2,)
    extra = [n for n in tensors if n not in expected and not n.endswith(IGNORED_TENSOR_SUFFIXES)]
    if extra:
        quantized = " (AWQ-quantized)" if awq is not None else ""
        raise ModelLoadError(
            f"{tensors[extra[0]].file}: unexpected tensor(s) {', '.join(extra[:5])} for a {cfg.architecture}"
            f"{quantized} config"
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

    def get_packed(name: str) -> torch.Tensor:  # an AWQ tensor, as stored (int32 or fp16 scales)
        bar.update()
        t = tensors[name].load()
        scales = name.endswith(".scales")
        if not (t.is_floating_point() if scales else t.dtype == torch.int32):
            want = "a floating-point type" if scales else "int32"
            raise ModelLoadError(f"{tensors[name].file}: tensor {name!r} has dtype {t.dtype}, expected {want}")
        return t

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    freq_factors = tensors["rope_freqs"].load().float() if "rope_freqs" in tensors else None
    with torch.device("meta"):
        model = Transformer(cfg, freq_factors)
        if awq is not None:
            for layer in model.layers:
                for name in LAYER_LINEARS:
                    parent, attr = name.split(".")
                    linear = getattr(getattr(layer, parent), attr)
                    setattr(getattr(layer, parent), attr, WQLinear(
                        linear.in_features, linear.out_features, awq.group_size, linear.bias is not None, dtype=dtype
                    ))
    sd = {"embed.weight": get("model.embed_tokens.weight"), "norm": get("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = get("lm_head.weight")
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        sd[o + "attn_norm"] = get(p + "input_layernorm.weight")
        sd[o + "mlp_norm"] = get(p + "post_attention_layernorm.weight")
        for fused, (parts, has_bias) in hf_fused_linears(cfg).items():
            if awq is None:
                sd[o + fused + ".weight"] = cat([get(p + f"{x}.weight") for x in parts])
            else:
                plain = [awq.unpack(*(get_packed(p + f"{x}.{s}") for s in ("qweight", "qzeros", "scales")))
                         for x in parts]
                q, scales, zeros = (cat(list(t)) for t in zip(*plain))  # rows concatenated: groups run along K
                qweight, scales, zeros = to_int4_op(q, scales, zeros)
                sd.update({o + fused + ".qweight": qweight, o + fused + ".scales": scales, o + fused + ".zeros": zeros})
            if has_bias:
                sd[o + fused + ".bias"] = cat([get(p + f"{x}.bias") for x in parts])
    bar.close()
    result = model.load_state_dict(sd, strict=False, assign=True)
    unexpected_missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    assert not unexpected_missing and not result.unexpected_keys, result
    model.tie_weights()
    return model
