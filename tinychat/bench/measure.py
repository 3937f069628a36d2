"""Measurements of one model: prefill and decode speed, peak memory, weight sizes, and the machine.

Every measurement runs the engine's own loop (prefill, greedy sampling, one host sync per token) on random token
ids, with no stop tokens: one warm-up run, then the median of `--repeats` runs.

* prefill: a fresh cache, a prompt of L tokens, one token sampled; TTFT = that time, prefill tok/s = L / TTFT.
* decode at context L: the cache is filled with L tokens (a prefill), then N = `--decode-tokens` greedy steps are
  timed; tok/s = N / their time. Repeats reuse the filled cache (the engine prefills only the last prompt token).
* model bytes: parameters and persistent buffers (weights, 4-bit scales and zeros), not the KV cache or the rope
  table; effective GB/s = model bytes x decode tok/s / 1e9 (decode reads every weight once per token).
* peak memory: the process's peak RSS on a CPU (process-wide and never lowered, so a later dtype's figure covers
  the earlier ones); torch.cuda.max_memory_allocated on CUDA, reset before each dtype.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from tinychat.engine import Engine, SamplingParams
from tinychat.errors import TinychatError
from tinychat.model import linear_names

# ---- timing ----


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(engine: Engine, prompt: list[int], new_tokens: int):
    """One greedy generation with no stop tokens; returns the engine's stats."""
    _sync(engine.device)
    n = sum(1 for _ in engine.generate(prompt, SamplingParams(max_new_tokens=new_tokens), stop_ids=()))
    stats = engine.last_stats
    if n != new_tokens:
        raise TinychatError(f"expected {new_tokens} generated tokens, got {n}")
    return stats


def measure_prefill(engine: Engine, prompt: list[int], repeats: int) -> dict:
    """TTFT of a prompt on an empty cache: one warm-up, then the median of `repeats`."""
    times = []
    for i in range(repeats + 1):
        engine.reset()  # nothing reused: the whole prompt runs
        s = _run(engine, prompt, 1)
        if i:
            times.append(s.prefill_s)
    ttft = statistics.median(times)
    return {"prompt_len": len(prompt), "ttft_s": ttft, "tok_s": len(prompt) / ttft, "ttft_s_runs": times}


def measure_decode(engine: Engine, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """Decode speed with len(prompt) tokens in the cache: the warm-up fills it; each repeat then prefills only the
    last prompt token (the engine reuses the rest) and times `new_tokens` decode steps."""
    engine.reset()
    times = []
    for i in range(repeats + 1):
        s = _run(engine, prompt, new_tokens + 1)  # the first token comes from the prefill
        if i:
            times.append(s.decode_s / s.decode_steps)
    per_token = statistics.median(times)
    return {"ctx_len": len(prompt), "tok_s": 1.0 / per_token, "ms_per_token": per_token * 1000,
            "ms_per_token_runs": [t * 1000 for t in times]}


# ---- memory ----


def peak_rss_bytes() -> int:
    """This process's peak resident set. Linux: VmHWM, which (unlike getrusage's ru_maxrss) does not carry over the
    peak of the parent that started this process; elsewhere ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024)


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated (this dtype)"
    return peak_rss_bytes(), "peak RSS (process-wide, so far)"


# ---- sizes ----


def _tensor_bytes(module: nn.Module, seen: set[int]) -> int:
    total = 0
    persistent = [b for m in module.modules() for n, b in m._buffers.items()
                  if b is not None and n not in m._non_persistent_buffers_set]  # not the KV cache, not the rope table
    for t in [*module.parameters(), *persistent]:
        if t.data_ptr() not in seen:  # tied weights count once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def weight_bytes(model) -> dict[str, int]:
    """model_bytes: every weight; linear_bytes: the decoder linears (what 4 bits shrink); layer_bytes: one decoder
    layer; other_bytes: embeddings, final norm, lm_head."""
    linears = sum(_tensor_bytes(model.get_submodule(name), set()) for name in linear_names(model.config))
    layers = [_tensor_bytes(layer, set()) for layer in model.layers]
    total = _tensor_bytes(model, set())
    return {"model_bytes": total, "linear_bytes": linears, "layer_bytes": layers[0] if layers else 0,
            "other_bytes": total - sum(layers)}


# ---- the machine ----


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu}
