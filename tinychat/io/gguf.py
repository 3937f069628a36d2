"""Read a llama.cpp GGUF file into a Hugging Face style config and its tensors, under Hugging Face names.

Only the metadata keys and tensors of decoder-only Llama-family models are understood
(``general.architecture`` ``llama``, ``qwen2``, ``qwen3`` or ``gemma3``; a Gemma 3 file's norm weights hold the
1 + w its model applies, as llama.cpp's converter stored them: tinychat.io.loader adds nothing to them). Each tensor can be read two ways: as its blocks, exactly, in
the group form tinychat's int4 / int8 ops run (block types with one: tinychat/io/gguf_blocks.py), or expanded to
float32 with the ``gguf`` package (every type it can dequantize). Either way the llama.cpp rotary permutation of the
query and key rows is undone (a reordering of rows), so that the result can be used like a ``config.json`` plus a
checkpoint.
"""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gguf
from gguf import GGMLQuantizationType, GGUFReader

from tinychat.errors import ModelLoadError
from tinychat.files import MISSING, gguf_field
from tinychat.io.gguf_blocks import NATIVE_BITS, block_weights, decode
from tinychat.io.hf import TensorRef

__all__ = [
    "GGUF_ARCHITECTURES",
    "SUPPORTED_TENSOR_TYPES",
    "dequantize_tensor",
    "gguf_config",
    "hf_tensor_name",
    "open_gguf",
    "read_gguf",
]

# general.architecture -> (Hugging Face class name, Hugging Face model_type); the class must be one of
# tinychat.config.SUPPORTED_ARCHITECTURES
GGUF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}
# What llama.cpp fixes for Gemma 3 where a file has no key (src/llama-model.cpp): every 6th layer is global, the
# sliding layers' rotary base is 10000.
GEMMA3_SLIDING_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0

# Architectures whose q/k projections llama.cpp's converter permutes for its rotary layout.
_PERMUTED_ARCHITECTURES = frozenset({"llama"})

# Types tinychat reads: float tensors, and every block type `gguf` can dequantize (those with an exact group form,
# gguf_blocks.NATIVE_BITS, also run as stored).
FLOAT_TENSOR_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16})
SUPPORTED_TENSOR_TYPES: frozenset[GGMLQuantizationType] = FLOAT_TENSOR_TYPES | frozenset(NATIVE_BITS) | frozenset(
    GGMLQuantizationType[name] for name in (
        "Q2_K", "Q3_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
        "TQ1_0", "TQ2_0",
    )
)
_SUPPORTED_TYPE_NAMES = ", ".join(t.name for t in sorted(SUPPORTED_TENSOR_TYPES, key=int))

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}

# per-layer GGUF part -> (Hugging Face module, suffixes it may carry)
_LAYER_PARTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "attn_norm": ("input_layernorm", ("weight",)),
    "attn_q": ("self_attn.q_proj", ("weight", "bias")),
    "attn_k": ("self_attn.k_proj", ("weight", "bias")),
    "attn_v": ("self_attn.v_proj", ("weight", "bias")),
    "attn_output": ("self_attn.o_proj", ("weight", "bias")),
    "ffn_norm": ("post_attention_layernorm", ("weight",)),  # pre_feedforward_layernorm in Gemma 3
    "attn_q_norm": ("self_attn.q_norm", ("weight",)),
    "attn_k_norm": ("self_attn.k_norm", ("weight",)),
    "post_attention_norm": ("post_attention_layernorm", ("weight",)),
    "post_ffw_norm": ("post_feedforward_layernorm", ("weight",)),
    "ffn_gate": ("mlp.gate_proj", ("weight",)),
    "ffn_up": ("mlp.up_proj", ("weight",)),
    "ffn_down": ("mlp.down_proj", ("weight",)),
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([A-Za-z0-9_]+)\.(weight|bias)")

_GGUF_MAGIC = b"GGUF"


