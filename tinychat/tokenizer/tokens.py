"""What the tokenizer modules share: the special-token names they look for, sentencepiece's visible space, and the
reading of the tokenizer files of a Hugging Face model directory (special tokens as tokenizer_config.json writes them,
JSON files that may be missing)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tinychat.files import read_json

#: Tokens that end a turn in the chat formats we know of. One of them is a stop token when the vocabulary holds it as a
#: single token and it is either a special token or written by the chat template.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
    "<|endoftext|>",
    "<|end_of_turn|>",
    "<|END_OF_TURN_TOKEN|>",
    "<|return|>",
    "<|call|>",
)

#: The named special tokens: tokenizer_config.json keys, Tokenizer attributes and chat template variables alike.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")

SPIECE_SPACE = "\u2581"  # '▁', sentencepiece's visible space


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or a ``{"content": ...}`` dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return None


def _optional_json(path: Path) -> dict:
    """The JSON object in ``path``, ``{}`` when there is no such file."""
    return read_json(path) if path.is_file() else {}
