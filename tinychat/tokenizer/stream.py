"""Streaming output: :class:`StreamDecoder`, an incremental detokenizer over any tokenizer that decodes id lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT_CHAR = "\ufffd"


class SupportsDecode(Protocol):
    """What :class:`StreamDecoder` needs of its tokenizer (:class:`tinychat.tokenizer.Tokenizer` has it)."""

    @property
    def special_token_ids(self) -> frozenset[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class StreamDecoder:
    """Incremental detokenizer: push token ids one at a time, get the newly completed text.

    It keeps a short window of recent ids. Each push decodes the window twice -- up to the last emitted point
    (``prefix``) and through the new token -- and returns the difference, holding it back while the text ends in
    U+FFFD (a character whose bytes have not all arrived). Decoding with the earlier tokens as context keeps
    leading-space handling right (a sentencepiece ``▁word`` continues with its space). Cost per push is
    O(window), independent of how much has been generated. ``''.join(pushes) + flush()`` equals
    ``tokenizer.decode(all_ids, skip_special_tokens=...)``.
    """

    #: After this many held-back tokens the text is emitted anyway (the bytes are invalid UTF-8, not incomplete).
    MAX_PENDING = 16

    def __init__(self, tokenizer: SupportsDecode, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skip_ids = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._ids: list[int] = []  # window: ids[:read] were emitted, ids[read:] are pending
        self._read = 0
        self._prefix_text = ""  # decode(ids[:read]), cached

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id in self._skip_ids:
            return ""  # decode() drops it entirely, so it changes nothing
        self._ids.append(token_id)
        new_text = self._decode(self._ids)
        pending = len(self._ids) - self._read
        if len(new_text) <= len(self._prefix_text):
            return ""
        if new_text.endswith(_REPLACEMENT_CHAR) and pending < self.MAX_PENDING:
            return ""
        out = new_text[len(self._prefix_text):]
        # The emitted tokens become the context of the next window.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return out

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the very end); the decoder starts over."""
        out = self._decode(self._ids)[len(self._prefix_text):] if self._read < len(self._ids) else ""
        self._ids, self._read, self._prefix_text = [], 0, ""
        return out