class _FastGGUFReader(GGUFReader):
    """GGUFReader that slices a plain ndarray view of its memory map instead of the memmap.

    Parsing metadata makes hundreds of thousands of tiny slices (one per tokenizer string);
    each slice of an ``np.memmap`` goes through ``memmap.__getitem__`` and
    ``__array_finalize__``, which triples the time to open a file with a 49k-token vocabulary.
    The bytes read are identical; tensors' ``data`` are plain ndarrays over the same mapping.
    """

    _plain: np.ndarray | None = None

    def _get(self, offset, dtype, count=1, override_order=None):  # same contract as the base
        plain = self._plain
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        dt = np.dtype(dtype)
        count = int(count)
        end = offset + dt.itemsize * count
        arr = plain[offset:end].view(dt)[:count]
        order = self.byte_order if override_order is None else override_order
        return arr.view(arr.dtype.newbyteorder(order))


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """Open ``path`` with a GGUF reader; any failure is a ModelLoadError naming the file."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a directory, expected a .gguf file")
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"{p}: cannot read the file: {exc}") from exc
    if size == 0:
        raise ModelLoadError(f"{p}: the file is empty, expected a GGUF model")
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(
            f"{p}: not a GGUF file (it starts with {magic!r}, a GGUF file starts with {_GGUF_MAGIC!r})"
        )
    try:
        reader = _FastGGUFReader(p, "r")
    except Exception as exc:  # numpy/gguf raise ValueError, IndexError, KeyError, OverflowError...
        raise ModelLoadError(
            f"{p}: cannot parse the GGUF file, it is truncated or corrupt "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if reader.byte_order != "I":
        raise ModelLoadError(f"{p}: big-endian GGUF files are not supported")
    file_size = int(reader.data.size)
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > file_size or t.data.nbytes != t.n_bytes:
            raise ModelLoadError(
                f"{p}: the file is truncated: tensor {t.name!r} needs bytes up to offset {end} "
                f"but the file has {file_size} bytes"
            )
    # each tensor's bytes are its own: a crafted header could point two tensors at one region
    spans = sorted((int(t.data_offset), int(t.data_offset) + int(t.n_bytes), t.name) for t in reader.tensors)
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise ModelLoadError(f"{p}: tensors {name!r} and {other!r} overlap in the file (a corrupt or crafted "
                                 "header)")
    return reader


def _positive_int(value: Any, key: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) <= 0:
        raise ModelLoadError(f"{path}: GGUF metadata {key!r} must be a positive integer, got {value!r}")
    return int(value)


def gguf_config(reader: GGUFReader, path: str | os.PathLike = "<gguf>") -> dict:
    """Build a Hugging Face ``config.json`` style dict from a GGUF reader's metadata."""
    path = Path(path)
    arch = gguf_field(reader, "general.architecture", path)
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unsupported model architecture {arch!r} "
            f"(supported: {', '.join(sorted(GGUF_ARCHITECTURES))})"
        )
    hf_class, model_type = GGUF_ARCHITECTURES[arch]

    def key(name: str, default: Any = MISSING) -> Any:
        return gguf_field(reader, f"{arch}.{name}", path, default)

    def int_key(name: str, default: Any = MISSING) -> Any:
        value = key(name, default)
        if value is None:
            return None
        return _positive_int(value, f"{arch}.{name}", path)

    tensor_names = {t.name: t for t in reader.tensors}

    hidden = int_key("embedding_length")
    layers = int_key("block_count")
    heads = int_key("attention.head_count")
    kv_heads = int_key("attention.head_count_kv", heads)
    intermediate = int_key("feed_forward_length")
    head_dim = key("attention.key_length", None)
    if head_dim is None:
        head_dim = key("rope.dimension_count", None)
    if head_dim is None:
        if hidden % heads:
            raise ModelLoadError(
                f"{path}: embedding_length {hidden} is not a multiple of head_count {heads}"
            )
        head_dim = hidden // heads
    head_dim = _positive_int(head_dim, f"{arch}.attention.key_length", path)
    if heads % kv_heads:
        raise ModelLoadError(f"{path}: head_count {heads} is not a multiple of head_count_kv {kv_heads}")
    if head_dim % 2:
        raise ModelLoadError(f"{path}: the head dimension {head_dim} must be even for rotary embeddings")

    vocab = key("vocab_size", None)
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is not None:
            vocab = len(tokens.data)
        elif "token_embd.weight" in tensor_names:
            vocab = int(tensor_names["token_embd.weight"].shape[-1])
        else:
            raise ModelLoadError(f"{path}: cannot tell the vocabulary size (no vocab_size, tokens or token_embd)")
    vocab = _positive_int(vocab, f"{arch}.vocab_size", path)

    eps = float(key("attention.layer_norm_rms_epsilon", 1e-5))
    rope_theta = float(key("rope.freq_base", 10000.0))
    context = int_key("context_length", None)

    rope_scaling: dict | None = None
    if "rope_freqs.weight" in tensor_names:
        rope_scaling = {"rope_type": "gguf_freqs"}
    else:
        scaling_type = key("rope.scaling.type", None)
        factor = key("rope.scaling.factor", None)
        if factor is None:
            legacy = key("rope.scale_linear", None)  # older converters
            if legacy is not None and float(legacy) != 1.0:
                scaling_type, factor = scaling_type or "linear", legacy
        if scaling_type not in (None, "none") or (scaling_type is None and factor is not None):
            scaling_type = scaling_type or "linear"
            if factor is None:
                raise ModelLoadError(
                    f"{path}: rope scaling {scaling_type!r} is set but {arch}.rope.scaling.factor is missing"
                )
            rope_scaling = {"rope_type": scaling_type, "factor": float(factor)}
            original = key("rope.scaling.original_context_length", None)
            if original is not None:
                rope_scaling["original_max_position_embeddings"] = int(original)

    extra: dict[str, Any] = {}
    if arch == "gemma3":  # the only architecture here whose sliding window llama.cpp applies
        # every n-th layer is global (llama.cpp's set_swa_pattern; n = 6 where the file does not say)
        pattern = int_key("attention.sliding_window_pattern", GEMMA3_SLIDING_PATTERN)
        sliding = [i % pattern < pattern - 1 for i in range(layers)]
        local_base = float(key("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE))
        # llama.cpp's attention scale: 1/sqrt(head dim), but 1/sqrt(hidden / heads) for the 27B model (62 layers)
        extra = {
            "sliding_window": int_key("attention.sliding_window"),
            "hidden_activation": "gelu_pytorch_tanh",
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "rope_parameters": {"full_attention": {"rope_type": "default", **(rope_scaling or {}),
                                                   "rope_theta": rope_theta},
                                "sliding_attention": {"rope_type": "default", "rope_theta": local_base}},
            "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
        }
    return {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": context,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": any(n.endswith(".attn_q.bias") for n in tensor_names),
        "bos_token_id": gguf_field(reader, "tokenizer.ggml.bos_token_id", path, None),
        "eos_token_id": gguf_field(reader, "tokenizer.ggml.eos_token_id", path, None),
        "torch_dtype": "float32",
        **extra,
    }


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face name of a GGUF tensor of architecture `arch`, or None when tinychat does not know it."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None:
        return None
    layer, part, suffix = m.groups()
    if part not in _LAYER_PARTS:
        return None
    module, suffixes = _LAYER_PARTS[part]
    if arch == "gemma3" and part == "ffn_norm":  # Gemma 3's post_attention_layernorm is post_attention_norm
        module = "pre_feedforward_layernorm"
    if suffix not in suffixes:
        return None
    return f"model.layers.{int(layer)}.{module}.{suffix}"


def _type_name(qtype: Any) -> str:
    return getattr(qtype, "name", str(qtype))


def _check_type(tensor: Any, path: Path) -> None:
    if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
        raise ModelLoadError(
            f"{path}: tensor {tensor.name!r} has type {_type_name(tensor.tensor_type)}, which tinychat "
            f"cannot dequantize (supported types: {_SUPPORTED_TYPE_NAMES})"
        )


def dequantize_tensor(tensor: Any, path: str | os.PathLike = "<gguf>") -> np.ndarray:
    """Expand one ``gguf.ReaderTensor`` to a float32 array in numpy (row-major) shape.

    The result owns its memory (it never aliases the file mapping).  Unsupported types
    raise ModelLoadError naming ``path``, the tensor and its type.
    """
    path = Path(path)
    _check_type(tensor, path)
    shape = tuple(int(d) for d in reversed(np.asarray(tensor.shape).tolist()))
    try:
        arr = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        arr = np.asarray(arr, dtype=np.float32).reshape(shape)
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: cannot dequantize tensor {tensor.name!r} ({_type_name(tensor.tensor_type)}): {exc}"
        ) from exc
    if np.may_share_memory(arr, tensor.data) or not arr.flags.c_contiguous:
        arr = np.array(arr, dtype=np.float32, order="C", copy=True)
    return arr


def _rope_rows(rows: int, n_head: int) -> np.ndarray:
    """The row order that inverts llama.cpp's per-head reordering of rotary rows (interleaved -> half split):
    Hugging Face row r is the file's row order[r]."""
    half = rows // n_head // 2
    return np.arange(rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(rows)


def _drop_pages(reader: GGUFReader, t: Any) -> None:
    """Take tensor t's pages of the file mapping out of this process's resident memory once its data is copied: the
    mapping stays valid (a later read faults them back in from the page cache), but a loading or loaded model no
    longer counts the file it came from in its RSS (the whole file by the end of a load, otherwise, for as long as
    the reader lives)."""
    mapping = getattr(reader.data, "_mmap", None)  # np.memmap's mmap.mmap
    if mapping is None:
        return
    # the kernel maps up to 64 KiB around a faulting page ("fault-around"): reading this tensor may have mapped a
    # neighbour's pages again, which dropping them here too takes back out (a page not yet read refaults as usual)
    margin = 64 << 10
    start = max(0, t.data_offset - margin) // mmap.PAGESIZE * mmap.PAGESIZE
    mapping.madvise(mmap.MADV_DONTNEED, start, min(len(mapping), t.data_offset + t.n_bytes + margin) - start)


def _group_loader(reader: GGUFReader, t: Any, path: Path, shape: tuple[int, ...], order: np.ndarray | None):
    """A function reading tensor `t` [N, K] as its group form (rows in Hugging Face order), checking it first."""
    qtype = t.tensor_type

    def load():
        N, K = shape if len(shape) == 2 else (1, shape[0])
        if K % block_weights(qtype):
            raise ModelLoadError(f"{path}: tensor {t.name!r} ({qtype.name}) has rows of {K} weights, not a whole "
                                 f"number of {block_weights(qtype)}-weight blocks")
        gw = decode(t.data, qtype, N, K)  # copies
        _drop_pages(reader, t)
        for what, v in (("scales", gw.scales), ("offsets", gw.offsets)):
            if v is not None and not torch.isfinite(v).all():
                bad = int((~torch.isfinite(v)).sum())
                raise ModelLoadError(f"{path}: tensor {t.name!r} ({qtype.name}) has {bad} NaN or infinite block "
                                     f"{what}")
        return gw if order is None else gw.rows(torch.from_numpy(order))

    return load


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, TensorRef], GGUFReader]:
    """Return (Hugging Face style config dict, {Hugging Face tensor name: TensorRef}, the reader).

    Names and types of all tensors are checked here, before any data is read. Each TensorRef's `load` dequantizes
    its tensor to float32, and for block types with an exact group form its `groups` reads the blocks as they are
    (q/k rows back in Hugging Face order either way). Shapes are checked by the loader.
    """
    path = Path(path)
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    arch = reader.fields["general.architecture"].contents()
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    permute = arch in _PERMUTED_ARCHITECTURES

    def loader(t, order: np.ndarray | None):
        def load() -> torch.Tensor:
            arr = dequantize_tensor(t, path)  # a copy
            _drop_pages(reader, t)
            return torch.from_numpy(arr if order is None else np.ascontiguousarray(arr[order]))

        return load

    refs: dict[str, TensorRef] = {}
    for t in reader.tensors:
        name = hf_tensor_name(t.name, arch)
        if name is None:
            raise ModelLoadError(f"{path}: unknown tensor {t.name!r} for architecture {arch!r}")
        _check_type(t, path)
        shape = tuple(int(d) for d in reversed(np.asarray(t.shape).tolist()))
        n_head = heads.get(name.split(".")[-2]) if permute and ".self_attn." in name else None
        order = _rope_rows(shape[0], n_head) if n_head is not None else None
        native = t.tensor_type in NATIVE_BITS
        refs[name] = TensorRef(path, shape, loader(t, order), kind=_type_name(t.tensor_type), name=t.name,
                               groups=_group_loader(reader, t, path, shape, order) if native else None)
    return config, refs, reader
