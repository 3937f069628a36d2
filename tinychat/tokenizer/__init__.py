"""Tokenizers for tinychat: one facade over three vocabulary sources.

* a Hugging Face model directory with ``tokenizer.json`` (run by the Rust ``tokenizers`` library),
* a Hugging Face model directory with only ``tokenizer.model`` (run by ``sentencepiece``),
* the ``tokenizer.ggml.*`` metadata of a GGUF file (rebuilt as a ``tokenizers`` object by
  :mod:`tinychat.tokenizer.gguf_vocab`).

On top of that: chat templates (jinja2, rendered the way transformers renders them), the set of token ids
that end a generation, and :class:`StreamDecoder`, an incremental detokenizer for streaming output.

This module holds the facade, :class:`Tokenizer`; the package's modules hold the rest, each importing only the ones
listed before it:

* :mod:`~tinychat.tokenizer.tokens`: the special-token names and helpers the others share;
* :mod:`~tinychat.tokenizer.templates`: chat templates;
* :mod:`~tinychat.tokenizer.backends`: the ``tokenizers`` and ``sentencepiece`` backends and their loaders;
* :mod:`~tinychat.tokenizer.gguf_vocab`: a GGUF vocabulary rebuilt as a ``tokenizers`` object;
* :mod:`~tinychat.tokenizer.stream`: :class:`StreamDecoder`.

This package does not import transformers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinychat.errors import ModelLoadError, TinychatError
from tinychat.tokenizer.backends import _HFBackend, _load_sentencepiece_dir, _load_tokenizer_json, _SentencePieceBackend
from tinychat.tokenizer.gguf_vocab import build_gguf_tokenizer
from tinychat.tokenizer.stream import StreamDecoder
from tinychat.tokenizer.templates import (
    BUILTIN_TEMPLATES,
    _alias_reasoning,
    _compile_template,
    _dir_chat_template,
    _plain,
    builtin_template,
)
from tinychat.tokenizer.tokens import END_OF_TURN_TOKENS, NAMED_TOKENS, _optional_json, _token_content

if TYPE_CHECKING:  # pragma: no cover
    import gguf

__all__ = [
    "BUILTIN_TEMPLATES",
    "StreamDecoder",
    "Tokenizer",
]


# Placeholders for message text while a template renders (private-use characters no template writes).
_PLACEHOLDER_OPEN, _PLACEHOLDER_CLOSE = "\ue000", "\ue001"
_PLACEHOLDER_RE = re.compile(f"{_PLACEHOLDER_OPEN}(\\d+){_PLACEHOLDER_CLOSE}")


def _map_message_texts(message: Mapping, fn) -> dict:
    """A copy of a chat message with fn applied to its text: a string content, or the text of each content part."""
    out = dict(message)
    content = out.get("content")
    if isinstance(content, str):
        out["content"] = fn(content)
    elif isinstance(content, list):
        out["content"] = [dict(p, text=fn(p["text"])) if isinstance(p, Mapping) and "text" in p else p
                          for p in content]
    return out


class Tokenizer:
    """Encode, decode and chat-format text for one model.

    Build it with :meth:`from_dir` (a Hugging Face model directory) or :meth:`from_gguf` (a GGUF file's metadata).
    """

    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos: bool
    chat_template: str | None
    stop_token_ids: frozenset[int]

    def __init__(
        self,
        backend: _HFBackend | _SentencePieceBackend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        extra_eos_ids: Sequence[int] = (),
        unk_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        source: str = "",
        vocab_size: int | None = None,
    ) -> None:
        self._backend = backend
        self.source = source
        self.vocab_size = max(backend.vocab_size, vocab_size or 0)

        if bos_token_id is None and bos_token is not None:
            bos_token_id = backend.token_to_id(bos_token)
        if bos_token is None and bos_token_id is not None:
            bos_token = backend.id_to_token(bos_token_id)
        if eos_token_id is None and eos_token is not None:
            eos_token_id = backend.token_to_id(eos_token)
        extra_eos = [int(i) for i in extra_eos_ids]
        if eos_token_id is None and extra_eos:
            eos_token_id = extra_eos[0]
        if eos_token is None and eos_token_id is not None:
            eos_token = backend.id_to_token(eos_token_id)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.unk_token = unk_token
        self.pad_token = pad_token
        self.chat_template = chat_template or None

        # add_bos: does encode(add_special_tokens=True) start with BOS? Ask the backend rather than guess.
        self.add_bos = False
        if bos_token_id is not None:
            with_special = backend.encode("a", True)
            without = backend.encode("a", False)
            self.add_bos = len(with_special) > len(without) and with_special[0] == bos_token_id

        def holds(token: str) -> bool:
            token_id = backend.token_to_id(token)
            return token_id is not None and backend.id_to_token(token_id) == token

        # The template used when the model's own is not there (also after chat_template is set to None).
        self._builtin_template = builtin_template(holds)

        # Stop ids: EOS, the extra ones, the end-of-turn tokens the vocabulary holds that are special or written by the
        # model's own template, and the built-in template's end-of-turn token when that template is used.
        stop = set(extra_eos)
        if eos_token_id is not None:
            stop.add(eos_token_id)
        turn_ends = [t for t in END_OF_TURN_TOKENS
                     if backend.token_to_id(t) in backend.special_ids or t in (self.chat_template or "")]
        if not self.chat_template:
            turn_ends.append(self._builtin_template.end_of_turn)
        stop.update(backend.token_to_id(t) for t in turn_ends if holds(t))
        self.stop_token_ids = frozenset(stop)

    # -- basic encode / decode -------------------------------------------------------------------------------------

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that ``decode(..., skip_special_tokens=True)`` leaves out."""
        return self._backend.special_ids

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text are parsed as special tokens (with
        ``parse_special=False``, as the plain text they are written with); with ``add_special_tokens`` the model's
        BOS (and EOS, for the rare models that want it) is added."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        return list(self._backend.encode(text, add_special_tokens, parse_special))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Incomplete UTF-8 at the ends decodes to U+FFFD; an id the vocabulary lacks is an error."""
        ids = [int(i) for i in ids]
        for token_id in ids:
            if self._backend.id_to_token(token_id) is None:
                raise TinychatError(
                    f"cannot decode token id {token_id}: not in the vocabulary ({self.vocab_size} tokens)"
                )
        return self._backend.decode(ids, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self._backend.kind}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, add_bos={self.add_bos}, source={self.source!r})"
        )

    # -- chat ------------------------------------------------------------------------------------------------------

    @property
    def chat_template_name(self) -> str | None:
        """None when the model's own template is used, else the name of the built-in one used in its place:
        ``"gemma"`` when the vocabulary holds ``<start_of_turn>`` and ``<end_of_turn>``, else ``"chatml"``
        (:data:`~tinychat.tokenizer.templates.BUILTIN_TEMPLATES`)."""
        return None if self.chat_template else self._builtin_template.name

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, **extra) -> str:
        """Render ``messages`` with the model's chat template (or, when it has none, the built-in template its
        vocabulary calls for: :attr:`chat_template_name`).

        Anything that goes wrong while rendering (``raise_exception`` in the template, a sandbox limit, a runaway
        recursion) is a TinychatError.
        """
        import jinja2

        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
            raise TinychatError(f"chat messages must be a list of dicts, got {type(messages).__name__}")
        for message in messages:
            if not isinstance(message, Mapping):
                raise TinychatError(f"chat messages must be dicts, got {message!r}")
        template = _compile_template(self.chat_template or self._builtin_template.source)
        context: dict[str, Any] = {"tools": None, "documents": None}
        context.update({name: getattr(self, name) for name in NAMED_TOKENS if getattr(self, name) is not None})
        context.update(_plain(extra))
        context["messages"] = [_alias_reasoning(message) for message in _plain(list(messages))]
        context["add_generation_prompt"] = bool(add_generation_prompt)
        try:
            return template.render(**context)
        except jinja2.TemplateError as exc:
            raise TinychatError(f"chat template failed: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - e.g. OverflowError (sandbox range limit), RecursionError, TypeError
            raise TinychatError(f"chat template failed: {type(exc).__name__}: {exc}") from exc

    def encode_chat(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> list[int]:
        """Render then encode; no BOS is added on top of what the template writes. The template's own markers are
        special tokens; special-token text inside a message (a user typing "<|im_end|><|im_start|>system") stays
        the plain text it is: such messages are rendered as placeholders and encoded apart."""
        specials = [t for i in self._backend.special_ids if (t := self._backend.id_to_token(i))]
        texts: list[str] = []  # the message texts that hold special-token text, by placeholder number

        def guard(text):
            if not isinstance(text, str) or not any(t in text for t in specials):
                return text
            texts.append(text)
            return f"{_PLACEHOLDER_OPEN}{len(texts) - 1}{_PLACEHOLDER_CLOSE}"

        guarded = [_map_message_texts(m, guard) if isinstance(m, Mapping) else m for m in messages]
        rendered = self.apply_chat_template(guarded, add_generation_prompt)
        if not texts:
            return self.encode(rendered, add_special_tokens=False)
        pieces = _PLACEHOLDER_RE.split(rendered)  # template text, placeholder number, template text, ...
        numbers = [int(n) for n in pieces[1::2]]
        if sorted(numbers) != list(range(len(texts))):
            raise TinychatError("the chat template copies or alters message text, so a message holding "
                                "special-token text cannot be encoded as plain text with it")
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                ids += self.encode(piece, add_special_tokens=False) if piece else []
            else:
                ids += self.encode(texts[int(piece)], add_special_tokens=False, parse_special=False)
        return ids

    # -- saving ------------------------------------------------------------------------------------------------------

    def save_pretrained(self, out_dir) -> None:
        """Write this tokenizer into the directory ``out_dir`` (created if needed) the way a Hugging Face model
        directory holds it, so that :meth:`from_dir` and transformers' ``AutoTokenizer`` both load it.

        * ``tokenizer.json``: the Rust tokenizer (a ``tokenizer.json`` or GGUF vocabulary), added tokens included;
          or ``tokenizer.model``: the sentencepiece model, its extra added tokens in ``added_tokens_decoder``;
        * ``tokenizer_config.json``: the named special tokens, ``add_bos_token`` / ``add_eos_token`` (what
          ``encode(add_special_tokens=True)`` adds) and the chat template.

        End-of-turn ids from generation_config.json are not the tokenizer's to write (save them there).
        """
        directory = Path(out_dir)
        backend = self._backend
        plain, with_special = self.encode("a", False), self.encode("a", True)
        add_eos = (self.eos_token_id is not None and len(with_special) > len(plain)
                   and with_special[-1] == self.eos_token_id)
        config: dict[str, Any] = {}
        if isinstance(backend, _HFBackend):
            config["tokenizer_class"] = "PreTrainedTokenizerFast"  # tokenizer.json as it is
        else:
            config["tokenizer_class"] = "LlamaTokenizer"  # the sentencepiece models tinychat reads are Llama-style
            config["added_tokens_decoder"] = {
                str(token_id): {"content": content, "special": token_id in backend.special_ids, "normalized": False,
                                "lstrip": False, "rstrip": False, "single_word": False}
                for token_id, content in sorted(backend.extra_by_id.items())
            }
        config.update({name: getattr(self, name) for name in NAMED_TOKENS if getattr(self, name) is not None})
        config["add_bos_token"] = self.add_bos
        config["add_eos_token"] = add_eos
        if self.chat_template:
            config["chat_template"] = self.chat_template
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if isinstance(backend, _HFBackend):
                backend.tok.save(str(directory / "tokenizer.json"))
            else:
                (directory / "tokenizer.model").write_bytes(backend.sp.serialized_model_proto())
            (directory / "tokenizer_config.json").write_text(
                json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        except OSError as exc:
            raise TinychatError(f"{directory}: cannot write the tokenizer: {exc}") from exc

    # -- loading -----------------------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        """Load the tokenizer of a Hugging Face model directory.

        ``tokenizer.json`` is preferred, else ``tokenizer.model``. ``eos_token_ids`` are further end-of-sequence ids,
        typically from generation_config.json; they join ``stop_token_ids``.
        """
        directory = Path(path)
        if not directory.is_dir():
            raise ModelLoadError(f"{directory}: not a directory")
        config = _optional_json(directory / "tokenizer_config.json")
        special_map = _optional_json(directory / "special_tokens_map.json")

        def named(name: str) -> str | None:
            value = _token_content(config.get(name))
            return value if value is not None else _token_content(special_map.get(name))

        tokens = {name: named(name) for name in NAMED_TOKENS}
        template = _dir_chat_template(directory, config)

        json_path = directory / "tokenizer.json"
        model_path = directory / "tokenizer.model"
        if json_path.is_file():
            backend = _HFBackend(_load_tokenizer_json(json_path, config, tokens))
        elif model_path.is_file():
            backend = _load_sentencepiece_dir(model_path, directory, config, tokens)
        else:
            raise ModelLoadError(
                f"{directory}: no tokenizer found (looked for tokenizer.json and tokenizer.model)"
            )
        return cls(backend, **tokens, extra_eos_ids=eos_token_ids, chat_template=template, source=str(directory))

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader, path) -> Tokenizer:
        """Build the tokenizer a GGUF file describes in its ``tokenizer.ggml.*`` metadata."""
        tok, settings = build_gguf_tokenizer(reader, path)
        return cls(_HFBackend(tok), **settings)
