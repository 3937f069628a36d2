"""Tokenizers for tinychat: one facade over three vocabulary sources.

* a Hugging Face model directory with ``tokenizer.json`` (run by the Rust ``tokenizers`` library),
* a Hugging Face model directory with only ``tokenizer.model`` (run by ``sentencepiece``),
* the ``tokenizer.ggml.*`` metadata of a GGUF file (rebuilt as a ``tokenizers`` object:
  byte-level BPE for ``gpt2`` vocabularies, sentencepiece-style BPE with byte fallback for ``llama`` ones).

On top of that: chat templates (jinja2, rendered the way transformers renders them), the set of token ids
that end a generation, and :class:`StreamDecoder`, an incremental detokenizer for streaming output.

This module does not import transformers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinychat.errors import ModelLoadError, TinychatError

if TYPE_CHECKING:  # pragma: no cover
    import gguf

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "FALLBACK_TEMPLATE_NAME",
    "StreamDecoder",
    "Tokenizer",
]

# ---------------------------------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------------------------------

#: Name of the chat template used when a model ships none.
FALLBACK_TEMPLATE_NAME = "chatml"

#: The ChatML template used when a model ships none.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

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

# GGUF token types (llama.cpp's llama_token_type).
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6

_SPIECE_SPACE = "\u2581"  # '▁', sentencepiece's visible space
_REPLACEMENT_CHAR = "\ufffd"

# Pre-tokenizer split regexes for byte-level BPE vocabularies, keyed by GGUF's ``tokenizer.ggml.pre``. These are the
# patterns the respective models' tokenizer.json files use (the same table transformers uses for GGUF files).
_SPLIT_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_PRE_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx",
         "smaug-bpe", "jina-v5-nano"),
        _SPLIT_LLAMA3,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _SPLIT_QWEN2),
    "qwen35": _SPLIT_QWEN35,
    "tekken": _SPLIT_TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _SPLIT_GPT4O),
}
# ``pre`` values that use GPT-2's own pattern (ByteLevel with use_regex=True). Values in neither table get it too.
_GGUF_PRE_GPT2 = frozenset({"default", "gpt2", "gpt-2", "smollm"})


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character mapping used by byte-level BPE vocabularies."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    mapping: dict[int, str] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or a ``{"content": ...}`` dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return None


def _read_json(path: Path) -> dict | None:
    """A JSON object file, None when absent; ModelLoadError naming the file when unreadable."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot read JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------------


class _HFBackend:
    """A ``tokenizers.Tokenizer``: encode/decode, added and special tokens all handled in Rust."""

    kind = "tokenizers"

    def __init__(self, tok) -> None:
        self.tok = tok
        decoder = tok.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, added in decoder.items() if added.special)
        self.added_ids = frozenset(decoder)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)


