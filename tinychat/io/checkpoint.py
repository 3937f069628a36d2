"""Save AWQ-quantized models as Hugging Face directories in AutoAWQ's GEMM format.

The result loads in tinychat (`load_model`), Hugging Face transformers (`AutoModelForCausalLM` with an AWQ
backend) and vLLM: Hugging Face tensor names, `qweight`/`qzeros`/`scales` per linear (tinychat/io/awq_format.py),
everything else in float16, and a config.json with a `quantization_config`.

A directory is written atomically: into a temporary directory beside `out_dir`, each file fsynced, then renamed
into place. An interrupted save (an error, Ctrl-C) leaves neither `out_dir` nor the temporary directory behind.
`save_awq_checkpoint` writes a quantization held in memory; `awq_checkpoint_writer` writes one decoder layer at a
time as a streaming quantizer finishes it (tinychat.quant.awq.quantize_layers), each layer its own shard.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from tinychat.errors import TinychatError
from tinychat.files import read_json
from tinychat.io.awq_format import awq_quantization_config, pack_awq_gemm
from tinychat.io.loader import LoadedModel
from tinychat.io.names import HF_GLOBALS, hf_layer_norms, hf_layer_prefix, hf_modules
from tinychat.config import ModelConfig
from tinychat.model import DecoderLayer, Transformer, layer_linears, linear_names
from tinychat.quant.quantize import LayerQuant, QuantConfig, QuantResult

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3  # one model.safetensors up to 2 GB, shards above


def save_awq_checkpoint(
    loaded: LoadedModel,
    qdict: QuantResult,
    qcfg: QuantConfig,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write the loaded model with its decoder linears replaced by the AWQ quantization in `qdict`.

    qdict: "layers.{i}.attn.wqkv" / "attn.wo" / "mlp.w13" / "mlp.w2" -> (q uint8 [N, K], scales fp32 [N, K/G],
    zeros fp32 [N, K/G]) of the fused weights (tinychat.quant.quantize.quantize); biases, norms and embeddings
    come from the model. The record's source config becomes config.json (Hugging Face spelling) and its tokenizer
    (or None) writes its files with `save_pretrained`. Returns the directory.
    """
    config = _awq_config(loaded, qcfg)
    tensors = awq_state_dict(loaded.model, qdict, qcfg)
    return _write_checkpoint(out_dir, tensors, config, loaded, overwrite, max_shard_bytes)


@contextmanager
def awq_checkpoint_writer(
    loaded: LoadedModel, qcfg: QuantConfig, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> Iterator[Callable[[int, DecoderLayer, LayerQuant], None]]:
    """Write an AWQ checkpoint one decoder layer at a time: the same checkpoint as `save_awq_checkpoint`, sharded.

    Yields write_layer(i, layer, quantized) (a tinychat.quant.awq.LayerSink): layer i's linears packed from
    `quantized` ("attn.wqkv", ... -> (q, scales, zeros) of the fused weights), its biases and norms from `layer`,
    go at once into their own shard (model-{i+1:05d}-of-{L+1:05d}.safetensors) of a temporary directory beside
    out_dir. When the block ends, the embedding, final norm and output projection of loaded.model (whose decoder
    layers are not read: a skeleton will do) go into the last shard, then model.safetensors.index.json, config.json,
    generation_config.json and the tokenizer; everything is fsynced and the directory renamed into place. An error
    or interrupt in the block or in the writing leaves nothing behind; out_dir is checked before the block runs.
    """
    config = _awq_config(loaded, qcfg)
    out = check_output_dir(out_dir, overwrite)
    cfg = loaded.model.config
    n_files = cfg.num_layers + 1
    weight_map: dict[str, str] = {}
    written = {}  # layer -> bytes of its tensors
    with _atomic_directory(out) as tmp:
        def write_layer(i: int, layer: DecoderLayer, quantized: LayerQuant) -> None:
            tensors = _layer_norm_tensors(cfg, i, layer) | _awq_layer_tensors(cfg, i, layer, quantized, qcfg)
            written[i] = _write_shard(tensors, tmp, _shard_file(i + 1, n_files), weight_map)

        yield write_layer
        missing = [i for i in range(cfg.num_layers) if i not in written]
        if missing:
            raise TinychatError(f"{out}: decoder layer(s) {', '.join(map(str, missing[:5]))} were never written")
        total = sum(written.values())
        total += _write_shard(_global_tensors(loaded.model), tmp, _shard_file(n_files, n_files), weight_map)
        _write_index(tmp, weight_map, total)
        _write_files(tmp, config, loaded)


def _awq_config(loaded: LoadedModel, qcfg: QuantConfig) -> dict:
    """config.json of an AWQ checkpoint of `loaded`, or TinychatError for a bit width the format cannot hold."""
    if qcfg.w_bit != 4:
        raise TinychatError(
            f"cannot save w_bit={qcfg.w_bit}: the AutoAWQ GEMM format holds 4-bit weights only "
            f"(w{qcfg.w_bit} is evaluation-only fake quantization)"
        )
    config = _checkpoint_config(loaded.source_config)
    config["quantization_config"] = awq_quantization_config(qcfg.group_size)
    return config


def save_fp16_checkpoint(
    loaded: LoadedModel,
    out_dir: str | os.PathLike,
    *,
    note: Mapping | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write the loaded model as a plain float16 Hugging Face directory (fused linears split back), atomically as
    `save_awq_checkpoint`. This is how fake-quantized models (w3, dequantized weights) are saved for evaluation;
    `note` goes into config.json as `tinychat_fake_quant` to say so."""
    config = _checkpoint_config(loaded.source_config)
    config.pop("quantization_config", None)
    if note is not None:
        config["tinychat_fake_quant"] = dict(note)
    return _write_checkpoint(out_dir, fp16_state_dict(loaded.model), config, loaded, overwrite, max_shard_bytes)


def _is_checkpoint(directory: Path) -> bool:
    """Whether `directory` holds a checkpoint that this writer or AutoAWQ wrote (what overwrite may replace)."""
    try:
        config = read_json(directory / "config.json")  # a JSON object, or ModelLoadError
    except TinychatError:
        return False
    return "quantization_config" in config or "tinychat_fake_quant" in config


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False, source: Path | None = None) -> Path:
    """The absolute output directory, or TinychatError when it exists (and not `overwrite`), is not a directory,
    or its parent cannot be created or written: checked before hours of work, not after. overwrite replaces only
    a previous checkpoint (config.json with quantization_config), never the current directory or one holding it,
    nor `source` or a directory holding it."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise TinychatError(f"{out}: exists and is not a directory")
    if out.exists() and not overwrite:
        raise TinychatError(f"{out}: already exists (pass overwrite=True, or --overwrite, to replace it)")
    if out.exists():
        real, cwd = out.resolve(), Path.cwd().resolve()
        if real == cwd or real in cwd.parents:
            raise TinychatError(f"{out}: refusing to replace the current directory or one that holds it")
        if source is not None and (real == source.resolve() or real in source.resolve().parents):
            raise TinychatError(f"{out}: refusing to replace the model being quantized ({source}) or a directory "
                                "that holds it")
        if not _is_checkpoint(out):
            raise TinychatError(f"{out}: not a previous checkpoint (no config.json with a quantization_config), so "
                                "overwrite will not replace it; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TinychatError(f"{out}: cannot write a checkpoint there (cannot create {out.parent}: {e})") from None
    try:  # a real write, not os.access: root passes every permission check, and /proc or a read-only mount refuse
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=out.parent))
    except OSError as e:
        raise TinychatError(f"{out}: cannot write a checkpoint there ({out.parent} is not writable: "
                            f"{e.strerror or e})") from None
    return out


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _write_checkpoint(out_dir, tensors: dict[str, torch.Tensor], config: dict, loaded: LoadedModel,
                      overwrite: bool, max_shard_bytes: int) -> Path:
    """Weights, config.json, generation_config.json and tokenizer files into a temporary directory beside
    out_dir, fsynced, then renamed into place; on any error or interrupt nothing is left behind."""
    out = check_output_dir(out_dir, overwrite)
    with _atomic_directory(out) as tmp:
        _write_weights(tensors, tmp, max_shard_bytes)
        _write_files(tmp, config, loaded)
    return out


@contextmanager
def _atomic_directory(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out` for the block to fill; then every file in it is fsynced and it is renamed
    to `out`. On any error or interrupt (in the block too) it is removed: nothing is left behind."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would become the checkpoint's mode: the usual one instead
    except OSError as e:
        raise TinychatError(f"{out}: cannot write a checkpoint there ({e})") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        _move_into_place(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TinychatError(f"{out}: cannot write the checkpoint ({e})") from None
    except BaseException:  # an error or KeyboardInterrupt: leave nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_files(directory: Path, config: dict, loaded: LoadedModel) -> None:
    """config.json, generation_config.json and the tokenizer's files (if any) of a checkpoint of `loaded`."""
    _write_json(config, directory / "config.json")
    _write_json(_generation_config(loaded.tokenizer, loaded.source_config), directory / "generation_config.json")
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(directory)


def awq_state_dict(model: Transformer, qdict: QuantResult, qcfg: QuantConfig) -> dict[str, torch.Tensor]:
    """Hugging Face-named tensors of the checkpoint: fused linears split back into q/k/v and gate/up (rows split
    cleanly: quantization groups run along the input dimension), packed as AutoAWQ GEMM; the rest in float16."""
    missing = [n for n in linear_names(model.config) if n not in qdict]
    if missing:
        raise TinychatError(f"qdict lacks the quantization of {len(missing)} linear(s): {', '.join(missing[:5])}")
    cfg = model.config
    tensors = _global_tensors(model)
    for i, layer in enumerate(model.layers):
        quantized = {spec.name: qdict[f"layers.{i}.{spec.name}"] for spec in layer_linears(cfg)}
        tensors.update(_layer_norm_tensors(cfg, i, layer) | _awq_layer_tensors(cfg, i, layer, quantized, qcfg))
    return tensors


def _awq_layer_tensors(cfg: ModelConfig, i: int, layer: DecoderLayer, quantized: LayerQuant, qcfg: QuantConfig
                       ) -> dict[str, torch.Tensor]:
    """Decoder layer i's linears, Hugging Face-named: each fused linear's quantization (`quantized`) split back into
    its modules and packed as AutoAWQ GEMM, its bias (from `layer`) in float16."""
    p = hf_layer_prefix(i)
    tensors = {}
    for spec in layer_linears(cfg):
        q, scales, zeros = (t.detach().cpu() for t in quantized[spec.name])
        parts, rows = zip(*hf_modules(spec))
        N, K = spec.out_features, spec.in_features
        if tuple(q.shape) != (N, K) or tuple(scales.shape) != (N, K // qcfg.group_size):
            raise TinychatError(
                f"qdict['layers.{i}.{spec.name}']: q {tuple(q.shape)} and scales {tuple(scales.shape)} do not fit a "
                f"[{N}, {K}] weight with group size {qcfg.group_size}"
            )
        bias = layer.get_submodule(spec.name).bias
        splits = zip(parts, q.split(rows), scales.split(rows), zeros.split(rows),
                     bias.detach().cpu().split(rows) if spec.bias else [None] * len(parts))
        for x, qx, sx, zx, bx in splits:
            qweight, qzeros, scales16 = pack_awq_gemm(qx, sx, zx)
            tensors.update({p + f"{x}.qweight": qweight, p + f"{x}.qzeros": qzeros, p + f"{x}.scales": scales16})
            if bx is not None:
                tensors[p + f"{x}.bias"] = _fp16(p + f"{x}.bias", bx)
    return tensors


def fp16_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Hugging Face-named float16 tensors of a float model: fused linears split back into q/k/v and gate/up."""
    cfg = model.config
    tensors = _global_tensors(model)
    for i, layer in enumerate(model.layers):
        p = hf_layer_prefix(i)
        tensors.update(_layer_norm_tensors(cfg, i, layer))
        for spec in layer_linears(cfg):
            linear = layer.get_submodule(spec.name)
            parts, rows = zip(*hf_modules(spec))
            for x, w in zip(parts, linear.weight.split(rows)):
                tensors[p + f"{x}.weight"] = _fp16(p + f"{x}.weight", w)
            if spec.bias:
                for x, b in zip(parts, linear.bias.split(rows)):
                    tensors[p + f"{x}.bias"] = _fp16(p + f"{x}.bias", b)
    return tensors


def _global_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Embeddings, final norm and the untied lm_head, Hugging Face-named, in float16 (the decoder layers are not
    read). The model's norm weights are applied as they are; a checkpoint's as config.norm_offset + w (Gemma), so
    the offset comes off here."""
    cfg = model.config
    return {hf: _fp16(hf, model.get_parameter(name) - (cfg.norm_offset if name == "norm" else 0.0))
            for name, hf in HF_GLOBALS.items() if name != "lm_head.weight" or not cfg.tie_word_embeddings}


def _layer_norm_tensors(cfg: ModelConfig, i: int, layer: DecoderLayer) -> dict[str, torch.Tensor]:
    """Decoder layer i's norm weights, Hugging Face-named, in float16, less config.norm_offset (as _global_tensors)."""
    p = hf_layer_prefix(i)
    return {p + hf: _fp16(p + hf, layer.get_parameter(name) - cfg.norm_offset)
            for name, hf in hf_layer_norms(cfg).items()}


def _fp16(name: str, t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    half = t.to(torch.float16).contiguous()
    if not torch.isfinite(half).all() and torch.isfinite(t).all():
        raise TinychatError(f"{name}: values beyond the float16 range ({t.abs().max().item():.4g}); cannot save")
    return half


def _checkpoint_config(source_config: Mapping) -> dict:
    """config.json of the checkpoint: the source's config (a deep, JSON-safe copy) with the dtype it is saved in."""
    config = json.loads(json.dumps(dict(source_config)))
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
    path.chmod(0o666 & ~_umask())  # safetensors writes 0600; the checkpoint's other files get the usual mode


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _write_weights(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json above the limit."""
    total = sum(_nbytes(t) for t in tensors.values())
    if total <= max_shard_bytes:
        _write_safetensors(tensors, directory / "model.safetensors")
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():  # in order, a new shard when the next tensor would overflow this one
        if shards[-1] and size + _nbytes(t) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += _nbytes(t)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        _write_shard(shard, directory, _shard_file(i, len(shards)), weight_map)
    _write_index(directory, weight_map, total)


def _shard_file(i: int, n: int) -> str:
    """The name of shard i (from 1) of n."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _write_shard(tensors: dict[str, torch.Tensor], directory: Path, file: str, weight_map: dict[str, str]) -> int:
    """One shard of a sharded checkpoint, its tensors entered in weight_map (tensor name -> file); returns the bytes
    of its tensors."""
    _write_safetensors(tensors, directory / file)
    weight_map.update({name: file for name in tensors})
    return sum(_nbytes(t) for t in tensors.values())


def _write_index(directory: Path, weight_map: dict[str, str], total: int) -> None:
    """model.safetensors.index.json of the shards in `weight_map`; total: the bytes of their tensors."""
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
