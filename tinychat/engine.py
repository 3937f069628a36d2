"""The decoding loop: prefill, decode, sampling, stop conditions, streaming text.

The engine owns the model's KV cache and remembers which tokens it holds, so a new prompt that starts with the
previous conversation (multi-turn chat) prefills only its new tokens. Per decoded token the host waits for exactly
one thing: the sampled token id, which it needs to stream text and check stop tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from tinychat.errors import GenerationError
from tinychat.model import Transformer
from tinychat.tokenizer import StreamDecoder, Tokenizer


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off; >1 discourages tokens already in the context (CTRL / HF rule)
    seed: int | None = None
    max_new_tokens: int = 512

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose keys/values were already in the cache
    generated_tokens: int = 0  # tokens yielded (a stop token is not counted)
    decode_steps: int = 0  # forward passes after the prefill
    prefill_s: float = 0.0  # until the first token was sampled
    decode_s: float = 0.0
    finish_reason: str = ""  # "stop" (a stop token), "length" (max_new_tokens or context full), "cancelled"

    @property
    def ttft_s(self) -> float:
        return self.prefill_s

    @property
    def prefill_tok_s(self) -> float:
        n = self.prompt_tokens - self.reused_tokens
        return n / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_steps and self.decode_s else 0.0


class Sampler:
    """Turns last-position logits [V] into a token id (0-d tensor on the logits' device) without host syncs."""

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device, context: Sequence[int]):
        """vocab_size: sample among ids [0, vocab_size) only (a model's embedding may be padded past its tokenizer)."""
        self.vocab_size = vocab_size
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # [V]
            context_ids = torch.tensor([i for i in context if i < vocab_size], dtype=torch.long, device=device)
            self.seen[context_ids] = True

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        logits = logits[: self.vocab_size].float()  # [V]
        if self.seen is not None:
            penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalized, logits)
        if p.temperature == 0:
            token = logits.argmax()
        else:
            logits = logits / p.temperature
            if p.top_k and p.top_k < logits.numel():
                kth = torch.topk(logits, p.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if p.top_p < 1.0:
                sorted_logits, order = logits.sort(descending=True)
                probs = sorted_logits.softmax(-1)
                mass_before = probs.cumsum(-1) - probs  # probability of strictly better tokens
                drop = (mass_before > p.top_p).scatter(0, order, mass_before > p.top_p)
                logits = logits.masked_fill(drop, float("-inf"))
            token = torch.multinomial(logits.softmax(-1), 1, generator=self.generator)[0]
        if self.seen is not None:
            self.seen[token] = True
        return token


class Engine:
    """Generates with one model and one KV cache; one generation at a time."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_seq_len: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        ctx = model.config.context_length
        self.max_seq_len = min(max_seq_len or ctx, ctx)
        model.setup_kv_cache(self.max_seq_len)
        self.device = model.embed.weight.device
        self.cached: list[int] = []  # the tokens whose keys/values are in the cache, in order
        self.last_stats = GenerationStats()

    def reset(self) -> None:
        self.cached = []

    @torch.inference_mode()
    def _forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens [1, T] at positions start.. -> last-position logits [V]."""
        positions = torch.arange(start, start + tokens.shape[1], device=self.device)  # [T]
        return self.model(tokens, positions, last_only=True)[0, -1]

    def _prefill(self, prompt: list[int]) -> torch.Tensor:
        """Run the part of the prompt not already cached; return the last logits [V]."""
        reuse = 0
        for a, b in zip(self.cached, prompt[:-1]):  # at least one token must run to produce logits
            if a != b:
                break
            reuse += 1
        self.cached = self.cached[:reuse]
        tokens = torch.tensor([prompt[reuse:]], dtype=torch.long, device=self.device)  # [1, T]
        logits = self._forward(tokens, reuse)
        self.cached = list(prompt)
        self.last_stats.reused_tokens = reuse
        return logits

    def generate(
        self, prompt: Sequence[int], params: SamplingParams = SamplingParams(), stop_ids: Iterable[int] | None = None
    ) -> Iterator[int]:
        """Yield generated token ids (stop tokens excluded); `last_stats` is filled when the iterator ends."""
        prompt = list(prompt)
        if not prompt:
            raise GenerationError("the prompt is empty")
        if len(prompt) >= self.max_seq_len:
            raise GenerationError(
                f"the prompt has {len(prompt)} tokens but the context holds {self.max_seq_len}: "
                "shorten it (at least one token must fit after it)"
            )
        stop = frozenset(self.tokenizer.stop_token_ids if stop_ids is None else stop_ids)
        budget = min(params.max_new_tokens, self.max_seq_len - len(prompt))
        stats = self.last_stats = GenerationStats(prompt_tokens=len(prompt), finish_reason="cancelled")
        vocab = min(self.model.config.vocab_size, self.tokenizer.vocab_size)
        # no inference_mode around this generator body: it would stay on in the caller's code between yields
        t0 = time.perf_counter()
        logits = self._prefill(prompt)
        sampler = Sampler(params, vocab, self.device, prompt)
        t_first = None
        for i in range(budget):
            token_t = sampler(logits)  # 0-d tensor
            token = int(token_t)  # the one host sync per token
            if t_first is None:
                t_first = time.perf_counter()
                stats.prefill_s = t_first - t0
            else:
                stats.decode_s = time.perf_counter() - t_first
            if token in stop:
                stats.finish_reason = "stop"
                return
            stats.generated_tokens += 1
            yield token
            if i == budget - 1:
                stats.finish_reason = "length"
                return
            logits = self._forward(token_t.view(1, 1), len(self.cached))
            self.cached.append(token)
            stats.decode_steps += 1

    def stream(
        self, prompt: Sequence[int], params: SamplingParams = SamplingParams(), stop_ids: Iterable[int] | None = None
    ) -> Iterator[str]:
        """Yield text pieces as they complete (multi-byte characters are never split)."""
        decoder = StreamDecoder(self.tokenizer)
        for token in self.generate(prompt, params, stop_ids):
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail
