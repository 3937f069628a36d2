"""Save AWQ-quantized models as Hugging Face directories in AutoAWQ's GEMM format.

The result loads in tinychat (`load_model`), Hugging Face transformers (`AutoModelForCausalLM` with an AWQ
backend) and vLLM: Hugging Face tensor names, `qweight`/`qzeros`/`scales` per linear (tinychat/quant/pack.py),
everything else in float16, and a config.json with a `quantization_config`.

A directory is written atomically: into a temporary directory beside `out_dir`, each file fsynced, then renamed
into place. An interrupted save (an error, Ctrl-C) leaves neither `out_dir` nor the temporary directory behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from tinychat.config import ModelConfig
from tinychat.errors import ModelLoadError, TinychatError
from tinychat.io.loader import hf_fused_linears, hf_tensor_shapes
from tinychat.quant.linear import layer_linear_names
from tinychat.quant.pack import pack_awq_gemm
from tinychat.quant.quantize import QuantConfig

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3  # one model.safetensors up to 2 GB, shards above


def awq_quantization_config(qcfg: QuantConfig) -> dict:
    """config.json's `quantization_config` for an AutoAWQ GEMM checkpoint (zeros are always stored explicitly, so
    symmetric quantization is written as zero_point true too)."""
    return {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": qcfg.group_size,
            "zero_point": True, "modules_to_not_convert": None}


def save_awq_checkpoint(
    model,
    tokenizer,
    qdict: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    qcfg: QuantConfig,
    out_dir: str | os.PathLike,
    source_config: Mapping,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write `model` (a tinychat Transformer) with its decoder linears replaced by the AWQ quantization in `qdict`.

    qdict: "layers.{i}.attn.wqkv" / "attn.wo" / "mlp.w13" / "mlp.w2" -> (q uint8 [N, K], scales fp32 [N, K/G],
    zeros fp32 [N, K/G]) of the fused weights (tinychat.quant.quantize.quantize); biases, norms and embeddings
    come from `model`. source_config: the original config.json (Hugging Face spelling). `tokenizer` (or None)
    writes its files with `save_pretrained`. Returns the directory.
    """
    if qcfg.w_bit != 4:
        raise TinychatError(
            f"cannot save w_bit={qcfg.w_bit}: the AutoAWQ GEMM format holds 4-bit weights only "
            f"(w{qcfg.w_bit} is evaluation-only fake quantization)"
        )
    config = _checkpoint_config(model.config, source_config)
    config["quantization_config"] = awq_quantization_config(qcfg)
    tensors = awq_state_dict(model, qdict, qcfg)
    return _write_checkpoint(out_dir, tensors, config, tokenizer, source_config, overwrite, max_shard_bytes)


