"""The decoding loop: prefill, decode, sampling, stop tokens; token ids in, token ids out (text streaming, stop
strings and the lock around a generation are `tinychat.api.Model`'s, the one front door to generation).

The engine owns the model's KV cache and remembers which tokens it holds, so a new prompt that starts with the
previous conversation (multi-turn chat) prefills only its new tokens. Per decoded token the host waits for exactly
one thing: the sampled token id, which it needs to stream text and check stop tokens.

On a CUDA device a decode step (the forward of one token and the sampling of the next) is captured once per sampling
setting as a CUDA graph and replayed for every token (`_GraphStep`); `Engine(..., cuda_graphs=False)` or
TINYCHAT_CUDA_GRAPHS=0 decodes eagerly instead. The prefill, and everything on a CPU, runs eagerly.

On a CPU, unless the thread count was fixed, decode steps pick it from their own measured times (`ThreadTuner`): a
core kept busy by another process makes every one of a step's hundred-odd barriers wait for a time slice, and fewer
threads then decode several times faster.
"""

from __future__ import annotations

import ctypes
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from tinychat.errors import GenerationError
from tinychat.model import DEFAULT_CONTEXT, Transformer
from tinychat.tokenizer import Tokenizer

GRAPHS_ENV = "TINYCHAT_CUDA_GRAPHS"  # "0" (or "false", "off", "no"): decode eagerly on CUDA too
MAX_GRAPHS = 8  # captured decode steps an engine keeps, one per sampling setting; the least recently used goes
PREFILL_CHUNK = 256  # prompt tokens per forward of a prefill: bounded activations, progress, an interruption keeps
# what ran (as llama.cpp's batches of 512)


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
            (0 <= self.temperature < math.inf, f"temperature must be finite and >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 < self.repetition_penalty < math.inf,
             f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# The sampling defaults, in one place; each interface says which it uses, and a caller's settings override them.
API_SAMPLING = SamplingParams()  # the Python API: greedy, reproducible
CLI_SAMPLING = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1)  # chat and generate
SERVER_SAMPLING = SamplingParams(temperature=0.8, top_p=0.95)  # the HTTP server, as llama.cpp's server samples


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
    """Turns last-position logits [V] into a token id (0-d tensor on the logits' device) without host syncs.

    A sampled token is argmax(probs / noise) with noise [V] ~ Exp(1) from the sampler's generator: what
    torch.multinomial does for one sample, so a seed gives the tokens it gave with multinomial. It is done in two
    parts so that a CUDA graph can capture `pick` while `draw` runs outside it, and the buffers (noise, seen) are made
    once and refilled by `restart`, so that one captured graph serves every generation with the same settings.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device, context: Sequence[int]):
        """vocab_size: sample among ids [0, vocab_size) only (a model's embedding may be padded past its tokenizer)."""
        self.vocab_size = vocab_size
        self.params = params
        self.generator = torch.Generator(device=device)
        self.noise = None  # [V] fp32 Exp(1) draws, when sampling
        if params.temperature > 0:
            self.noise = torch.empty(vocab_size, dtype=torch.float32, device=device)
        self.seen = None  # [V] bool: tokens in the context, when penalized
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.restart(params.seed, context)

    def restart(self, seed: int | None, context: Sequence[int]) -> None:
        """Start a generation: seed the generator (None: at random) and mark the context's tokens as seen."""
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        if self.seen is not None:
            context_ids = torch.tensor([i for i in context if i < self.vocab_size], dtype=torch.long,
                                       device=self.seen.device)
            self.seen.zero_()
            self.seen[context_ids] = True

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self.draw()
        return self.pick(logits)

    def draw(self) -> None:
        """The random part of a step: fill the noise buffer from the generator (nothing when greedy)."""
        if self.noise is not None:
            self.noise.exponential_(generator=self.generator)

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """The token for logits [V] and the noise drawn last (0-d); marks it seen. No random draws, no host syncs."""
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
            token = (logits.softmax(-1) / self.noise).argmax()  # torch.multinomial(probs, 1) on these draws
        if self.seen is not None:
            self.seen.index_fill_(0, token.view(1), True)
        return token


def graph_key(params: SamplingParams) -> tuple:
    """What a captured decode step bakes in: the sampling settings (kernel arguments of the graph), not the seed or the
    token budget. Greedy decoding ignores top-k and top-p."""
    if params.temperature == 0:
        return (0.0, 0, 1.0, params.repetition_penalty)
    return (params.temperature, params.top_k, params.top_p, params.repetition_penalty)


class _GraphStep:
    """One decode step, the forward of one token and the sampling of the next, as a CUDA graph.

    Static buffers: token [1, 1] and position [1] in (batch 1, the engine's only batch size), the sampler's noise and
    seen [V], the sampled token (0-d) out; the model's KV caches are written in place at row `position`. The graph
    reads every input from device memory, so one capture serves every position and every generation. It also holds
    the addresses of the model's weights as they were at capture: a model is not changed once an engine decodes with it.
    """

    def __init__(self, model: Transformer, sampler: Sampler):
        self.model, self.sampler = model, sampler
        self.kv_cache = model.layers[0].attn.kv_cache  # the caches the graph writes (setup_kv_cache replaces them)
        device = sampler.generator.device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)  # [B, T]
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # [T]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None  # 0-d: the token the graph samples

    def _step(self) -> torch.Tensor:
        logits = self.model(self.token, self.position, last_only=True)[0, -1]  # [V]
        return self.sampler.pick(logits)

    def load(self, token: torch.Tensor, position: int) -> None:
        """Set the inputs of the next step: token (0-d, on the device) at `position`, and fresh noise."""
        self.token.copy_(token.view(1, 1))
        self.position.fill_(position)
        self.sampler.draw()

    def warm_up(self) -> torch.Tensor:
        """Run the step eagerly on a side stream (as torch asks before a capture); returns its token (0-d)."""
        side = torch.cuda.Stream(self.token.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            token = self._step()
        torch.cuda.current_stream().wait_stream(side)
        return token

    def capture(self, pool) -> None:
        """Record the step (nothing runs): a warm-up must come first, and `replay` then runs it."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = self._step()
        self.graph, self.out = graph, out

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


class ThreadTuner:
    """The CPU thread count of decode steps, picked from their measured times among torch's count, half of it and 1.

    A round tries every count for PROBE_STEPS steps, the fewest threads first, and keeps the fastest (by the median of
    its steps; another count must win by MARGIN to replace the one in use). A count whose step takes SLOW times the
    best median measured so far in the round is dropped at once: with another process on a core, a step of several
    threads waits at every barrier (SmolLM2 on 2 cores: 60-200 ms a step at 2 threads against 9 ms at 1), and trying
    it for PROBE_STEPS steps had cost more than the rest of a short generation. Fewer threads are never that much
    slower, so they go first and set the bar. The first generation starts with a round; another comes every
    PROBE_EVERY steps (counted across generations), and at once when a step takes SLOW times the kept count's median
    (a core taken, or freed: then more threads win again).
    torch's thread count is process-wide: the count in use stays set after the generation. A prefill runs at the kept
    count, never at one being tried (a generation that ended in the middle of a round had left the next prompt's
    prefill on one thread: 1011 against 1460 tok/s at 512 tokens, SmolLM2, 2 cores).
    """

    PROBE_STEPS = 3
    PROBE_EVERY = 64
    MARGIN = 0.85
    SLOW = 2.0

    def __init__(self, threads: int):
        self.counts = sorted({threads, max(1, threads // 2), 1}, reverse=True)
        self.current = threads
        self.times: dict[int, list[float]] = {}  # count -> its step times in the current or last round (seconds)
        self.queue: list[int] = []  # the round's steps still to run: a count each
        self.since_probe = 0

    def start(self) -> None:
        """A new generation: a round if none was run yet."""
        if not self.times:
            self._probe()

    def _probe(self) -> None:
        self.queue = [c for c in reversed(self.counts) for _ in range(self.PROBE_STEPS)]
        self.times = {}
        self.since_probe = 0

    def next_count(self) -> int:
        """The thread count to run the next step with."""
        return self.queue[0] if self.queue else self.current

    def _measured(self) -> dict[int, float]:
        """The median step time of each count that ran all its steps in this round."""
        return {c: statistics.median(t) for c, t in self.times.items() if len(t) == self.PROBE_STEPS}

    def record(self, count: int, seconds: float) -> None:
        """The time of a step run with `count` threads."""
        if self.queue:
            self.queue.pop(0)
            measured = self._measured()
            self.times.setdefault(count, []).append(seconds)
            if measured and seconds > self.SLOW * min(measured.values()):  # far slower than another: dropped
                self.queue = [c for c in self.queue if c != count]
            if not self.queue:
                self._decide()
            return
        kept = self.times[self.current]  # the kept count's last PROBE_STEPS steps (the round ran them all)
        kept.append(seconds)
        del kept[: -self.PROBE_STEPS]
        self.since_probe += 1
        if self.since_probe >= self.PROBE_EVERY or seconds > self.SLOW * statistics.median(kept):
            self._probe()

    def _decide(self) -> None:
        measured = self._measured()  # the first count (fewest threads) is never dropped: nothing was measured before it
        best = min(measured, key=measured.get)
        if self.current not in measured or measured[best] < self.MARGIN * measured[self.current]:
            self.current = best
        self.times = {self.current: self.times[self.current]}
        self.since_probe = 0


def keep_freed_memory() -> bool:
    """Has glibc's malloc keep freed memory for the next allocation rather than hand it back to the system, for the
    whole process (as torch's thread count is). A CPU forward's activations are megabytes each (SmolLM2 at 256 tokens:
    1.5-3 MB), above malloc's threshold for mmap, so every op's output was mapped anew and its pages faulted in and
    zeroed by the kernel: 17% of a 512-token prefill's samples, 313-398 -> 263-269 ms a prefill without (2 cores).
    Allocations up to 32 MB (the most glibc allows) come from the heap, and the heap's top is trimmed only past 256 MB
    free; the peak RSS did not grow measurably (SmolLM2's RSS growth 156-169 MB either way: the memory is the same,
    reused). Returns False where the C library has no mallopt (not glibc)."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 256 << 20))


def default_kv_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype for a model computing in `dtype` on `device`: float16 below float32 on a CPU (as
    llama.cpp: half the memory and half the bytes decode attention reads, for a rounding of k and v to 11 bits), else
    the model's own."""
    return torch.float16 if device.type == "cpu" and dtype == torch.float32 else dtype


class Engine:
    """Generates with one model and one KV cache; one generation at a time."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_seq_len: int | None = None,
                 cuda_graphs: bool | None = None, tune_threads: bool = True, kv_dtype: torch.dtype | None = None):
        """cuda_graphs: decode through CUDA graphs on a CUDA device (None: unless TINYCHAT_CUDA_GRAPHS=0); never on a
        CPU. tune_threads: on a CPU, let decode steps pick torch's thread count (ThreadTuner: torch's count when the
        engine is made, half of it or 1); False keeps the count the caller set. kv_dtype: the KV cache's (None:
        default_kv_dtype; on a CPU float32, float16 or bfloat16 below float32 weights, else the weights' own)."""
        self.model, self.tokenizer = model, tokenizer
        ctx = model.config.context_length
        if max_seq_len is not None and not 1 <= max_seq_len <= ctx:
            raise ValueError(f"the context to allocate (ctx) must be 1 .. {ctx}, this model's context length; "
                             f"got {max_seq_len}")
        self.max_seq_len = max_seq_len or min(ctx, DEFAULT_CONTEXT)
        self.device = model.device
        self.kv_dtype = kv_dtype or default_kv_dtype(self.device, model.dtype)
        model.setup_kv_cache(self.max_seq_len, dtype=self.kv_dtype)
        self.cached: list[int] = []  # the tokens whose keys/values are in the cache, in order
        self._generating = False  # a generate() is running (maybe suspended between tokens)
        self.last_stats = GenerationStats()
        if cuda_graphs is None:
            cuda_graphs = os.environ.get(GRAPHS_ENV, "1").strip().lower() not in ("0", "false", "off", "no")
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"  # turned off for good if a capture fails
        self.graph_captures = 0  # decode steps captured so far
        self.graph_error: str | None = None  # why a capture failed
        self._graphs: dict[tuple, _GraphStep] = {}  # graph_key -> its step, least recently used first
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None  # shared: never run at once
        n = torch.get_num_threads()
        self.threads = ThreadTuner(n) if tune_threads and self.device.type == "cpu" and n > 1 else None
        if self.device.type == "cpu":
            keep_freed_memory()

    def reset(self) -> None:
        self.cached = []

    @torch.inference_mode()
    def _forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """tokens [1, T] at positions start.. -> last-position logits [V]."""
        positions = torch.arange(start, start + tokens.shape[1], device=self.device)  # [T]
        return self.model(tokens, positions, last_only=True)[0, -1]

    def _sampler(self, params: SamplingParams, vocab: int, prompt: list[int]) -> tuple[Sampler, _GraphStep | None]:
        """The generation's sampler and, with CUDA graphs, the decode step it belongs to (made, or reused and its
        sampler restarted, for these settings)."""
        if not self.cuda_graphs:
            return Sampler(params, vocab, self.device, prompt), None
        if self._graphs and next(iter(self._graphs.values())).kv_cache is not self.model.layers[0].attn.kv_cache:
            self._graphs.clear()  # the model's caches were set up again (by another engine): recapture
        key = graph_key(params)
        step = self._graphs.pop(key, None)
        if step is None:
            step = _GraphStep(self.model, Sampler(params, vocab, self.device, prompt))
        else:
            step.sampler.restart(params.seed, prompt)
        self._graphs[key] = step  # now the most recently used
        if len(self._graphs) > MAX_GRAPHS:
            del self._graphs[next(iter(self._graphs))]
        if all(s.graph is None for s in self._graphs.values()):
            # No captured graph is left to hold the pool: capture into a fresh one. Torch never reopens a released
            # pool while a tensor still lives in it (an internal assert, use_count > 0).
            self._graph_pool = torch.cuda.graph_pool_handle()
        return step.sampler, step

    @torch.inference_mode()
    def _decode(self, token: torch.Tensor, position: int, sampler: Sampler, step: _GraphStep | None) -> torch.Tensor:
        """One decode step: token (0-d) at `position` -> the next token (0-d), by replaying `step`'s graph when there
        is one. A step's first call runs it eagerly and captures it; a capture that fails turns graphs off."""
        if step is None or not self.cuda_graphs:
            return sampler(self._forward(token.view(1, 1), position))
        with torch.cuda.device(self.device):  # graphs capture and replay on the current device's streams
            step.load(token, position)
            if step.graph is not None:
                return step.replay()
            out = step.warm_up()
            try:
                step.capture(self._graph_pool)
                self.graph_captures += 1
            except RuntimeError as e:  # e.g. an op that syncs with the host or has no CUDA kernel
                self.cuda_graphs, self.graph_error = False, f"{type(e).__name__}: {e}".strip().splitlines()[0]
                self._graphs.clear()
                warnings.warn(f"tinychat: decoding without CUDA graphs, the capture failed ({self.graph_error})",
                              stacklevel=3)
            return out

    def _timed_decode(self, token: torch.Tensor, position: int, sampler: Sampler, step: _GraphStep | None,
                      first: bool) -> torch.Tensor:
        """_decode with the thread count the tuner asks for, and the step's time reported to it (a CPU step is
        synchronous: its call is its time)."""
        if self.threads is None:
            return self._decode(token, position, sampler, step)
        if first:
            self.threads.start()
        count = self.threads.next_count()
        if count != torch.get_num_threads():
            torch.set_num_threads(count)
        t = time.perf_counter()
        out = self._decode(token, position, sampler, step)
        self.threads.record(count, time.perf_counter() - t)
        return out

    def _prefill(self, prompt: list[int], progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Run the part of the prompt not already cached, PREFILL_CHUNK tokens a forward; return the last logits [V].
        progress(done, total) is called after each chunk with the tokens run so far and all to run."""
        reuse = 0
        for a, b in zip(self.cached, prompt[:-1]):  # at least one token must run to produce logits
            if a != b:
                break
            reuse += 1
        self.cached = self.cached[:reuse]
        self.last_stats.reused_tokens = reuse
        total = len(prompt) - reuse
        if self.threads is not None and torch.get_num_threads() != self.threads.current:
            torch.set_num_threads(self.threads.current)  # the kept count, not one a round was trying
        for done in range(0, total, PREFILL_CHUNK):
            end = min(done + PREFILL_CHUNK, total)
            tokens = torch.tensor([prompt[reuse + done : reuse + end]], dtype=torch.long, device=self.device)  # [1, T]
            logits = self._forward(tokens, reuse + done)
            self.cached = prompt[: reuse + end]  # a prefill stopped between chunks keeps what ran
            if progress is not None:
                progress(end, total)
        return logits

    def generate(
        self, prompt: Sequence[int], params: SamplingParams = SamplingParams(), stop_ids: Iterable[int] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids (stop tokens excluded); `last_stats` is filled when the iterator ends. One at a
        time per engine (one KV cache): a second one started while another is suspended raises GenerationError.
        progress(done, total): called as the prefill runs (the prompt tokens not reused from the cache), after each
        chunk of PREFILL_CHUNK tokens."""
        if self._generating:
            raise GenerationError("this engine is in the middle of another generate(): exhaust or close it first "
                                  "(two interleaved generations would write the same KV cache)")
        self._generating = True
        try:
            yield from self._generate(prompt, params, stop_ids, progress)
        finally:
            self._generating = False

    def _generate(self, prompt: Sequence[int], params: SamplingParams, stop_ids: Iterable[int] | None,
                  progress: Callable[[int, int], None] | None) -> Iterator[int]:
        prompt = list(prompt)
        if not prompt:
            raise GenerationError("the prompt is empty")
        if len(prompt) >= self.max_seq_len:
            raise GenerationError(
                f"the prompt has {len(prompt)} tokens but the context holds {self.max_seq_len}: "
                "shorten it (at least one token must fit after it)"
                + (f", or allocate more (--ctx, max_seq_len; this model's context is {ctx})"
                   if (ctx := self.model.config.context_length) > self.max_seq_len else "")
            )
        stop = frozenset(self.tokenizer.stop_token_ids if stop_ids is None else stop_ids)
        budget = min(params.max_new_tokens, self.max_seq_len - len(prompt))
        stats = self.last_stats = GenerationStats(prompt_tokens=len(prompt), finish_reason="cancelled")
        vocab = min(self.model.config.vocab_size, self.tokenizer.vocab_size)
        # no inference_mode around this generator body: it would stay on in the caller's code between yields
        t0 = time.perf_counter()
        logits = self._prefill(prompt, progress)
        sampler, step = self._sampler(params, vocab, prompt)
        token_t = sampler(logits)  # 0-d tensor: the first token, from the prefill's logits
        t_first = None
        for i in range(budget):
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
            token_t = self._timed_decode(token_t, len(self.cached), sampler, step, stats.decode_steps == 0)
            self.cached.append(token)
            stats.decode_steps += 1
