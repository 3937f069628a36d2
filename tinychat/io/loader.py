"""Load a model from a GGUF file, a Hugging Face directory or hub id, or the default package.

The journey goes one way: `open_source` reads a source's header once (config, tensor names and shapes, tokenizer;
no weights) into a ModelSource; its `load` builds the model into a LoadedModel, the one record (model, tokenizer,
path, source config) that the quantizer and the checkpoint writer take as it is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from tinychat.config import ModelConfig
from tinychat.errors import ModelLoadError
from tinychat.files import read_json
from tinychat.int4_layout import to_int4_op
from tinychat.io.awq_format import AwqFormat, awq_format_from_hf
from tinychat.io.default import default_model_path
from tinychat.io.gguf import read_gguf
from tinychat.io.hf import TensorRef, read_hf_dir, resolve_hub_id
from tinychat.io.names import HF_GLOBALS, hf_layer_norms, hf_layer_prefix, hf_modules, hf_tensor_shapes
from tinychat.io.gguf_blocks import GroupWeights, group_linear, stack_rows
from tinychat.linear import GroupEmbedding, RowStack, WQLinear, int8_lm_head
from tinychat.model import DecoderLayer, Transformer, layer_linears
from tinychat.tokenizer import Tokenizer

# What a user may ask of a model's weights (ModelSource.plan)
QUANT_CHOICES = ("auto", "awq", "none")
# Tensor kinds (TensorRef.kind) that are float, not blocks; a Hugging Face tensor has no kind (None)
FLOAT_KINDS = (None, "F32", "F16", "BF16")
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


def resolve_device(device: str | torch.device) -> torch.device:
    """A device argument -> torch.device, or ValueError saying why it cannot run here (checked before any work)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({e}); use cpu or cuda") from None
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: tinychat runs on cpu or cuda")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r}: {why} (torch {torch.__version__}); use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA GPUs (0 .. "
                             f"{torch.cuda.device_count() - 1})")
    return d


