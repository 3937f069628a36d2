"""A GGUF file's ``tokenizer.ggml.*`` vocabulary rebuilt as a ``tokenizers`` object.

``gpt2`` vocabularies become a byte-level BPE (pre-tokenizer picked by ``tokenizer.ggml.pre``), ``llama`` ones a
sentencepiece-style BPE with byte fallback. :meth:`tinychat.tokenizer.Tokenizer.from_gguf` wraps the result.

A token string listed twice maps to its last id, as in llama.cpp (and transformers); the earlier id has no text.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

from tinychat.errors import ModelLoadError
from tinychat.files import gguf_field
from tinychat.tokenizer.backends import set_post_processor
from tinychat.tokenizer.tokens import SPIECE_SPACE

if TYPE_CHECKING:  # pragma: no cover
    import gguf

__all__ = ["build_gguf_tokenizer"]

# GGUF token types (llama.cpp's llama_token_type).
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6

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
#: ``pre`` values not in this table ("gpt2", "smollm", "default", ...) get GPT-2's own pattern.
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


class _SpecialIds(NamedTuple):
    """The ids the metadata names (None when absent or out of range)."""

    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None


def build_gguf_tokenizer(reader: gguf.GGUFReader, path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """The ``tokenizers.Tokenizer`` (post-processor included) that a GGUF file's metadata describes, and the keyword
    arguments of :class:`tinychat.tokenizer.Tokenizer` that go with it. Bad metadata is a ModelLoadError naming
    ``path``."""
    where = str(path)

    def get(key: str, default: Any = None) -> Any:
        return gguf_field(reader, key, where, default)

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

    special = _SpecialIds(
        bos=token_id("tokenizer.ggml.bos_token_id"),
        eos=token_id("tokenizer.ggml.eos_token_id"),
        unk=token_id("tokenizer.ggml.unknown_token_id"),
        pad=token_id("tokenizer.ggml.padding_token_id"),
    )
    extra_eos = [i for i in (token_id("tokenizer.ggml.eot_token_id"), token_id("tokenizer.ggml.eom_token_id"))
                 if i is not None]
    merges = get("tokenizer.ggml.merges")
    if model == "gpt2":
        add_bos = bool(get("tokenizer.ggml.add_bos_token", False))
        if not merges:
            raise ModelLoadError(f"{where}: byte-level BPE vocabulary without tokenizer.ggml.merges")
        tok = _build_byte_level_bpe(tokens, token_types, merges, get("tokenizer.ggml.pre"), special, where)
    elif model == "llama":
        add_bos = bool(get("tokenizer.ggml.add_bos_token", True))
        scores = get("tokenizer.ggml.scores")
        if not scores and not merges:
            raise ModelLoadError(f"{where}: sentencepiece vocabulary without tokenizer.ggml.scores")
        if scores and len(scores) != len(tokens):
            raise ModelLoadError(f"{where}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
        add_space_prefix = bool(get("tokenizer.ggml.add_space_prefix", True))
        tok = _build_sentencepiece_bpe(tokens, token_types, scores, merges, add_space_prefix, special, where)
    else:
        raise ModelLoadError(f"{where}: unsupported GGUF tokenizer model {model!r} (supported: 'gpt2', 'llama')")

    def name(index: int | None) -> str | None:
        return tokens[index] if index is not None else None

    add_eos = bool(get("tokenizer.ggml.add_eos_token", False))
    set_post_processor(tok, name(special.bos), special.bos, add_bos, name(special.eos), special.eos, add_eos)
    template = get("tokenizer.chat_template")
    return tok, {
        "bos_token": name(special.bos),
        "eos_token": name(special.eos),
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "unk_token": name(special.unk),
        "pad_token": name(special.pad),
        "extra_eos_ids": extra_eos,
        "chat_template": template if isinstance(template, str) else None,
        "source": where,
        "vocab_size": len(tokens),
    }


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


def _merge_pairs(merges: list[str]) -> list[tuple[str, str]]:
    """GGUF's ``"left right"`` merge strings as pairs (split at the first space; strings without one are skipped)."""
    return [tuple(merge.split(" ", 1)) for merge in merges if " " in merge]


def _build_byte_level_bpe(tokens: list[str], token_types: list[int], merges: list[str], pre: str | None,
                          special: _SpecialIds, where: str):
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
    try:
        tok = RustTokenizer(models.BPE(vocab=vocab, merges=_merge_pairs(merges), dropout=None,
                                       continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
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
    named = {i for i in special if i is not None}
    special_indices = {i for i, t in enumerate(token_types) if t == _TT_CONTROL} | named
    added = [AddedToken(tokens[i], special=True, normalized=False)
             for i in sorted(special_indices) if alphabet.issuperset(tokens[i])]
    if added:
        tok.add_special_tokens(added)
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
    vocab = {token: index for index, token in enumerate(tokens) if not token_types or token_types[index] in mergeable}
    ranked = []
    for token, index in vocab.items():
        score = scores[index]
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, index, -cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _build_sentencepiece_bpe(tokens: list[str], token_types: list[int], scores: list[float] | None,
                             merges: list[str] | None, add_space_prefix: bool, special: _SpecialIds, where: str):
    """A GGUF ``llama`` (sentencepiece BPE) vocabulary as a ``tokenizers`` BPE with byte fallback.

    Like sentencepiece (and llama.cpp): spaces become ``▁``, every stretch of text between special tokens gets a
    leading ``▁`` when ``add_space_prefix``, characters outside the vocabulary fall back to ``<0xNN>`` byte pieces,
    and decoding drops the one leading space the prefix added.
    """
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as RustTokenizer

    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = _merge_pairs(merges) if merges else _sentencepiece_merges(tokens, token_types, scores)
    unk = tokens[special.unk] if special.unk is not None else None
    has_bytes = _TT_BYTE in token_types or "<0x00>" in vocab
    try:
        tok = RustTokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=unk, fuse_unk=True,
                                       byte_fallback=has_bytes))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{where}: cannot build the sentencepiece vocabulary: {exc}") from exc

    steps = []
    if add_space_prefix:
        steps.append(normalizers.Prepend(SPIECE_SPACE))
    steps.append(normalizers.Replace(" ", SPIECE_SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    dec = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)

    named = {i for i in special if i is not None}
    special_indices = sorted({i for i, t in enumerate(token_types) if t in (_TT_CONTROL, _TT_UNKNOWN)} | named)
    added = [AddedToken(tokens[i], special=True, normalized=False) for i in special_indices if tokens[i]]
    if added:
        tok.add_special_tokens(added)
    # User-defined pieces are matched whole, like special tokens; as in llama.cpp, the text after one starts a new
    # stretch (sentencepiece itself would not give that stretch a prefix space).
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(token_types) if t == _TT_USER_DEFINED and tokens[i]]
    if user:
        tok.add_tokens(user)
    return tok