class _SentencePieceBackend:
    """A ``sentencepiece`` model, plus the special-token handling sentencepiece itself does not do.

    Special tokens written in the text (control pieces such as ``<s>``, the unknown piece, user-defined pieces and
    tokens the tokenizer_config adds) are split out first; each stretch of plain text between them is encoded by
    sentencepiece on its own, so it gets the dummy-prefix space the way llama.cpp does.
    Decoding is done here from the pieces (``▁`` -> space, ``<0xNN>`` pieces -> bytes, UTF-8 decoded once), so
    special tokens can be kept in the text and a multi-byte character split over byte pieces decodes whole.
    """

    kind = "sentencepiece"

    def __init__(self, sp, extra_tokens: Mapping[str, int], extra_special: set[str], add_bos: bool,
                 add_eos: bool, user_defined: Sequence[str] = ()) -> None:
        self.sp = sp
        n = sp.get_piece_size()
        self.n_pieces = n
        self.pieces = [sp.id_to_piece(i) for i in range(n)]
        self.byte_values: dict[int, int] = {}
        special: dict[str, int] = {}
        for i in range(n):
            if sp.is_byte(i):
                self.byte_values[i] = int(self.pieces[i][3:5], 16)
            elif sp.is_control(i) or sp.is_unknown(i):
                if self.pieces[i]:
                    special[self.pieces[i]] = i
        self.piece_ids = {p: i for i, p in enumerate(self.pieces)}
        self.extra_tokens = dict(extra_tokens)  # content -> id, ids may be beyond the sentencepiece vocabulary
        self.extra_by_id = {i: s for s, i in self.extra_tokens.items()}
        split_tokens = dict(special)
        for piece in user_defined:  # matched whole, and the text after one starts a new stretch (as in llama.cpp)
            if piece in self.piece_ids:
                split_tokens[piece] = self.piece_ids[piece]
        for content, token_id in self.extra_tokens.items():
            split_tokens[content] = token_id
        for content in extra_special:
            token_id = self.token_to_id(content)
            if token_id is not None:
                split_tokens[content] = token_id
        self.split_tokens = split_tokens
        self.special_ids = frozenset(special.values()) | frozenset(
            self.token_to_id(s) for s in extra_special if self.token_to_id(s) is not None
        )
        self.added_ids = frozenset(split_tokens.values())
        self.vocab_size = max([n] + [i + 1 for i in self.extra_by_id])
        self.split_re = (
            re.compile("|".join(re.escape(s) for s in sorted(split_tokens, key=len, reverse=True)))
            if split_tokens
            else None
        )
        self.add_bos = add_bos and sp.bos_id() >= 0
        self.add_eos = add_eos and sp.eos_id() >= 0
        # Whether the model prepends a space (add_dummy_prefix): then decoding drops the first leading space.
        surface = self._surface_bytes(sp.encode("a")).decode("utf-8", "replace")
        self.dummy_prefix = surface.startswith(" ")

    def _surface_bytes(self, ids: Sequence[int]) -> bytes:
        out = bytearray()
        for i in ids:
            if i in self.byte_values:
                out.append(self.byte_values[i])
            else:
                out += self.pieces[i].replace(_SPIECE_SPACE, " ").encode("utf-8")
        return bytes(out)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        if add_special_tokens and self.add_bos:
            ids.append(self.sp.bos_id())
        pos = 0
        if self.split_re is not None:
            for match in self.split_re.finditer(text):
                if match.start() > pos:
                    ids.extend(self.sp.encode(text[pos:match.start()]))
                ids.append(self.split_tokens[match.group()])
                pos = match.end()
        if pos < len(text):
            ids.extend(self.sp.encode(text[pos:]))
        if add_special_tokens and self.add_eos:
            ids.append(self.sp.eos_id())
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out = bytearray()
        for i in ids:
            if i in self.special_ids:
                if not skip_special_tokens:
                    out += self.id_to_token(i).encode("utf-8")
            elif i in self.byte_values:
                out.append(self.byte_values[i])
            elif 0 <= i < self.n_pieces:
                out += self.pieces[i].replace(_SPIECE_SPACE, " ").encode("utf-8")
            elif i in self.extra_by_id:
                out += self.extra_by_id[i].encode("utf-8")
            # ids outside the vocabulary decode to nothing
        text = out.decode("utf-8", "replace")
        if self.dummy_prefix and text.startswith(" "):
            text = text[1:]
        return text

    def token_to_id(self, token: str) -> int | None:
        if token in self.extra_tokens:
            return self.extra_tokens[token]
        return self.piece_ids.get(token)

    def id_to_token(self, token_id: int) -> str | None:
        if token_id in self.extra_by_id:
            return self.extra_by_id[token_id]
        if 0 <= token_id < self.n_pieces:
            return self.pieces[token_id]
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Rebuild template inputs from plain JSON-like types, so the sandbox only ever sees harmless objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return _plain(item())
        except Exception:  # noqa: BLE001 - anything odd becomes a placeholder below
            pass
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@lru_cache(maxsize=1)
def _jinja_env():
    import jinja2
    import jinja2.ext
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class _Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class _Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # same signature trick as jinja2's Namespace
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env