def set_threads(threads: int | None) -> None:
    """torch's CPU threads (process-wide); None leaves torch's choice."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
    torch.set_num_threads(threads)


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


@dataclass(frozen=True)
class ModelSource:
    """A model source whose header has been read, once: no weight is loaded yet.

    source_config: the Hugging Face-spelled config (config.json, or the GGUF metadata spelled that way), which a
    checkpoint written from this model carries on. awq: the AutoAWQ format of a quantized checkpoint, else None.
    """

    path: Path
    source_config: dict
    config: ModelConfig
    tensors: Mapping[str, TensorRef]
    tokenizer: Tokenizer
    awq: AwqFormat | None

    @property
    def quantized(self) -> bool:
        """An AWQ checkpoint."""
        return self.awq is not None

    @property
    def has_blocks(self) -> bool:
        """A GGUF file whose decoder linears are (some or all) quantized blocks, not float tensors."""
        return any(ref.kind not in FLOAT_KINDS for name, ref in self.tensors.items() if _is_decoder_linear(name))

    def plan(self, quant: str) -> str:
        """How `quant` ("auto", "awq" or "none") runs this source: "checkpoint" (an AWQ checkpoint, as stored),
        "blocks" (a GGUF's quantized blocks, as stored), "awq" (quantize with AWQ, cached) or "none" (float).

        auto: a quantized source runs as stored, a full-precision one is quantized with AWQ. awq on a GGUF's blocks
        requantizes them (dequantized first); none dequantizes them.
        """
        if quant not in QUANT_CHOICES:
            raise ValueError(f"quant must be one of {', '.join(QUANT_CHOICES)}, got {quant!r}")
        if self.quantized:
            return "checkpoint"
        if quant == "auto":
            return "blocks" if self.has_blocks else "awq"
        return quant

    def load(self, *, device: str | torch.device = "cpu", dtype="float32", int8_head: bool | None = None,
             blocks: bool | None = None) -> LoadedModel:
        """Read the weights and build the model, in eval mode on `device` in `dtype`.

        An AWQ checkpoint's decoder linears run in 4 bits. blocks: run a GGUF's quantized tensors as their blocks
        (exactly, tinychat/io/gguf_blocks.py); None (the default) does so for a GGUF with quantized linears, False
        dequantizes them to `dtype`. int8_head: run a float output projection in 8 bits (Int8Linear, rounded per
        row); None (the default) does so for an AWQ checkpoint on the CPU, as llama.cpp keeps it in 8 bits for its
        4-bit types.
        """
        blocks = self.has_blocks if blocks is None else blocks
        model = build_model(self.config, self.tensors, resolve_dtype(dtype), awq=self.awq, blocks=blocks,
                            norm_offset=self.norm_offset)
        if int8_head or (int8_head is None and self.quantized and torch.device(device).type == "cpu"):
            int8_lm_head(model)
        model = model.to(device).eval().requires_grad_(False)
        return LoadedModel(model, self.tokenizer, self.path, self.source_config)

    @property
    def norm_offset(self) -> float | None:
        """What build_model adds to the norm weights: None (the config's offset), or 0 for a GGUF file, whose norms
        hold it already."""
        return 0.0 if self.path.suffix == ".gguf" else None

    def load_skeleton(self, dtype="float32") -> LoadedModel:
        """The model without its decoder layers (left on the meta device): every tensor's name and shape checked,
        the embedding, final norm and output projection read in `dtype` (a GGUF's blocks dequantized). With
        `load_layer`, how streaming quantization reads a model one layer at a time. Float (or GGUF) sources only."""
        self._require_float()
        model = build_model(self.config, self.tensors, resolve_dtype(dtype), norm_offset=self.norm_offset,
                            layers=False)
        return LoadedModel(model.eval().requires_grad_(False), self.tokenizer, self.path, self.source_config)

    def load_layer(self, i: int, *, dtype="float32", device: str | torch.device = "cpu") -> DecoderLayer:
        """Decoder layer i with float weights in `dtype` on `device` (a GGUF's blocks dequantized), read as `load`
        reads it; names and shapes are checked by `load_skeleton`."""
        self._require_float()
        layer = build_layer(self.config, self.tensors, i, resolve_dtype(dtype), norm_offset=self.norm_offset)
        return layer.to(device)

    def _require_float(self) -> None:
        if self.quantized:
            raise ModelLoadError(f"{self.path}: an AWQ checkpoint has no float layers to read one at a time")


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model and where it came from: what generation, quantization and checkpoint writing take (a
    skeleton's, ModelSource.load_skeleton, has its decoder layers on the meta device)."""

    model: Transformer
    tokenizer: Tokenizer
    path: Path
    source_config: dict


def open_source(source: str | os.PathLike | ModelSource | None = None) -> ModelSource:
    """Read a model's header once: a GGUF file, a model directory, a hub id, or None for the default model."""
    if isinstance(source, ModelSource):
        return source
    path = resolve_source(source)
    if path.is_file():
        _require_gguf(path)
        cfg_dict, tensors, reader = read_gguf(path)
        config = ModelConfig.from_hf(cfg_dict, source=str(path))
        tokenizer = Tokenizer.from_gguf(reader, path)
        # the vocabulary's fields are read once, into the tokenizer; the reader (which the tensors' loaders keep)
        # holds a numpy array per token of them: ~300 MB for a 262k vocabulary (Gemma 3)
        reader.fields = {k: v for k, v in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
        return ModelSource(path, cfg_dict, config, tensors, tokenizer, None)
    cfg_dict, tensors = read_hf_dir(path)
    where = str(path / "config.json")
    config = ModelConfig.from_hf(cfg_dict, source=where)
    quant = cfg_dict.get("quantization_config")
    awq = awq_format_from_hf(quant, config, where) if quant is not None else None
    gen_file = path / "generation_config.json"
    eos = read_json(gen_file).get("eos_token_id") if gen_file.exists() else cfg_dict.get("eos_token_id")
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return ModelSource(path, cfg_dict, config, tensors, Tokenizer.from_dir(path, eos_token_ids=eos_ids), awq)


def load_model(
    source: str | os.PathLike | None = None, *, device: str | torch.device = "cpu", dtype="float32",
    int8_head: bool | None = None,
) -> tuple[Transformer, Tokenizer]:
    """The model and tokenizer of `source` (`open_source(source).load(...)` without the record around them)."""
    loaded = open_source(source).load(device=device, dtype=dtype, int8_head=int8_head)
    return loaded.model, loaded.tokenizer


def _is_decoder_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def _check_tensors(cfg: ModelConfig, tensors: Mapping[str, TensorRef], awq: AwqFormat | None
                   ) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint of `cfg` holds (name -> shape), after checking `tensors` has them, each in its shape,
    and nothing else (ModelLoadError naming the file otherwise); no data is read."""
    expected = hf_tensor_shapes(cfg, awq.shapes if awq is not None else None)
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
    return expected


class _TensorReader:
    """Reads Hugging Face-named tensors one at a time, each checked as it is read (a weight of the expected dtype,
    finite) and converted to `dtype`; `bar` (a tqdm, or None) counts the reads."""

    def __init__(self, tensors: Mapping[str, TensorRef], dtype: torch.dtype, bar=None):
        self.tensors, self.dtype, self.bar = tensors, dtype, bar

    def _count(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def finite(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """t, checked as it is read (one pass): NaN or inf in a weight would turn every answer into garbage."""
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ModelLoadError(f"{self.tensors[name].file}: tensor {name!r} holds {bad} NaN or infinite value(s)")
        return t

    def get(self, name: str, add: float = 0.0) -> torch.Tensor:
        """A float tensor in `dtype`, `add` added in fp32 first (a norm's offset)."""
        self._count()
        t = self.tensors[name].load()
        if not t.is_floating_point():
            raise ModelLoadError(f"{self.tensors[name].file}: tensor {name!r} has dtype {t.dtype}, expected a "
                                 "floating-point type (a weight)")
        return (self.finite(name, t) if not add else self.finite(name, t).float() + add).to(self.dtype)

    def packed(self, name: str) -> torch.Tensor:
        """An AWQ tensor, as stored (int32, or floating-point scales)."""
        self._count()
        t = self.tensors[name].load()
        scales = name.endswith(".scales")
        if not (t.is_floating_point() if scales else t.dtype == torch.int32):
            want = "a floating-point type" if scales else "int32"
            raise ModelLoadError(f"{self.tensors[name].file}: tensor {name!r} has dtype {t.dtype}, expected {want}")
        return self.finite(name, t) if scales else t

    def groups(self, name: str) -> GroupWeights:
        """A GGUF tensor as its blocks' group form."""
        ref = self.tensors[name]
        if ref.groups is None:
            raise ModelLoadError(f"{ref.file}: tensor {ref.name or name!r} has type {ref.kind}, which tinychat cannot "
                                 "run as stored (no exact 4- or 8-bit group form); --quant none (quant='none') runs "
                                 "the model dequantized to float")
        self._count()
        return ref.groups()

    def native(self, names: list[str], bias: torch.Tensor | None) -> nn.Module:
        """The linear of the stacked rows of tensors `names`, each as stored (floats as `dtype`)."""
        if all(self.tensors[n].kind in FLOAT_KINDS for n in names):
            weight = _cat([self.get(n) for n in names])
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            linear.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                linear.bias = nn.Parameter(bias, requires_grad=False)
            return linear
        biases = bias.split([self.tensors[n].shape[0] for n in names]) if bias is not None else [None] * len(names)
        if any(self.tensors[n].kind in FLOAT_KINDS for n in names):  # float and block parts side by side
            return RowStack([self.native([n], b) for n, b in zip(names, biases)])
        parts = [self.groups(n) for n in names]
        if len({gw.form() for gw in parts}) == 1:  # one form, one op (Q5_0 and Q8_0 rows, say: int8, G32)
            return group_linear(stack_rows(parts), bias)
        return RowStack([group_linear(gw, b) for gw, b in zip(parts, biases)])  # parts of different forms


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _layer_state(r: _TensorReader, cfg: ModelConfig, i: int, offset: float, awq: AwqFormat | None, blocks: bool
                 ) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """Decoder layer i's tensors, named within the layer ("attn_norm", "attn.wqkv.weight", ...): its norms (plus
    `offset`, in fp32), its fused linears (float rows concatenated; with `awq` unpacked, fused and repacked into the
    int4 op's layout) and their biases; with `blocks`, the linears built as stored instead, as (name -> module) for
    swap_linears. The one place that says how a layer is read, for build_model and build_layer."""
    p = hf_layer_prefix(i)
    sd = {name: r.get(p + hf, offset) for name, hf in hf_layer_norms(cfg).items()}
    swapped: dict[str, nn.Module] = {}
    for spec in layer_linears(cfg):
        fused, parts = spec.name, [module for module, _ in hf_modules(spec)]
        if blocks:
            bias = _cat([r.get(p + f"{x}.bias") for x in parts]) if spec.bias else None
            swapped[fused] = r.native([p + f"{x}.weight" for x in parts], bias)
            continue
        if awq is None:
            sd[fused + ".weight"] = _cat([r.get(p + f"{x}.weight") for x in parts])
        else:
            plain = [awq.unpack(*(r.packed(p + f"{x}.{s}") for s in ("qweight", "qzeros", "scales"))) for x in parts]
            q, scales, zeros = (_cat(list(t)) for t in zip(*plain))  # rows concatenated: groups run along K
            qweight, scales, offsets = to_int4_op(q, scales, zeros)
            sd.update({fused + ".qweight": qweight, fused + ".scales": scales, fused + ".offsets": offsets})
        if spec.bias:
            sd[fused + ".bias"] = _cat([r.get(p + f"{x}.bias") for x in parts])
    return sd, swapped


def build_model(
    cfg: ModelConfig, tensors: Mapping[str, TensorRef], dtype: torch.dtype, awq: AwqFormat | None = None,
    blocks: bool = False, norm_offset: float | None = None, layers: bool = True,
) -> Transformer:
    """Check names and shapes of Hugging Face-named tensors, then load them one at a time (converted to `dtype`),
    fuse q/k/v and gate/up, and build the model on the CPU.

    With `awq` the decoder linears are AWQ-quantized: each is unpacked, fused by concatenating rows of the plain
    quantization, and repacked into the int4 op's layout (a WQLinear); biases, norms and embeddings go to `dtype`.
    With `blocks` (a GGUF source) every quantized linear and output projection runs its blocks as stored (a
    WQLinear or Int8Linear of the group form; a fused linear whose parts differ in form runs them side by side), and
    a quantized embedding stays in its blocks too (a GroupEmbedding, which a tied output projection shares). Float
    tensors, norms and a float embedding go to `dtype`.

    norm_offset: added to every norm weight (in fp32) before it goes to `dtype`: the model applies its norm weights
    as they are. None (a Hugging Face checkpoint) adds the config's (Gemma stores w and applies 1 + w); a GGUF
    file's norms hold the offset already (llama.cpp's converter added it), so its loader passes 0.

    layers=False reads no decoder layer: they stay on the meta device (a skeleton of embedding, final norm and
    output projection, to which streaming quantization adds one layer at a time with `build_layer`).
    """
    offset = cfg.norm_offset if norm_offset is None else norm_offset
    expected = _check_tensors(cfg, tensors, awq)
    embed_ref = HF_GLOBALS["embed.weight"]
    head_ref = embed_ref if cfg.tie_word_embeddings else HF_GLOBALS["lm_head.weight"]
    native_head = blocks and tensors[head_ref].kind not in FLOAT_KINDS  # the output projection as its blocks
    # the embedding as its blocks, looked up row by row (GroupEmbedding): no float copy of the table
    native_embed = blocks and tensors[embed_ref].kind not in FLOAT_KINDS and tensors[embed_ref].groups is not None
    reads = sum(n != "rope_freqs" and (layers or not n.startswith("model.layers.")) for n in expected)
    bar = tqdm(total=reads, desc="loading weights", unit="tensor", disable=None, leave=False)
    r = _TensorReader(tensors, dtype, bar)

    freq_factors = None
    if "rope_freqs" in tensors:
        freq_factors = r.finite("rope_freqs", tensors["rope_freqs"].load().float())
        if not (freq_factors > 0).all():
            raise ModelLoadError(f"{tensors['rope_freqs'].file}: rope_freqs must be positive")
    with torch.device("meta"):
        model = Transformer(cfg, freq_factors)
        if awq is not None:
            model.swap_linears(lambda name, linear: WQLinear(linear.in_features, linear.out_features, awq.group_size,
                                                             linear.bias is not None, dtype=dtype))
    sd = {name: r.get(hf, offset if name == "norm" else 0.0) for name, hf in HF_GLOBALS.items()
          if not (name == "lm_head.weight" and (cfg.tie_word_embeddings or native_head))
          and not (name == "embed.weight" and native_embed)}
    embed = head = None
    if native_embed:
        embed = group_linear(r.groups(embed_ref), None)
        head = embed if cfg.tie_word_embeddings else None  # tied: the output projection is the table itself
    swapped: dict[str, nn.Module] = {}  # decoder linears built as they are stored (blocks)
    for i in range(cfg.num_layers if layers else 0):
        layer_sd, layer_swapped = _layer_state(r, cfg, i, offset, awq, blocks)
        sd.update({f"layers.{i}.{name}": t for name, t in layer_sd.items()})
        swapped.update({f"layers.{i}.{name}": m for name, m in layer_swapped.items()})
    if native_head and head is None:
        head = group_linear(r.groups(head_ref), None)
    bar.close()
    result = model.load_state_dict(sd, strict=False, assign=True)
    unexpected_missing = [k for k in result.missing_keys
                          if not (k == "lm_head.weight" and (cfg.tie_word_embeddings or native_head))
                          and not (k == "embed.weight" and native_embed)
                          and k.rpartition(".")[0] not in swapped
                          and (layers or not k.startswith("layers."))]
    assert not unexpected_missing and not result.unexpected_keys, result
    if swapped:
        model.swap_linears(lambda name, linear: swapped[name])
    if embed is not None:
        model.embed = GroupEmbedding(embed, dtype)
    else:
        model.tie_weights()
    if head is not None:
        model.lm_head = head
    return model


def build_layer(cfg: ModelConfig, tensors: Mapping[str, TensorRef], i: int, dtype: torch.dtype,
                norm_offset: float | None = None) -> DecoderLayer:
    """Decoder layer i alone, with float weights in `dtype`, read from float (or dequantized) Hugging Face-named
    tensors as build_model reads them (same fusing, norm offset and checks; names and shapes are build_model's to
    check). With a skeleton (build_model(..., layers=False)) this is all that streaming quantization holds of a model
    at a time. On the CPU, without gradients."""
    offset = cfg.norm_offset if norm_offset is None else norm_offset
    sd, _ = _layer_state(_TensorReader(tensors, dtype), cfg, i, offset, None, False)
    with torch.device("meta"):
        layer = DecoderLayer(cfg, i)
    layer.load_state_dict(sd, strict=True, assign=True)
    return layer.requires_grad_(False)
