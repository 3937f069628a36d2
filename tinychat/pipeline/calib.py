"""Calibration text for the AWQ search: documents -> token blocks [n_blocks, seqlen].

The recipe is AWQ's (llm-awq / AutoAWQ `get_calib_dataset`): shuffle the documents with a fixed seed, strip each,
tokenize it with the tokenizer's default special tokens, skip empty ones and ones longer than `max_doc_tokens`
(512, as llm-awq does), concatenate the rest and cut the stream into blocks of `seqlen` tokens. One difference:
llm-awq takes `n_samples` *documents* and keeps however many blocks they fill; here documents are taken until
`n_samples` *blocks* are full, so the caller gets the number of blocks it asked for when the text allows.

Sources:

* a local ``.txt`` file: documents are separated by blank lines;
* a local ``.jsonl`` file: one ``{"text": ...}`` object a line (the record shape of the Pile validation set that
  AWQ calibrates on; other fields are ignored);
* a Hugging Face dataset name (AWQ's default is ``mit-han-lab/pile-val-backup``, split ``validation``), which needs
  the ``datasets`` package and network access (or its cache);
* ``None``: the built-in offline corpus below.

The offline default is a small built-in corpus written for tinychat (about 5 KB of original English text in a dozen
registers: explanation, narrative, dialogue, instructions, news, letters, lists, code, arithmetic). It needs no
download and no model run, and it is deterministic. It is small: it fills only a few 512-token blocks, where AWQ's
recipe uses 128. AWQ is known to be robust to the calibration set's size and domain (the paper calibrates on Pile
and evaluates elsewhere), and a few thousand tokens already give the per-channel activation magnitudes the scale
search needs, but pass a real corpus (a file or a dataset name) for the best result.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from tinychat.errors import TinychatError
from tinychat.files import read_text

__all__ = ["AWQ_DEFAULT_DATASET", "BUILTIN_CORPUS", "load_calibration", "read_documents"]

AWQ_DEFAULT_DATASET = "mit-han-lab/pile-val-backup"
MAX_DOC_TOKENS = 512  # llm-awq skips documents longer than this

# Original text written for tinychat (no third-party content); documents are separated by blank lines.
BUILTIN_CORPUS = """\
Bread begins with four things: flour, water, salt and yeast. Mix them until no dry flour is left, then let the \
dough rest for twenty minutes so the flour can drink the water. Knead it on a lightly floured table, folding and \
pushing, until it feels smooth and springs back when you press it. Cover the bowl and wait. In a warm kitchen the \
dough doubles in about an hour; in a cool one it may take three. Shape a loaf, let it rise again, cut a shallow \
line across the top and bake it in a hot oven until the crust sounds hollow when tapped.

The lighthouse keeper had not spoken to anyone in eleven days when the boat appeared. It was small and painted \
yellow, and it rode the grey water as if it did not know how far it was from land. Marta watched it through the \
brass telescope, counting the oars. Two. Then one. Then none, as the rower stood up, waved both arms and shouted \
something the wind tore to pieces before it reached the rocks. She put on her coat, took the lantern and went \
down the hundred and twelve steps to the landing, wondering who would row so far to find a place nobody visited.

Why is the sky blue? Sunlight contains every colour, but air molecules scatter short wavelengths much more \
strongly than long ones. Blue light is bounced around the sky and reaches our eyes from every direction, while \
most of the red and yellow light travels straight on. At sunrise and sunset the light crosses far more air, so \
even more of the blue is scattered away before it arrives, and the sun and clouds glow orange and red.

"Did you bring the map?" asked Theo.
"I thought you had it," said Priya.
"I gave it to you at the station. You put it in the side pocket of your bag."
"This bag has six side pockets." She unzipped them one after another. "Receipts, a pencil, half a biscuit... \
here it is. Although it seems to be a map of the wrong city."
Theo laughed so hard he had to sit down on the kerb.

