"""The Python API for embedding tinychat in an application.

    import tinychat
    llm = tinychat.load()                       # SmolLM2-135M-Instruct, its Q4_1 GGUF blocks as stored
    print(llm.chat([{"role": "user", "content": "Hi!"}]).text)
    for piece in llm.generate("Once upon a time", stream=True, max_new_tokens=64):
        print(piece, end="", flush=True)

One `Model` runs one generation at a time (it owns one KV cache). Calls from other threads wait for the running one
to end, or, with `timeout`, give up with `BusyError`. A stream holds the model until it is exhausted or closed.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tinychat.engine import API_SAMPLING, Engine, GenerationStats, SamplingParams
from tinychat.errors import GenerationError, TinychatError
from tinychat.io.loader import QUANT_CHOICES, ModelSource, open_source, resolve_device, resolve_dtype, set_threads
from tinychat.model import Transformer
from tinychat.tokenizer import StreamDecoder, Tokenizer

__all__ = ["BusyError", "Completion", "Model", "TextStream", "load", "load_transformer"]

SAMPLING_ARGS = frozenset(SamplingParams.__dataclass_fields__)


class BusyError(TinychatError):
    """The model is generating for another caller and the wait timed out."""


@dataclass(frozen=True)
class Completion:
    """A finished generation: the text, token counts and timings."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop": a stop token or stop string; "length": max_new_tokens or the context; "cancelled"
    ttft_s: float  # time to the first token (prefill), seconds
    prefill_tok_s: float  # prompt tokens not already in the KV cache, per second of prefill
    decode_tok_s: float
    total_s: float
    reused_tokens: int = 0  # prompt tokens whose keys/values were already cached (an extended conversation)


