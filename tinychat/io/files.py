"""Reading user-given text files with one clear error naming the file."""

from __future__ import annotations

from pathlib import Path

from tinychat.errors import TinychatError


def read_text(path: Path, what: str = "the file") -> str:
    """The UTF-8 text of `path`; TinychatError naming the file when it is missing or unreadable."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TinychatError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TinychatError(f"{path}: cannot read {what}: {e}") from None
