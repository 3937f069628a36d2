"""Hugging Face model directories: config.json + safetensors (single or sharded), and hub ids."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from tinychat.errors import ModelLoadError
from tinychat.files import read_json


@dataclass(frozen=True)
class TensorRef:
    """A checkpoint tensor known by its file and shape, read only when `load()` is called.

    A GGUF tensor also says its block type (`kind`, e.g. "Q4_1") and name in the file; `groups`, where its block
    type has an exact group form (tinychat/io/gguf_blocks.py), reads it as that form instead of dequantizing it.
    """

    file: Path
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    kind: str | None = None
    name: str | None = None
    groups: Callable[[], Any] | None = None  # -> tinychat.io.gguf_blocks.GroupWeights


def read_hf_dir(path: Path) -> tuple[dict, dict[str, TensorRef]]:
    """Return (config.json dict, {tensor name: TensorRef}); no tensor data is read yet."""
    config = read_json(path / "config.json")
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: no 'weight_map' object")
        root = path.resolve()
        for f in set(weight_map.values()):  # shard names are files of this directory, nothing else
            if not isinstance(f, str) or not f or os.path.isabs(f) or not (root / f).resolve().is_relative_to(root):
                raise ModelLoadError(f"{index}: shard {f!r} is not a file inside {path}")
        files = sorted({path / f for f in weight_map.values()})
    elif (path / "model.safetensors").exists():
        files = [path / "model.safetensors"]
    else:
        found = sorted(p.name for p in path.glob("*.bin")) or sorted(p.name for p in path.iterdir())
        raise ModelLoadError(
            f"{path}: no model.safetensors or model.safetensors.index.json (found: {', '.join(found) or 'nothing'}); "
            "only safetensors weights are supported"
        )
    tensors: dict[str, TensorRef] = {}
    for file in files:
        tensors.update(_safetensors_refs(file))
    return config, tensors


def _safetensors_refs(file: Path) -> dict[str, TensorRef]:
    if not file.exists():
        raise ModelLoadError(f"{file}: file not found (listed in the safetensors index)")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{file}: not a readable safetensors file, truncated or corrupt ({e})") from None

    def loader(name: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            # the file is mapped for this read alone: a mapping kept open would keep every page read so far in this
            # process's resident memory (the whole file by the end of a load, and a streaming quantization's peak
            # RSS growing by a layer per layer); the tensor is a copy
            try:
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    return handle.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise ModelLoadError(f"{file}: cannot read tensor {name!r} ({e})") from None

        return load

    return {name: TensorRef(file, shape, loader(name)) for name, shape in shapes.items()}


def resolve_hub_id(model_id: str) -> Path:
    """Download (or find in the local cache) a model from the Hugging Face hub; needs `huggingface_hub`."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelLoadError(
            f"{model_id!r} is not a local file or directory, and loading from the hub needs "
            "`pip install huggingface_hub`"
        ) from None
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
    try:
        return Path(snapshot_download(model_id, allow_patterns=patterns))
    except Exception as e:  # the hub client raises many types: offline, 404, gated, auth
        offline = " (offline: set HF_HUB_OFFLINE=0 and check the network)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ModelLoadError(f"{model_id!r}: cannot fetch from the Hugging Face hub{offline}: {e}") from None
