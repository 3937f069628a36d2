"""Tokenizers for tinychat: one facade over three vocabulary sources.

* a Hugging Face model directory with ``tokenizer.json`` (run by the Rust ``tokenizers`` library),
* a Hugging Face model directory with only ``tokenizer.model`` (run by ``sentencepiece``),
* the ``tokenizer.ggml.*`` metadata of a GGUF file (rebuilt as a ``tokenizers`` object by
  :mod:`tinychat.io.gguf_vocab`).

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
from tinychat.io.hf import read_json

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

#: The named special tokens: tokenizer_config.json keys, Tokenizer attributes and chat template variables alike.
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")

SPIECE_SPACE = "\u2581"  # '▁', sentencepiece's visible space
_REPLACEMENT_CHAR = "\ufffd"


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or a ``{"content": ...}`` dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return None


def _added_tokens(config: Mapping) -> dict[int, Any]:
    """tokenizer_config.json's ``added_tokens_decoder`` as {id: ``tokenizers.AddedToken``}.

    An entry is a ``{"content": ..., "special": ...}`` dict or just the content; entries without a non-negative
    integer id or a content string are skipped.
    """
    from tokenizers import AddedToken

    decoder = config.get("added_tokens_decoder")
    if not isinstance(decoder, Mapping):
        return {}
    added = {}
    for key, entry in decoder.items():
        content = _token_content(entry)
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            continue
        if content is None or token_id < 0:
            continue
        flags = entry if isinstance(entry, Mapping) else {}
        added[token_id] = AddedToken(content, special=bool(flags.get("special", False)),
                                     normalized=bool(flags.get("normalized", False)),
                                     lstrip=bool(flags.get("lstrip", False)), rstrip=bool(flags.get("rstrip", False)))
    return added


def _optional_json(path: Path) -> dict:
    """The JSON object in ``path``, ``{}`` when there is no such file."""
    return read_json(path) if path.is_file() else {}


# ---------------------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------------------


class _HFBackend:
    """A ``tokenizers.Tokenizer``: encode/decode, added and special tokens all handled in Rust."""

    kind = "tokenizers"

    def __init__(self, tok) -> None:
        self.tok = tok
        self.special_ids = frozenset(i for i, added in tok.get_added_tokens_decoder().items() if added.special)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id) if 0 <= token_id < 1 << 32 else None  # tokenizers ids are u32


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
        self.piece_ids = {p: i for i, p in enumerate(self.pieces)}
        self.byte_values: dict[int, int] = {}
        special: dict[str, int] = {}
        for i in range(n):
            if sp.is_byte(i):
                self.byte_values[i] = int(self.pieces[i][3:5], 16)
            elif (sp.is_control(i) or sp.is_unknown(i)) and self.pieces[i]:
                special[self.pieces[i]] = i
        # Tokens the tokenizer_config adds: content -> id. They win over the piece of the same id, and their ids may
        # be beyond the sentencepiece vocabulary.
        self.extra_tokens = dict(extra_tokens)
        self.extra_by_id = {i: s for s, i in self.extra_tokens.items()}
        split_tokens = dict(special)
        for piece in user_defined:  # matched whole, and the text after one starts a new stretch (as in llama.cpp)
            if piece in self.piece_ids:
                split_tokens[piece] = self.piece_ids[piece]
        split_tokens.update(self.extra_tokens)
        extra_special_ids = {s: i for s in extra_special if (i := self.token_to_id(s)) is not None}
        split_tokens.update(extra_special_ids)
        self.split_tokens = split_tokens
        self.special_ids = frozenset(special.values()) | frozenset(extra_special_ids.values())
        self.vocab_size = max([n] + [i + 1 for i in self.extra_by_id])
        self.split_re = (
            re.compile("|".join(re.escape(s) for s in sorted(split_tokens, key=len, reverse=True)))
            if split_tokens
            else None
        )
        self.add_bos = add_bos and sp.bos_id() >= 0
        self.add_eos = add_eos and sp.eos_id() >= 0
        # Whether the model prepends a space (add_dummy_prefix): then decoding drops the first leading space.
        self.dummy_prefix = sp.encode("a", out_type=str)[0].startswith(SPIECE_SPACE)

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
        """``ids`` must all be known to :meth:`id_to_token` (Tokenizer.decode checks)."""
        out = bytearray()
        for i in ids:
            if i in self.special_ids:
                if not skip_special_tokens:
                    out += self.id_to_token(i).encode("utf-8")
            elif i in self.extra_by_id:
                out += self.extra_by_id[i].encode("utf-8")
            elif i in self.byte_values:
                out.append(self.byte_values[i])
            else:
                out += self.pieces[i].replace(SPIECE_SPACE, " ").encode("utf-8")
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
    """A copy of template input made of plain JSON types only, so the sandbox never sees the caller's objects.

    Tuples become lists and dict keys strings; numpy / torch scalars become numbers, other objects a
    ``<TypeName>`` placeholder.
    """

    def convert(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return dict(obj)
        item = getattr(obj, "item", None)
        if callable(item):
            try:
                return item()
            except Exception:  # noqa: BLE001 - e.g. an array of several elements: a placeholder below
                pass
        return f"<{type(obj).__name__}>"

    try:
        return json.loads(json.dumps(value, default=convert))
    except (TypeError, ValueError, RecursionError) as exc:
        raise TinychatError(f"chat template input is not plain data: {exc}") from exc


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

    # jinja's own globals provide dict and namespace; the sandbox keeps templates off attributes starting with "_".
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
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

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text are parsed as special tokens; with
        ``add_special_tokens`` the model's BOS (and EOS, for the rare models that want it) is added."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        return list(self._backend.encode(text, add_special_tokens))

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
        """None when the model's own template is used, else the fallback's name (``"chatml"``)."""
        return None if self.chat_template else FALLBACK_TEMPLATE_NAME

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, **extra) -> str:
        """Render ``messages`` with the model's chat template (or ChatML when it has none).

        Anything that goes wrong while rendering (``raise_exception`` in the template, a sandbox limit, a runaway
        recursion) is a TinychatError.
        """
        import jinja2

        if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
            raise TinychatError(f"chat messages must be a list of dicts, got {type(messages).__name__}")
        for message in messages:
            if not isinstance(message, Mapping):
                raise TinychatError(f"chat messages must be dicts, got {message!r}")
        template = _compile_template(self.chat_template or FALLBACK_CHAT_TEMPLATE)
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
        """Render then encode; no BOS is added on top of what the template writes."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

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
        from tinychat.io.gguf_vocab import build_gguf_tokenizer  # not at the top: gguf_vocab imports this module

        tok, settings = build_gguf_tokenizer(reader, path)
        return cls(_HFBackend(tok), **settings)


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
        template = _optional_json(directory / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default") or next((t for t in named.values() if isinstance(t, str)), None)
    return template if isinstance(template, str) and template else None


def set_post_processor(tok, bos: str | None, bos_id: int | None, add_bos: bool, eos: str | None,
                       eos_id: int | None, add_eos: bool) -> None:
    """Make ``encode(add_special_tokens=True)`` of a ``tokenizers.Tokenizer`` add BOS / EOS as asked (and nothing
    when neither is)."""
    from tokenizers import processors

    add_bos = add_bos and bos is not None and bos_id is not None
    add_eos = add_eos and eos is not None and eos_id is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    special = []
    if add_bos:
        special.append((bos, bos_id))
    if add_eos and (eos, eos_id) not in special:
        special.append((eos, eos_id))
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)