def save_fp16_checkpoint(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    source_config: Mapping,
    *,
    note: Mapping | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write `model` as a plain float16 Hugging Face directory (fused linears split back), atomically as
    `save_awq_checkpoint`. This is how fake-quantized models (w3, dequantized weights) are saved for evaluation;
    `note` goes into config.json as `tinychat_fake_quant` to say so."""
    config = _checkpoint_config(model.config, source_config)
    config.pop("quantization_config", None)
    if note is not None:
        config["tinychat_fake_quant"] = dict(note)
    return _write_checkpoint(out_dir, fp16_state_dict(model), config, tokenizer, source_config, overwrite,
                             max_shard_bytes)


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """The absolute output directory, or TinychatError when it exists (and not `overwrite`), is not a directory,
    or its parent cannot be created or written: checked before hours of work, not after."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise TinychatError(f"{out}: exists and is not a directory")
    if out.exists() and not overwrite:
        raise TinychatError(f"{out}: already exists (pass overwrite=True, or --overwrite, to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TinychatError(f"{out}: cannot write a checkpoint there (cannot create {out.parent}: {e})") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise TinychatError(f"{out}: cannot write a checkpoint there ({out.parent} is not writable)")
    return out


def _write_checkpoint(out_dir, tensors: dict[str, torch.Tensor], config: dict, tokenizer, source_config: Mapping,
                      overwrite: bool, max_shard_bytes: int) -> Path:
    """Weights, config.json, generation_config.json and tokenizer files into a temporary directory beside
    out_dir, fsynced, then renamed into place; on any error or interrupt nothing is left behind."""
    out = check_output_dir(out_dir, overwrite)
    generation = _generation_config(tokenizer, source_config)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise TinychatError(f"{out}: cannot write a checkpoint there ({e})") from None
    try:
        _write_weights(tensors, tmp, max_shard_bytes)
        _write_json(config, tmp / "config.json")
        _write_json(generation, tmp / "generation_config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        _move_into_place(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TinychatError(f"{out}: cannot write the checkpoint ({e})") from None
    except BaseException:  # an error or KeyboardInterrupt: leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def awq_state_dict(model, qdict: Mapping, qcfg: QuantConfig) -> dict[str, torch.Tensor]:
    """Hugging Face-named tensors of the checkpoint: fused linears split back into q/k/v and gate/up (rows split
    cleanly: quantization groups run along the input dimension), packed as AutoAWQ GEMM; the rest in float16."""
    cfg: ModelConfig = model.config
    missing = [n for n in layer_linear_names(cfg.num_layers) if n not in qdict]
    if missing:
        raise TinychatError(f"qdict lacks the quantization of {len(missing)} linear(s): {', '.join(missing[:5])}")
    weight_shapes = hf_tensor_shapes(cfg)
    tensors = _unquantized_tensors(model)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for fused, (parts, has_bias) in hf_fused_linears(cfg).items():
            name = f"layers.{i}.{fused}"
            q, scales, zeros = (t.detach().cpu() for t in qdict[name])
            rows = [weight_shapes[p + f"{x}.weight"][0] for x in parts]
            K = weight_shapes[p + f"{parts[0]}.weight"][1]
            if tuple(q.shape) != (sum(rows), K) or tuple(scales.shape) != (sum(rows), K // qcfg.group_size):
                raise TinychatError(
                    f"qdict[{name!r}]: q {tuple(q.shape)} and scales {tuple(scales.shape)} do not fit a "
                    f"[{sum(rows)}, {K}] weight with group size {qcfg.group_size}"
                )
            bias = layer.get_submodule(fused).bias
            splits = zip(parts, q.split(rows), scales.split(rows), zeros.split(rows),
                         bias.detach().cpu().split(rows) if has_bias else [None] * len(parts))
            for x, qx, sx, zx, bx in splits:
                qweight, qzeros, scales16 = pack_awq_gemm(qx, sx, zx)
                tensors.update({p + f"{x}.qweight": qweight, p + f"{x}.qzeros": qzeros, p + f"{x}.scales": scales16})
                if bx is not None:
                    tensors[p + f"{x}.bias"] = _fp16(p + f"{x}.bias", bx)
    return tensors


def fp16_state_dict(model) -> dict[str, torch.Tensor]:
    """Hugging Face-named float16 tensors of a float model: fused linears split back into q/k/v and gate/up."""
    cfg: ModelConfig = model.config
    weight_shapes = hf_tensor_shapes(cfg)
    tensors = _unquantized_tensors(model)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for fused, (parts, has_bias) in hf_fused_linears(cfg).items():
            linear = layer.get_submodule(fused)
            rows = [weight_shapes[p + f"{x}.weight"][0] for x in parts]
            for x, w in zip(parts, linear.weight.split(rows)):
                tensors[p + f"{x}.weight"] = _fp16(p + f"{x}.weight", w)
            if has_bias:
                for x, b in zip(parts, linear.bias.split(rows)):
                    tensors[p + f"{x}.bias"] = _fp16(p + f"{x}.bias", b)
    return tensors


def _unquantized_tensors(model) -> dict[str, torch.Tensor]:
    """Embeddings, norms and the untied lm_head, Hugging Face-named, in float16."""
    tensors = {"model.embed_tokens.weight": _fp16("model.embed_tokens.weight", model.embed.weight),
               "model.norm.weight": _fp16("model.norm.weight", model.norm)}
    if not model.config.tie_word_embeddings:
        tensors["lm_head.weight"] = _fp16("lm_head.weight", model.lm_head.weight)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = _fp16(p + "input_layernorm.weight", layer.attn_norm)
        tensors[p + "post_attention_layernorm.weight"] = _fp16(p + "post_attention_layernorm.weight", layer.mlp_norm)
    return tensors


def _fp16(name: str, t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    half = t.to(torch.float16).contiguous()
    if not torch.isfinite(half).all() and torch.isfinite(t).all():
        raise TinychatError(f"{name}: values beyond the float16 range ({t.abs().max().item():.4g}); cannot save")
    return half


def _checkpoint_config(cfg: ModelConfig, source_config: Mapping) -> dict:
    config = json.loads(json.dumps(dict(source_config)))  # a deep, JSON-safe copy
    try:
        described = ModelConfig.from_hf(config, source="source_config")
    except ModelLoadError as e:
        raise TinychatError(f"source_config is not a usable config.json: {e}") from None
    if described != cfg:
        diff = [f for f in cfg.__dataclass_fields__ if getattr(described, f) != getattr(cfg, f)]
        raise TinychatError(f"source_config does not describe this model (differs in: {', '.join(diff)})")
    config["torch_dtype"] = "float16"
    if "dtype" in config:  # transformers v5 spelling
        config["dtype"] = "float16"
    return config


def _generation_config(tokenizer, source_config: Mapping) -> dict:
    gen: dict = {}
    bos = tokenizer.bos_token_id if tokenizer is not None else source_config.get("bos_token_id")
    if bos is not None:
        gen["bos_token_id"] = bos
    if tokenizer is not None:
        first = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        eos = first + sorted(i for i in tokenizer.stop_token_ids if i not in first)
    else:
        eos = source_config.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if eos:
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return gen


# ---- writers (module-level, one per kind of file, so a test can make one fail) ----


def _write_json(obj: dict, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_weights(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json above the limit."""
    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    total = sum(nbytes(t) for t in tensors.values())
    if total <= max_shard_bytes:
        _write_safetensors(tensors, directory / "model.safetensors")
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():  # in order, a new shard when the next tensor would overflow this one
        if shards[-1] and size + nbytes(t) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes(t)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(shard, directory / file)
        weight_map.update({name: file for name in shard})
    _write_json({"metadata": {"total_size": total}, "weight_map": weight_map},
                directory / "model.safetensors.index.json")


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out (overwrite) is renamed aside first and removed once tmp is in place."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:  # put the previous directory back
            os.rename(old / out.name, out)
            old.rmdir()
        raise
    _fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
