"""Shared pieces of the benchmark scripts: machine description, timing, JSON + table output."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

PROMPT_TEXT = (
    "The history of computing is a story of making machines smaller, cheaper and closer to the people who use them. "
    "Early computers filled rooms and were shared by whole universities; programs were written on punched cards and "
    "results came back hours later. The transistor, the integrated circuit and then the microprocessor shrank the "
    "machine onto a single chip, and by the nineteen eighties a computer could sit on a desk at home. Each step was "
    "driven by the same idea: put the computation where the person is. Language models are now on the same path. "
    "The first large models ran only in data centres with racks of accelerators, but quantization, careful kernels "
    "and small, well-trained models are moving them onto laptops and phones. Four-bit weights cut the memory a model "
    "needs by a factor of four compared with sixteen-bit floating point, and since generating each token reads every "
    "weight once, fewer bytes mean faster answers. The challenge is to keep the quality while throwing away bits, "
    "and to write kernels that turn the saved bytes into saved time on the hardware people actually own."
)


def cuda_problem(script: str) -> str | None:
    """Why `script` cannot time tinychat's CUDA kernels on this machine (no GPU, or an extension built without
    them), or None when it can."""
    if not torch.cuda.is_available():
        return f"{script}: no CUDA GPU here (torch.cuda.is_available() is False); this benchmark needs one."
    import tinychat._C

    from tinychat import ops

    if not ops.EXTENSION_AVAILABLE or not tinychat._C.WITH_CUDA:
        return (f"{script}: tinychat._C is not built with its CUDA kernels "
                "(TINYCHAT_CUDA=1 pip install --no-build-isolation -e .)")
    return None


def cuda_time_us(calls, repeats: int, inner: int) -> float:
    """Median over `repeats` of the mean time of `inner` back-to-back calls, cycling through `calls` (zero-argument
    functions, one per weight copy), by CUDA events (microseconds)."""
    for fn in calls[: min(len(calls), 3)]:
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(inner):
            calls[i % len(calls)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / inner)
    return statistics.median(times)


def machine_info() -> dict:
    """CPU name, threads, torch and Python versions, and the GPU's name where one is used."""
    from tinychat.bench import machine_info as describe

    return describe(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def prompt_ids(encode, n: int) -> list[int]:
    """The first n token ids of PROMPT_TEXT (repeated as needed); encode(text) -> ids, without special tokens."""
    ids = encode(PROMPT_TEXT)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def time_generation(engine, prompt: list[int], new_tokens: int, repeats: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of a tinychat Engine: `new_tokens` greedy tokens, no stop tokens, from an
    empty cache; one warm-up run, then the medians of `repeats`."""
    from tinychat.engine import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens)
    prefill, decode = [], []
    for i in range(repeats + 1):  # the first run is a warm-up
        engine.reset()
        n = sum(1 for _ in engine.generate(prompt, params, stop_ids=()))
        assert n == new_tokens, n
        if i:
            prefill.append(engine.last_stats.prefill_tok_s)
            decode.append(engine.last_stats.decode_tok_s)
    return statistics.median(prefill), statistics.median(decode)


def median_time(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` runs (fn is warmed up by the caller)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def emit(result: dict, columns: list[str], out: str | None) -> None:
    """Print a table of result['rows'] and the JSON; write the JSON to `out` when given."""
    rows = result["rows"]
    widths = [max([len(c)] + [len(_fmt(r.get(c))) for r in rows]) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def _fmt(v) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)