def _load_tokenizer_json(json_path: Path, config: Mapping, tokens: Mapping[str, str | None]):
    from tokenizers import Tokenizer as RustTokenizer

    try:
        tok = RustTokenizer.from_file(str(json_path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception subclasses
        raise ModelLoadError(f"{json_path}: cannot load tokenizer.json: {exc}") from exc

    # Tokens tokenizer_config.json declares that tokenizer.json lacks (transformers adds them too).
    missing = [added for added in _added_tokens(config).values() if tok.token_to_id(added.content) is None]
    if missing:
        tok.add_tokens(missing)

    # Like transformers: explicit add_bos_token / add_eos_token in the config, or no post-processor at all, means the
    # post-processor is rebuilt from those flags; otherwise the tokenizer.json post-processor decides.
    explicit = "add_bos_token" in config or "add_eos_token" in config
    if explicit or tok.post_processor is None:
        bos, eos = tokens.get("bos_token"), tokens.get("eos_token")
        set_post_processor(
            tok, bos, tok.token_to_id(bos) if bos else None, bool(config.get("add_bos_token", False)),
            eos, tok.token_to_id(eos) if eos else None, bool(config.get("add_eos_token", False)),
        )
    return tok


def _load_sentencepiece_dir(model_path: Path, directory: Path, config: Mapping,
                            tokens: Mapping[str, str | None]) -> _SentencePieceBackend:
    try:
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:  # pragma: no cover - dependencies are declared
        raise ModelLoadError(f"{model_path}: the sentencepiece and protobuf packages are needed to read it") from exc
    try:
        model_bytes = model_path.read_bytes()
        sp = sentencepiece.SentencePieceProcessor(model_proto=model_bytes)
        proto = sentencepiece_model_pb2.ModelProto.FromString(model_bytes)
    except Exception as exc:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError, protobuf DecodeError
        raise ModelLoadError(f"{model_path}: cannot load sentencepiece model: {exc}") from exc
    # The Python API of sentencepiece does not tell user-defined pieces apart; the model proto does.
    user_defined_type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    user_defined = [p.piece for p in proto.pieces if p.type == user_defined_type]

    extra: dict[str, int] = {}
    extra_special: set[str] = set()
    for content, token_id in _optional_json(directory / "added_tokens.json").items():
        if isinstance(token_id, int):
            extra[content] = token_id
    for token_id, added in _added_tokens(config).items():
        if token_id >= sp.get_piece_size() or sp.id_to_piece(token_id) != added.content:
            extra[added.content] = token_id
        if added.special:
            extra_special.add(added.content)
    extra_special.update(tokens[name] for name in NAMED_TOKENS if tokens.get(name))
    add_bos = bool(config.get("add_bos_token", True))
    add_eos = bool(config.get("add_eos_token", False))
    return _SentencePieceBackend(sp, extra, extra_special, add_bos, add_eos, user_defined)


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
        """Whatever is still held back (e.g. an incomplete character at the very end); the decoder starts over."""
        out = self._decode(self._ids)[len(self._prefix_text):] if self._read < len(self._ids) else ""
        self._ids, self._read, self._prefix_text = [], 0, ""
        return out
