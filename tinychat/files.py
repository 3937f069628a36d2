"""Reading files with one clear error naming the file: text a user gives, JSON and GGUF metadata of a model.

Below everything that reads a model or its vocabulary (tinychat/io/, tinychat/tokenizer/), so that both can.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tinychat.errors import ModelLoadError, TinychatError

MISSING = object()  # `gguf_field`'s default: the key is required


def read_text(path: Path, what: str = "the file") -> str:
    """The UTF-8 text of `path`; TinychatError naming the file when it is missing or unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TinychatError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TinychatError(f"{path}: cannot read {what}: {e}") from None


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; ModelLoadError naming the file when it is missing, unreadable or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the file ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def gguf_field(reader, key: str, path: str | os.PathLike, default: Any = MISSING) -> Any:
    """The value of metadata ``key`` of a `gguf.GGUFReader`; ``default`` when it is absent (ModelLoadError when no
    default is given).

    A value that cannot be decoded is a ModelLoadError naming ``path`` and the key.
    """
    entry = reader.fields.get(key)
    if entry is None:
        if default is MISSING:
            raise ModelLoadError(f"{path}: the GGUF metadata lacks the required key {key!r}")
        return default
    try:
        return entry.contents()
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot decode GGUF metadata key {key!r}: {exc}") from exc