Town council approves new cycle lanes. The council of Northbridge voted seven to two on Tuesday evening to build \
protected cycle lanes along the high street and the road to the railway station. Work is expected to begin in \
the spring and to last about four months. Supporters said the lanes would make the centre safer for children \
riding to school; shop owners asked that deliveries still be allowed before ten in the morning, and the council \
agreed to include loading bays in the final design.

To reset the router, first unplug it from the wall and wait thirty seconds. Plug it back in and wait until the \
power light stops blinking. If the internet light stays red, press and hold the small reset button on the back \
for ten seconds with a paper clip. This restores the factory settings, so you will need to enter the network \
name and password printed on the label again. If nothing works, write down the colour of each light and call \
support with that list ready.

Dear Sam, thank you for the parcel, which arrived on Friday in one piece despite the box looking as if it had \
been sat on. The seeds are already in the ground, and the tomatoes you recommended have two leaves each. The \
garden is mostly mud at the moment, but the apple tree is in flower and the bees have found it. Come and visit \
in August, when there should be more to eat than to dig. With love from all of us, Ruth.

def moving_average(values, window):
    \"\"\"Return the mean of each run of `window` consecutive values.\"\"\"
    if window <= 0:
        raise ValueError("window must be positive")
    total = sum(values[:window])
    result = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        result.append(total / window)
    return result

A prime number has exactly two divisors: one and itself. To check whether 91 is prime, try dividing it by the \
primes up to its square root, which is a little more than 9.5. It is odd, so 2 does not divide it; its digits \
add up to 10, so 3 does not; it does not end in 0 or 5; but 7 times 13 is 91. So 91 is not prime. The same \
method shows that 97 is prime, because none of 2, 3, 5 or 7 divides it.

Packing list for a weekend in the hills: a waterproof jacket, a warm hat, two pairs of socks, a water bottle, a \
map and compass, a torch with spare batteries, sun cream, plasters, a sandwich for the first day, oats and \
dried fruit for breakfast, a small stove, matches kept in a plastic bag, and a notebook for writing down the \
names of the birds you cannot identify.

Rivers shape the land slowly and then all at once. For centuries a river may wander across its plain, cutting \
into the outside of each bend and leaving sand on the inside, so the loops grow wider year by year. Then a flood \
breaks through the narrow neck of a loop, the river takes the shorter path, and the old bend is left behind as a \
curved lake. Farmers, towns and maps must all adjust to a channel that moved a kilometre in a single night.