class TextStream(Iterator[str]):
    """Text pieces as they are generated; `completion` is set once the stream ends.

    The model stays busy until the stream is exhausted or closed (`close()`, `with`, or garbage collection), so a
    caller that stops reading early should close it. Any thread may close it, also while another thread reads it:
    close() then waits for the token in flight, ends the generation there ("cancelled") and frees the model.
    """

    def __init__(self, pieces: Iterator[str], result: list[Completion], release) -> None:
        """pieces: a generator that appends its Completion to `result` when it ends, however it ends (it must not
        refer to this stream: without a reference cycle, a dropped stream is freed, and the model released, at
        once)."""
        self._pieces = pieces
        self._result = result
        self._release = release
        self._step = threading.RLock()  # held while a token is produced: close() waits for it, never interrupts it
        self._cancel = threading.Event()  # close() was called: a reader stops at its next step (no lock starvation)

    @property
    def completion(self) -> Completion | None:
        """The finished generation, once the stream has ended (None before)."""
        return self._result[0] if self._result else None

    def __next__(self) -> str:
        with self._step:
            if self._release is None:
                raise StopIteration
            if self._cancel.is_set():
                self._close_now()
                raise StopIteration
            try:
                return next(self._pieces)
            except StopIteration:
                self._finish()
                raise
            except BaseException:
                self.close()
                raise

    def _finish(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def close(self) -> None:
        """Stop generating (finish_reason "cancelled") and free the model for the next caller."""
        self._cancel.set()
        with self._step:  # a reader in another thread finishes its token first
            self._close_now()

    def _close_now(self) -> None:  # with self._step held
        if self._release is None:
            return
        try:
            self._pieces.close()
        finally:
            self._finish()
            if not self._result:  # closed before the first piece was asked for: nothing ran
                self._result.append(Completion("", 0, 0, "cancelled", 0.0, 0.0, 0.0, 0.0))

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _hold_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` could start a stop string (and must wait for more text)."""
    keep = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:n]):
                keep = n
                break
    return keep


class Model:
    """A loaded model with its tokenizer and one KV cache. Build it with `tinychat.load`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, name: str, max_seq_len: int | None = None,
                 tune_threads: bool = True, kv_dtype: torch.dtype | None = None):
        self.engine = Engine(model, tokenizer, max_seq_len, tune_threads=tune_threads, kv_dtype=kv_dtype)
        self.tokenizer = tokenizer
        self.name = name
        self._lock = threading.Lock()
        self._holder: int | None = None  # the thread whose call holds the model (a stream it has not closed)

    @property
    def context_length(self) -> int:
        """Tokens the KV cache holds: prompt plus answer must fit."""
        return self.engine.max_seq_len

    def _acquire(self, timeout: float | None) -> None:
        """Take the model for one call; BusyError when the wait times out, or at once when this thread itself holds
        it through a stream it has not closed (waiting for that would wait forever)."""
        if self._holder == threading.get_ident():
            raise BusyError(f"{self.name} is busy with an open stream of this same thread: exhaust or close it "
                            "(stream.close(), or `with stream:`) before the next call")
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise BusyError(f"{self.name} is busy with another generation")
        self._holder = threading.get_ident()

    def _release(self) -> None:
        self._holder = None
        self._lock.release()

    def reset(self, timeout: float | None = None) -> None:
        """Forget the conversation the KV cache holds (the next call prefills its whole prompt)."""
        self._acquire(timeout)
        try:
            self.engine.reset()
        finally:
            self._release()

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text))

    def chat_prompt_ids(self, messages: Sequence[Mapping]) -> list[int]:
        """Token ids of OpenAI-style messages rendered with the model's chat template."""
        if not messages:
            raise GenerationError("messages is empty")
        for m in messages:
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(
                    m.get("content"), str):
                raise GenerationError(f"each message needs a string 'role' and 'content', got {m!r}")
        return self.tokenizer.encode_chat(list(messages))

    def generate(self, prompt: str, *, stream: bool = False, stop: Sequence[str] = (), timeout: float | None = None,
                 progress: Callable[[int, int], None] | None = None, **sampling) -> Completion | TextStream:
        """Continue `prompt` (plain text, no chat template).

        sampling: temperature, top_k, top_p, repetition_penalty, seed, max_new_tokens; each unset one takes its
        value from `tinychat.engine.API_SAMPLING` (greedy: temperature 0).
        stop: strings that end the answer (not included in it). timeout: seconds to wait while another call runs
        (None: as long as it takes; 0: fail at once with BusyError). progress(done, total): called as the prompt
        is prefilled, after each chunk of `tinychat.engine.PREFILL_CHUNK` tokens (total: the tokens not reused).
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        return self._run(self.tokenizer.encode(prompt), stream, stop, timeout, progress, sampling)

    def chat(self, messages: Sequence[Mapping], *, stream: bool = False, stop: Sequence[str] = (),
             timeout: float | None = None, progress: Callable[[int, int], None] | None = None,
             **sampling) -> Completion | TextStream:
        """Answer OpenAI-style messages ([{"role": "system"|"user"|"assistant", "content": str}, ...]).

        A conversation that extends the previous call's messages prefills only its new tokens. Arguments as in
        `generate`.
        """
        return self._run(self.chat_prompt_ids(messages), stream, stop, timeout, progress, sampling)

    def _run(self, ids: list[int], stream: bool, stop: Sequence[str], timeout: float | None,
             progress: Callable[[int, int], None] | None, sampling: dict) -> Completion | TextStream:
        unknown = set(sampling) - SAMPLING_ARGS
        if unknown:
            raise TypeError(f"unknown sampling argument(s): {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(sorted(SAMPLING_ARGS))}")
        params = dataclasses.replace(API_SAMPLING, **sampling)
        if isinstance(stop, str):
            stop = [stop]
        stop = [s for s in stop if s]
        self._acquire(timeout)
        result: list[Completion] = []
        pieces = TextStream(self._pieces(ids, params, stop, progress, result), result, self._release)
        if stream:
            return pieces
        with pieces:
            for _ in pieces:
                pass
        return pieces.completion

    def _pieces(self, ids: list[int], params: SamplingParams, stop: list[str],
                progress: Callable[[int, int], None] | None, result: list[Completion]):
        """Generator of text pieces; appends the Completion to `result` when it ends (exhausted, stopped, closed or
        failed)."""
        t0 = time.perf_counter()
        text, sent = "", 0  # text so far; text[:sent] was yielded
        finish = None
        tokens = self.engine.generate(ids, params, progress=progress)
        decoder = StreamDecoder(self.tokenizer)
        try:
            for token in tokens:
                text += decoder.push(token)
                if stop:
                    hits = [i for i in (text.find(s, max(sent - len(s), 0)) for s in stop) if i >= 0]
                    if hits:
                        text, finish = text[: min(hits)], "stop"
                        break
                end = len(text) - _hold_back(text, stop)
                if end > sent:
                    yield text[sent:end]
                    sent = end
            else:
                text += decoder.flush()
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
        finally:
            tokens.close()  # an early end (stop string, the caller closing us) ends the engine's loop
            stats: GenerationStats = self.engine.last_stats
            result.append(Completion(
                text=text[:sent], prompt_tokens=stats.prompt_tokens, completion_tokens=stats.generated_tokens,
                finish_reason=finish or stats.finish_reason, ttft_s=stats.ttft_s, prefill_tok_s=stats.prefill_tok_s,
                decode_tok_s=stats.decode_tok_s, total_s=time.perf_counter() - t0, reused_tokens=stats.reused_tokens))


def load(path_or_id: str | os.PathLike | ModelSource | None = None, *, device: str | torch.device = "cpu",
         dtype="float32", quant: str = "auto", threads: int | None = None, max_seq_len: int | None = None,
         kv_dtype: str | torch.dtype | None = None, verbose: bool = False) -> Model:
    """Load a model for generation.

    path_or_id: a GGUF file, a Hugging Face model directory (full precision or AWQ 4-bit), a hub id, or a
    ModelSource already opened (`tinychat.io.loader.open_source`); None: the default model,
    SmolLM2-135M-Instruct (a Q4_1 GGUF). quant: "auto" runs a quantized model as it is stored (a GGUF's blocks, an
    AWQ checkpoint) and quantizes a full-precision one with AWQ (on first use, cached); "awq" quantizes with AWQ
    whatever the source (a GGUF's blocks are dequantized and requantized, which loses accuracy: it says so);
    "none" runs float weights (a GGUF's blocks dequantized). threads: CPU threads (torch's setting is
    process-wide); None: torch's count, which decode steps then lower or raise back from their measured times
    (`tinychat.engine.ThreadTuner`: a core busy with another process). max_seq_len: context to allocate (default:
    the model's own, at most tinychat.model.DEFAULT_CONTEXT = 4096). kv_dtype: the KV cache's, "float32", "float16"
    or "bfloat16" (None: float16 for a float32 model on a CPU, as llama.cpp; else the model's dtype).
    """
    kv = None if kv_dtype is None else resolve_dtype(kv_dtype)
    model, tokenizer, path = load_transformer(path_or_id, device=device, dtype=dtype, quant=quant, threads=threads,
                                              verbose=verbose)
    return Model(model, tokenizer, name=path.name, max_seq_len=max_seq_len, tune_threads=threads is None, kv_dtype=kv)


def load_transformer(path_or_id: str | os.PathLike | ModelSource | None = None, *, device: str | torch.device = "cpu",
                     dtype="float32", quant: str = "auto", threads: int | None = None,
                     verbose: bool = False) -> tuple[Transformer, Tokenizer, Path]:
    """What `load` loads, without an engine (no KV cache is allocated): the decoder, its tokenizer and the path
    they came from (for `quant="awq"`, the cached 4-bit checkpoint). For whole-sequence work such as perplexity."""
    if quant not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of {', '.join(QUANT_CHOICES)}, got {quant!r}")
    resolve_dtype(dtype)  # a bad dtype or device fails before any work
    resolve_device(device)
    set_threads(threads)
    src = open_source(path_or_id)  # the header only
    plan = src.plan(quant)
    if plan == "awq":
        from tinychat.pipeline.quantize import QuantizeOptions, cached_quantized_model

        if src.has_blocks:
            warnings.warn(f"{src.path.name}: quant='awq' dequantizes its quantized blocks and quantizes them again "
                          "with AWQ, which loses accuracy; quant='auto' runs them as stored", stacklevel=3)
        src = open_source(cached_quantized_model(src, QuantizeOptions(device=str(device))))
    path = src.path
    if verbose:
        print(f"loading {path} ({dtype}, {device}) ...", file=sys.stderr, flush=True)
    loaded = src.load(device=device, dtype=dtype, blocks=plan == "blocks")
    return loaded.model, loaded.tokenizer, loaded.path