@lru_cache(maxsize=16)
def _compile_template(source: str):
    import jinja2

    try:
        return _jinja_env().from_string(source)
    except jinja2.TemplateError as exc:
        raise TinychatError(f"chat template does not compile: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------------------
# The facade
# ---------------------------------------------------------------------------------------------------------------------


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

        stop = set(extra_eos)
        if eos_token_id is not None:
            stop.add(eos_token_id)
        template = self.chat_template or FALLBACK_CHAT_TEMPLATE
        for token in END_OF_TURN_TOKENS:
            token_id = backend.token_to_id(token)
            if token_id is None or backend.id_to_token(token_id) != token:
                continue
            if token_id in backend.special_ids or token in template:
                stop.add(token_id)
        self.stop_token_ids = frozenset(stop)

    # -- basic encode / decode -------------------------------------------------------------------------------------

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that ``decode(..., skip_special_tokens=True)`` leaves out."""
        return self._backend.special_ids

    @property
    def backend_kind(self) -> str:
        """``"tokenizers"`` or ``"sentencepiece"``: the library that does the work."""
        return self._backend.kind

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text are parsed as special tokens; with
        ``add_special_tokens`` the model's BOS (and EOS, for the rare models that want it) is added."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        return list(self._backend.encode(text, add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``. Incomplete UTF-8 at the ends decodes to U+FFFD."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self._backend.kind}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, add_bos={self.add_bos}, source={self.source!r})"
        )

    # -- chat ------------------------------------------------------------------------------------------------------

    @property
    def chat_template_name(self) -> str | None:
        """None when the model's own template is used, else the fallback's name (``"chatml"``)."""
        return None if self.chat_template else FALLBACK_TEMPLATE_NAME

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """Render ``messages`` with the model's chat template (or ChatML when it has none)."""
        import jinja2

        template = _compile_template(self.chat_template or FALLBACK_CHAT_TEMPLATE)
        chat = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise TinychatError(f"chat messages must be dicts, got {message!r}")
            chat.append(_alias_reasoning(_plain(message)))
        context: dict[str, Any] = {"tools": None, "documents": None}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = getattr(self, name)
            if value is not None:
                context[name] = value
        context.update(_plain(extra))
        context["messages"] = chat
        context["add_generation_prompt"] = bool(add_generation_prompt)
        try:
            return template.render(**context)
        except jinja2.TemplateError as exc:
            raise TinychatError(f"chat template failed: {exc}") from exc
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as exc:
            raise TinychatError(f"chat template failed: {type(exc).__name__}: {exc}") from exc

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render then encode; no BOS is added on top of what the template writes."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

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
        config = _read_json(directory / "tokenizer_config.json") or {}
        special_map = _read_json(directory / "special_tokens_map.json") or {}

        def named(name: str) -> str | None:
            value = _token_content(config.get(name))
            return value if value is not None else _token_content(special_map.get(name))

        tokens = {name: named(name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
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
        return cls(
            backend,
            bos_token=tokens["bos_token"],
            eos_token=tokens["eos_token"],
            unk_token=tokens["unk_token"],
            pad_token=tokens["pad_token"],
            extra_eos_ids=eos_token_ids,
            chat_template=template,
            source=str(directory),
        )

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader, path) -> Tokenizer:
        """Build the tokenizer a GGUF file describes in its ``tokenizer.ggml.*`` metadata."""
        where = str(path)

        def get(key: str, default=None):
            field = reader.fields.get(key)
            if field is None:
                return default
            try:
                return field.contents()
            except Exception as exc:  # noqa: BLE001 - malformed metadata
                raise ModelLoadError(f"{where}: cannot read GGUF metadata {key}: {exc}") from exc

        model = get("tokenizer.ggml.model")
        if model is None:
            raise ModelLoadError(f"{where}: GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
        tokens = get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError(f"{where}: GGUF file has no tokenizer.ggml.tokens")
        token_types = get("tokenizer.ggml.token_type") or []
        if token_types and len(token_types) != len(tokens):
            raise ModelLoadError(
                f"{where}: tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens"
            )

        def token_id(key: str) -> int | None:
            value = get(key)
            if value is None:
                return None
            value = int(value)
            return value if 0 <= value < len(tokens) else None

        bos_id = token_id("tokenizer.ggml.bos_token_id")
        eos_id = token_id("tokenizer.ggml.eos_token_id")
        unk_id = token_id("tokenizer.ggml.unknown_token_id")
        pad_id = token_id("tokenizer.ggml.padding_token_id")
        extra_eos = [i for i in (token_id("tokenizer.ggml.eot_token_id"), token_id("tokenizer.ggml.eom_token_id"))
                     if i is not None]
        add_eos = bool(get("tokenizer.ggml.add_eos_token", False))

        if model == "gpt2":
            add_bos = bool(get("tokenizer.ggml.add_bos_token", False))
            merges = get("tokenizer.ggml.merges")
            if not merges:
                raise ModelLoadError(f"{where}: byte-level BPE vocabulary without tokenizer.ggml.merges")
            tok = _build_byte_level_bpe(tokens, token_types, merges, get("tokenizer.ggml.pre"),
                                        (bos_id, eos_id, unk_id, pad_id), where)
        elif model == "llama":
            add_bos = bool(get("tokenizer.ggml.add_bos_token", True))
            scores = get("tokenizer.ggml.scores")
            merges = get("tokenizer.ggml.merges")
            if not scores and not merges:
                raise ModelLoadError(f"{where}: sentencepiece vocabulary without tokenizer.ggml.scores")
            if scores and len(scores) != len(tokens):
                raise ModelLoadError(f"{where}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
            tok = _build_sentencepiece_bpe(
                tokens, token_types, scores, merges, bool(get("tokenizer.ggml.add_space_prefix", True)),
                (bos_id, eos_id, unk_id, pad_id), unk_id, where,
            )
        else:
            raise ModelLoadError(
                f"{where}: unsupported GGUF tokenizer model {model!r} (supported: 'gpt2', 'llama')"
            )
        _set_post_processor(tok, tokens[bos_id] if bos_id is not None else None, bos_id, add_bos,
                            tokens[eos_id] if eos_id is not None else None, eos_id, add_eos)
        name = lambda i: tokens[i] if i is not None else None  # noqa: E731
        template = get("tokenizer.chat_template")
        return cls(
            _HFBackend(tok),
            bos_token=name(bos_id),
            eos_token=name(eos_id),
            bos_token_id=bos_id,
            eos_token_id=eos_id,
            unk_token=name(unk_id),
            pad_token=name(pad_id),
            extra_eos_ids=extra_eos,
            chat_template=template if isinstance(template, str) else None,
            source=where,
            vocab_size=len(tokens),
        )


# ---------------------------------------------------------------------------------------------------------------------
# Loader helpers
# ---------------------------------------------------------------------------------------------------------------------


def _dir_chat_template(directory: Path, config: Mapping) -> str | None:
    jinja_path = directory / "chat_template.jinja"
    if jinja_path.is_file():
        try:
            return jinja_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{jinja_path}: cannot read chat template: {exc}") from exc
    template = config.get("chat_template")
    if template is None:
        template = (_read_json(directory / "chat_template.json") or {}).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default") or next((t for t in named.values() if isinstance(t, str)), None)
    return template if isinstance(template, str) and template else None


def _set_post_processor(tok, bos: str | None, bos_id: int | None, add_bos: bool, eos: str | None,
                        eos_id: int | None, add_eos: bool) -> None:
    """Make ``encode(add_special_tokens=True)`` add BOS / EOS as asked (and nothing when neither is)."""
    from tokenizers import processors

    add_bos = add_bos and bos is not None and bos_id is not None
    add_eos = add_eos and eos is not None and eos_id is not None
    single = ("$A:0" if not add_bos else f"{bos}:0 $A:0") + (f" {eos}:0" if add_eos else "")
    pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
    special = []
    if add_bos:
        special.append((bos, bos_id))
    if add_eos and (eos, eos_id) not in special:
        special.append((eos, eos_id))
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _load_tokenizer_json(json_path: Path, config: Mapping, tokens: Mapping[str, str | None]):
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as RustTokenizer

    try:
        tok = RustTokenizer.from_file(str(json_path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception subclasses
        raise ModelLoadError(f"{json_path}: cannot load tokenizer.json: {exc}") from exc

    # Tokens tokenizer_config.json declares that tokenizer.json lacks (transformers adds them too).
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, Mapping):
        missing = []
        for entry in decoder.values():
            content = _token_content(entry)
            if content is not None and tok.token_to_id(content) is None:
                missing.append(AddedToken(content, special=bool(entry.get("special", False)),
                                          normalized=bool(entry.get("normalized", False)),
                                          lstrip=bool(entry.get("lstrip", False)),
                                          rstrip=bool(entry.get("rstrip", False))))
        if missing:
            tok.add_tokens(missing)

    # Like transformers: explicit add_bos_token / add_eos_token in the config, or no post-processor at all, means the
    # post-processor is rebuilt from those flags; otherwise the tokenizer.json post-processor decides.
    explicit = "add_bos_token" in config or "add_eos_token" in config
    if explicit or tok.post_processor is None:
        bos, eos = tokens.get("bos_token"), tokens.get("eos_token")
        _set_post_processor(
            tok, bos, tok.token_to_id(bos) if bos else None, bool(config.get("add_bos_token", False)),
            eos, tok.token_to_id(eos) if eos else None, bool(config.get("add_eos_token", False)),
        )
    return tok


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _protobuf_fields(buf: bytes):
    """(field number, value) of each field of a serialized protobuf message (ints for varints, bytes otherwise)."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _sentencepiece_user_defined(model_bytes: bytes) -> list[str]:
    """The USER_DEFINED pieces of a sentencepiece ModelProto (the Python API does not expose piece types).

    ModelProto.pieces is field 1; in each SentencePiece, field 1 is the piece and field 3 its type (4 = USER_DEFINED).
    """
    found = []
    try:
        for number, value in _protobuf_fields(model_bytes):
            if number != 1 or not isinstance(value, bytes):
                continue
            piece, piece_type = None, 1
            for sub_number, sub_value in _protobuf_fields(value):
                if sub_number == 1 and isinstance(sub_value, bytes):
                    piece = sub_value.decode("utf-8", "replace")
                elif sub_number == 3 and isinstance(sub_value, int):
                    piece_type = sub_value
            if piece and piece_type == 4:
                found.append(piece)
    except (IndexError, ValueError):
        return []
    return found


def _load_sentencepiece_dir(model_path: Path, directory: Path, config: Mapping,
                            tokens: Mapping[str, str | None]) -> _SentencePieceBackend:
    try:
        import sentencepiece
    except ImportError as exc:  # pragma: no cover - dependency is declared
        raise ModelLoadError(f"{model_path}: the sentencepiece package is needed to read it") from exc
    try:
        model_bytes = model_path.read_bytes()
        sp = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
    except Exception as exc:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError
        raise ModelLoadError(f"{model_path}: cannot load sentencepiece model: {exc}") from exc

    extra: dict[str, int] = {}
    extra_special: set[str] = set()
    added_json = _read_json(directory / "added_tokens.json") or {}
    for content, token_id in added_json.items():
        if isinstance(token_id, int):
            extra[content] = token_id
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, Mapping):
        for key, entry in decoder.items():
            content = _token_content(entry)
            try:
                token_id = int(key)
            except (TypeError, ValueError):
                continue
            if content is None:
                continue
            if token_id >= sp.get_piece_size() or sp.id_to_piece(token_id) != content:
                extra[content] = token_id
            if isinstance(entry, Mapping) and entry.get("special", False):
                extra_special.add(content)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if tokens.get(name):
            extra_special.add(tokens[name])
    add_bos = bool(config.get("add_bos_token", True))
    add_eos = bool(config.get("add_eos_token", False))
    user_defined = _sentencepiece_user_defined(model_bytes)
    return _SentencePieceBackend(sp, extra, extra_special, add_bos, add_eos, user_defined)


def _build_byte_level_bpe(tokens: list[str], token_types: list[int], merges: list[str], pre: str | None,
                          named_ids: tuple[int | None, ...], where: str = "<gguf>"):
    """A GGUF ``gpt2`` vocabulary as a byte-level BPE ``tokenizers`` object."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RustTokenizer

    spelling = _byte_alphabet()
    alphabet = frozenset(spelling.values())
    # Tokens spelled outside the byte alphabet (some converters store specials raw) are respelled byte by byte.
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if not alphabet.issuperset(token):
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab[token] = index
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            continue
        pairs.append((left, right))
    try:
        tok = RustTokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                                       end_of_word_suffix="", fuse_unk=False))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{where}: cannot build the byte-level BPE vocabulary: {exc}") from exc

    split = _GGUF_PRE_SPLITS.get(pre or "")
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()

    # Control tokens become special tokens, user-defined ones plain added tokens, so either is matched whole.
    # A "control" token spelled outside the byte alphabet is a converter mislabel and is left alone.
    special = []
    named = {i for i in named_ids if i is not None}
    special_indices = {i for i, t in enumerate(token_types) if t == _TT_CONTROL} | named
    for index in sorted(special_indices):
        token = tokens[index]
        if alphabet.issuperset(token):
            special.append(AddedToken(token, special=True, normalized=False))
    if special:
        tok.add_special_tokens(special)
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(token_types) if t == _TT_USER_DEFINED and alphabet.issuperset(tokens[i])]
    if user:
        tok.add_tokens(user)
    return tok


def _sentencepiece_merges(tokens: list[str], token_types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to sentencepiece's score-ordered merging.

    sentencepiece merges, at each step, the adjacent pair whose concatenation is a (normal or user-defined) piece
    with the highest score. Ranking every split of every such piece by the piece's score reproduces that.
    """
    mergeable = (_TT_NORMAL, _TT_USER_DEFINED)
    vocab = {}
    for index, token in enumerate(tokens):
        if not token_types or token_types[index] in mergeable:
            vocab.setdefault(token, index)
    ranked = []
    for token, index in vocab.items():
        if len(token) < 2:
            continue
        score = scores[index]
        for cut in range(1, len(token)):
            left = token[:cut]
            right = token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, index, -cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _build_sentencepiece_bpe(tokens: list[str], token_types: list[int], scores: list[float] | None,
                             merges: list[str] | None, add_space_prefix: bool,
                             named_ids: tuple[int | None, ...], unk_id: int | None, where: str = "<gguf>"):
    """A GGUF ``llama`` (sentencepiece BPE) vocabulary as a ``tokenizers`` BPE with byte fallback.

    Like sentencepiece (and llama.cpp): spaces become ``▁``, every stretch of text between special tokens gets a
    leading ``▁`` when ``add_space_prefix``, characters outside the vocabulary fall back to ``<0xNN>`` byte pieces,
    and decoding drops the one leading space the prefix added.
    """
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as RustTokenizer

    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges if " " in m]
    else:
        pairs = _sentencepiece_merges(tokens, token_types, scores)
    unk = tokens[unk_id] if unk_id is not None else None
    has_bytes = any(t == _TT_BYTE for t in token_types) or "<0x00>" in vocab
    try:
        tok = RustTokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=unk, fuse_unk=True,
                                       byte_fallback=has_bytes))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{where}: cannot build the sentencepiece vocabulary: {exc}") from exc

    steps = []
    if add_space_prefix:
        steps.append(normalizers.Prepend(_SPIECE_SPACE))
    steps.append(normalizers.Replace(" ", _SPIECE_SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    dec = [decoders.Replace(_SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)

    named = {i for i in named_ids if i is not None}
    special_indices = sorted({i for i, t in enumerate(token_types) if t in (_TT_CONTROL, _TT_UNKNOWN)} | named)
    special = [AddedToken(tokens[i], special=True, normalized=False) for i in special_indices if tokens[i]]
    if special:
        tok.add_special_tokens(special)
    # User-defined pieces are matched whole, like special tokens; as in llama.cpp, the text after one starts a new
    # stretch (sentencepiece itself would not give that stretch a prefix space).
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(token_types) if t == _TT_USER_DEFINED and tokens[i]]
    if user:
        tok.add_tokens(user)
    return tok


# ---------------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------------


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

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
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
        """Whatever is still held back (e.g. an incomplete character at the very end), then reset."""
        out = ""
        if self._read < len(self._ids):
            new_text = self._decode(self._ids)
            out = new_text[len(self._prefix_text):]
        self.reset()
        return out

    def reset(self) -> None:
        self._ids = []
        self._read = 0
        self._prefix_text = ""