Q: How long should I rest a steak after cooking it?
A: About five minutes for a thin steak and up to ten for a thick one. Resting lets the juices settle, so less \
of them runs out when you cut it. Keep it somewhere warm, loosely covered, and slice it across the grain.
"""


def load_calibration(
    source: str | Path | None,
    tokenizer,
    n_samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    max_doc_tokens: int | None = MAX_DOC_TOKENS,
    split: str = "validation",
) -> torch.Tensor:
    """Calibration token blocks [n_blocks, seqlen] int64 (n_blocks = n_samples when the text is long enough).

    `source`: a ``.txt`` or ``.jsonl`` path, a Hugging Face dataset name (with `split`), or None for the built-in
    corpus. `tokenizer` is a tinychat Tokenizer (anything with ``encode(text) -> list[int]``). Documents longer than
    `max_doc_tokens` tokens are skipped (None: keep all). Fewer blocks than asked come back, with a warning, when a
    file or dataset runs out of text; the built-in corpus always gives what it has. Raises TinychatError for an
    unreadable or empty source, a bad JSONL line, or text too short for a single block.
    """
    if n_samples < 1 or seqlen < 1:
        raise ValueError(f"n_samples and seqlen must be >= 1, got n_samples={n_samples}, seqlen={seqlen}")
    docs, name = _documents(source, seed, split)
    ids, n_docs = _collect_tokens(docs, tokenizer, n_samples * seqlen, max_doc_tokens)
    n_blocks = min(len(ids) // seqlen, n_samples)
    if n_blocks == 0:
        if n_docs == 0:
            raise TinychatError(f"{name}: no usable document (all are empty or longer than {max_doc_tokens} tokens)")
        raise TinychatError(
            f"{name}: too little text for one calibration block: found {len(ids)} tokens in {n_docs} document(s), "
            f"need {seqlen} (seqlen)"
        )
    if n_blocks < n_samples and source is not None:
        warnings.warn(f"{name}: only {len(ids)} tokens of usable text: {n_blocks} of the {n_samples} calibration "
                      f"blocks of {seqlen} tokens", stacklevel=2)
    return torch.tensor(ids[: n_blocks * seqlen], dtype=torch.int64).view(n_blocks, seqlen)


def _collect_tokens(
    docs: Iterable[str], tokenizer, n_tokens: int, max_doc_tokens: int | None
) -> tuple[list[int], int]:
    """Tokenize documents in order until `n_tokens` tokens are gathered; returns (token ids, documents used)."""
    ids: list[int] = []
    used = 0
    for doc in docs:
        doc = doc.strip()
        if not doc:
            continue
        doc_ids = tokenizer.encode(doc)
        if not doc_ids or (max_doc_tokens is not None and len(doc_ids) > max_doc_tokens):
            continue
        ids.extend(doc_ids)
        used += 1
        if len(ids) >= n_tokens:
            break
    return ids, used


def _documents(source: str | Path | None, seed: int, split: str) -> tuple[Iterator[str], str]:
    """The source's documents in shuffled order, and a name for messages."""
    if source is None:
        return _shuffled(_split_paragraphs(BUILTIN_CORPUS), seed), "built-in calibration corpus"
    path = Path(source).expanduser()
    if path.exists() or path.suffix in (".txt", ".jsonl", ".json") or str(source).startswith((".", "/", "~")):
        return _shuffled(read_documents(path), seed), str(path)
    return _hf_documents(str(source), seed, split), f"dataset {source} ({split})"


def _shuffled(docs: list[str], seed: int) -> Iterator[str]:
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    return iter(docs)


def read_documents(path: str | Path) -> list[str]:
    """The documents of a ``.txt`` (blank-line separated) or ``.jsonl`` (``{"text": ...}`` lines) file, in order."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise TinychatError(f"{path}: unsupported calibration file type {path.suffix!r}; use .txt or .jsonl")
    text = read_text(path, "the calibration file")
    docs = _split_paragraphs(text) if path.suffix == ".txt" else _jsonl_texts(text, path)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise TinychatError(f"{path}: the calibration file is empty (no text)")
    return docs


def _split_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n[ \t\r\f\v]*\n", text) if p.strip()]


def _jsonl_texts(text: str, path: Path) -> list[str]:
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TinychatError(f"{path}: line {number}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise TinychatError(f'{path}: line {number}: expected an object with a string "text" field')
        docs.append(record["text"])
    return docs


def _hf_documents(name: str, seed: int, split: str) -> Iterator[str]:
    """A Hugging Face dataset's "text" column, shuffled with the seed (as llm-awq does), read lazily."""
    try:
        import datasets
    except ImportError:
        raise TinychatError(
            f"calibration source {name!r} is not a local file, and loading it as a Hugging Face dataset needs the "
            f"`datasets` package (pip install datasets); or pass a local .txt/.jsonl file"
        ) from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, missing split: datasets raises many types
        raise TinychatError(
            f"cannot load the calibration dataset {name!r} (split {split!r}): {type(e).__name__}: {e}; "
            f"offline, pass a local .txt/.jsonl file instead"
        ) from None
    if "text" not in dataset.column_names:
        raise TinychatError(f"dataset {name!r} has no 'text' column (columns: {', '.join(dataset.column_names)})")
    return (row["text"] for row in dataset.shuffle(seed=seed))
