"""The two backends behind :class:`tinychat.tokenizer.Tokenizer` and their loaders.

* :class:`_HFBackend`: a ``tokenizers.Tokenizer`` (a model directory's ``tokenizer.json``, or a GGUF vocabulary
  rebuilt by :mod:`tinychat.tokenizer.gguf_vocab`), with :func:`set_post_processor` to choose what
  ``encode(add_special_tokens=True)`` adds;
* :class:`_SentencePieceBackend`: a ``sentencepiece`` model (a model directory's ``tokenizer.model``), plus the
  special-token handling sentencepiece itself does not do;
* the loaders that read them from a Hugging Face model directory, with the tokens its tokenizer_config.json adds.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tinychat.errors import ModelLoadError
from tinychat.tokenizer.tokens import NAMED_TOKENS, SPIECE_SPACE, _optional_json, _token_content


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


class _HFBackend:
    """A ``tokenizers.Tokenizer``: encode/decode, added and special tokens all handled in Rust."""

    kind = "tokenizers"

    def __init__(self, tok) -> None:
        self.tok = tok
        self.special_ids = frozenset(i for i, added in tok.get_added_tokens_decoder().items() if added.special)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def plain_tok(self):
        """A copy of `tok` that reads special-token text as plain text (what a user typed). A copy, not a flag
        flipped on `tok`, so that threads encoding at once never see each other's setting; built on first use only
        (about 0.1 s for a 49k vocabulary), since most conversations never need it."""
        from tokenizers import Tokenizer as RustTokenizer

        plain = RustTokenizer.from_str(self.tok.to_str())
        plain.encode_special_tokens = True
        return plain

    def encode(self, text: str, add_special_tokens: bool, parse_special: bool = True) -> list[int]:
        tok = self.tok if parse_special else self.plain_tok
        return tok.encode(text, add_special_tokens=add_special_tokens).ids

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

    def encode(self, text: str, add_special_tokens: bool, parse_special: bool = True) -> list[int]:
        ids: list[int] = []
        if add_special_tokens and self.add_bos:
            ids.append(self.sp.bos_id())
        pos = 0
        if self.split_re is not None and parse_special:
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
