"""Perplexity on a text, the way GPTQ and AWQ report WikiText-2 numbers.

The whole text is tokenized once with `tokenizer.encode(text)`, that is with the special tokens the tokenizer adds
by default (a BOS for Llama/Mistral tokenizers, nothing for SmolLM2's or Qwen2's), as the GPTQ/AWQ scripts do with
``tokenizer(text)``. The tokens are cut into non-overlapping windows of `seqlen` (the tail that fills no window is
dropped); each window runs through the model on its own from position 0 (no KV cache, no context carried over),
and tokens 1..seqlen-1 of each window are scored against the logits of the tokens before them.
ppl = exp(mean NLL over all scored tokens).

WikiText-2's evaluation text is the Hugging Face rows of the test split joined with "\\n\\n" (GPTQ's `get_wikitext2`);
`load_wikitext` rebuilds exactly that text from either the raw ``wiki.test.raw`` file or the rows as JSON.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from tinychat.errors import TinychatError
from tinychat.files import read_text

__all__ = ["PplResult", "load_wikitext", "perplexity", "wikitext_rows"]


@dataclass(frozen=True)
class PplResult:
    ppl: float
    nll_mean: float  # nats per scored token
    tokens_evaluated: int  # scored tokens: windows * (seqlen - 1)
    windows: int


def perplexity(model, tokenizer, text: str, seqlen: int = 2048, max_windows: int | None = None,
               progress: bool = True) -> PplResult:
    """Perplexity of `model` on `text` over non-overlapping windows of `seqlen` tokens (at most `max_windows`)."""
    context = model.config.context_length
    if seqlen > context:
        raise TinychatError(f"seqlen {seqlen} exceeds the model's context length {context}")
    if seqlen < 2:
        raise TinychatError(f"seqlen must be >= 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise TinychatError(f"max_windows must be >= 1, got {max_windows}")
    ids = tokenizer.encode(text)
    n_windows = len(ids) // seqlen
    if n_windows == 0:
        raise TinychatError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    device = model.device
    windows = torch.tensor(ids[: n_windows * seqlen], dtype=torch.int64).view(n_windows, seqlen)

    nll_sum = 0.0
    with _without_kv_cache(model), torch.inference_mode():
        for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
            window = window.to(device)[None]  # [1, seqlen]
            logits = model(window)[0, :-1].float()  # [seqlen-1, V]: predictions of tokens 1..seqlen-1
            nll_sum += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
    scored = n_windows * (seqlen - 1)
    nll_mean = nll_sum / scored
    return PplResult(ppl=math.exp(nll_mean), nll_mean=nll_mean, tokens_evaluated=scored, windows=n_windows)


@contextmanager
def _without_kv_cache(model):
    """Detach the layers' KV caches (an Engine may have set them up) so each window runs on its own."""
    caches = [layer.attn.kv_cache for layer in model.layers]
    for layer in model.layers:
        layer.attn.kv_cache = None
    try:
        yield
    finally:
        for layer, cache in zip(model.layers, caches):
            layer.attn.kv_cache = cache


def wikitext_rows(raw: str) -> list[str]:
    """The Hugging Face rows of a raw WikiText file: one row a line (newline kept), blank lines as ""."""
    lines = raw.split("\n")
    rows = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    return [row if row.strip() else "" for row in rows]


def load_wikitext(path: str | Path) -> str:
    """The WikiText evaluation text ("\\n\\n".join(rows)) from ``wiki.test.raw`` (.txt or .raw) or the rows as a
    JSON list of strings (.json); both files of one split give the same text."""
    path = Path(path)
    content = read_text(path, "the evaluation text")
    if path.suffix == ".json":
        try:
            rows = json.loads(content)
        except json.JSONDecodeError as e:
            raise TinychatError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(rows, list) or not all(isinstance(r, str) for r in rows):
            raise TinychatError(f"{path}: expected a JSON list of strings (the dataset's rows)")
    elif path.suffix in (".txt", ".raw"):
        rows = wikitext_rows(content)
    else:
        raise TinychatError(f"{path}: unsupported file type {path.suffix!r}; use wiki.test.raw (.txt/.raw) or .json")
    text = "\n\n".join(rows)
    if not text.strip():
        raise TinychatError(f"{path}: no text")
    return text
