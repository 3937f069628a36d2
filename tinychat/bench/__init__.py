"""`tinychat bench`: prefill and decode speed, memory and effective bandwidth of a model, per dtype.

Two kinds of subject: a real model (loaded as `tinychat chat` loads it) or a known architecture shape with random
weights (`--shape`, optionally only its first `--layers N` decoder layers), which needs neither weights nor a
tokenizer. Each dtype in `--dtypes` (float32, bfloat16, float16, int4) is built, measured and freed in turn.

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

import dataclasses
import datetime
import gc
import json
import os
import platform
import random
import resource
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from tinychat.config import ModelConfig, RopeConfig
from tinychat.engine import Engine, SamplingParams
from tinychat.errors import TinychatError

if TYPE_CHECKING:  # pragma: no cover
    from tinychat.model import Transformer

__all__ = ["DTYPES", "SHAPES", "BenchOptions", "format_report", "main", "peak_rss_bytes", "random_model", "run_bench",
           "weight_bytes",
           "write_plot"]

# Public Hugging Face configs (config.json) of well-known models; random weights in these shapes need no download.
_LLAMA3_ROPE = {"theta": 500000.0, "type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
SHAPES: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                                num_heads=9, num_kv_heads=3, head_dim=64, rope=RopeConfig(theta=100000.0),
                                max_position_embeddings=8192, tie_word_embeddings=True),
    "smollm2-1.7b": ModelConfig(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_layers=24,
                                num_heads=32, num_kv_heads=32, head_dim=64, rope=RopeConfig(theta=130000.0),
                                max_position_embeddings=8192, tie_word_embeddings=True),
    "tinyllama-1.1b": ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                                  num_heads=32, num_kv_heads=4, head_dim=64, max_position_embeddings=2048),
    "qwen2.5-0.5b": ModelConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
                                num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6,
                                rope=RopeConfig(theta=1000000.0), max_position_embeddings=32768,
                                tie_word_embeddings=True, qkv_bias=True, architecture="Qwen2ForCausalLM"),
    "llama-3.2-1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                                num_heads=32, num_kv_heads=8, head_dim=64, rope=RopeConfig(factor=32.0, **_LLAMA3_ROPE),
                                max_position_embeddings=131072, tie_word_embeddings=True),
    "llama-2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                              num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096),
    "llama-2-13b": ModelConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                               num_heads=40, num_kv_heads=40, head_dim=128, max_position_embeddings=4096),
    "llama-3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                              num_heads=32, num_kv_heads=8, head_dim=128, rope=RopeConfig(theta=500000.0),
                              max_position_embeddings=8192),
    "llama-3.1-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                                num_heads=32, num_kv_heads=8, head_dim=128, rope=RopeConfig(factor=8.0, **_LLAMA3_ROPE),
                                max_position_embeddings=131072),
    "mistral-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                              num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=32768,
                              sliding_window=4096, architecture="MistralForCausalLM"),  # v0.1
    "qwen2-7b": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                            num_heads=28, num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6,
                            rope=RopeConfig(theta=1000000.0), max_position_embeddings=32768, qkv_bias=True,
                            architecture="Qwen2ForCausalLM"),  # the Instruct model's context
}

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES = (*FLOAT_DTYPES, "int4")
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "w4": "int4"}
DEFAULT_PROMPT_LENS = (32, 128, 512)
DEFAULT_CTX_LENS = (128, 512, 1024, 2048)
RANDOM_STD = 0.02  # float weights of a random model ~ N(0, 0.02^2), the usual initializer range


@dataclass(frozen=True)
class BenchOptions:
    dtypes: tuple[str, ...]
    prompt_lens: tuple[int, ...]
    ctx_lens: tuple[int, ...]
    decode_tokens: int = 32
    repeats: int = 3
    device: str = "cpu"
    act_dtype: str = "float32"  # int4 runs: the dtype of embeddings, norms, activations and KV cache
    seed: int = 0


@dataclass
class Subject:
    """One model under test: its engine, how its weights came about, the token ids it may be fed."""

    engine: Engine
    weights: str  # "random", "loaded", "awq" (an AWQ checkpoint) or "rtn" (round-to-nearest of the loaded weights)
    vocab: int


@dataclass(frozen=True)
class _NoTokenizer:
    """What the engine asks of a tokenizer, for a random model fed random token ids."""

    vocab_size: int
    stop_token_ids: frozenset = frozenset()


# ---- argument parsing ----


def parse_dtypes(text: str, flag: str = "--dtypes") -> tuple[str, ...]:
    out = []
    for name in (s.strip().lower() for s in text.split(",") if s.strip()):
        name = _ALIASES.get(name, name)
        if name not in DTYPES:
            raise TinychatError(f"unknown dtype {name!r} in {flag}; choose from {', '.join(DTYPES)}")
        if name not in out:
            out.append(name)
    if not out:
        raise TinychatError(f"{flag} is empty")
    return tuple(out)


def parse_lens(text: str, flag: str) -> tuple[int, ...]:
    try:
        lens = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise TinychatError(f"{flag} takes comma-separated token counts, got {text!r}") from None
    if not lens or min(lens) < 1:
        raise TinychatError(f"{flag} takes token counts >= 1, got {text!r}")
    return tuple(sorted(set(lens)))


def fit_lens(explicit: tuple[int, ...] | None, default: tuple[int, ...], limit: int, flag: str,
             what: str) -> tuple[int, ...]:
    """Lengths no greater than `limit`: explicit ones must fit (else an error), defaults are dropped if not."""
    if explicit is not None:
        too_long = [n for n in explicit if n > limit]
        if too_long:
            raise TinychatError(f"{flag} {too_long[0]} is beyond the model's context: {what} at most {limit}")
        return explicit
    fitting = tuple(n for n in default if n <= limit)
    return fitting or (limit,)


# ---- random models ----


def shape_config(name: str, layers: int | None) -> ModelConfig:
    cfg = SHAPES.get(name.lower())
    if cfg is None:
        raise TinychatError(f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}")
    if layers is not None:
        if layers < 1:
            raise TinychatError(f"--layers must be >= 1, got {layers}")
        cfg = dataclasses.replace(cfg, num_layers=min(layers, cfg.num_layers))
    return cfg


def _group_size(cfg: ModelConfig) -> int:
    from tinychat.quant.pipeline import GROUP_SIZES

    features = (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size)
    for g in GROUP_SIZES:
        if all(k % g == 0 for k in features):
            return g
    raise TinychatError(f"no group size among {GROUP_SIZES} divides the linears' in_features {features}")


@torch.no_grad()
def random_model(cfg: ModelConfig, dtype: str, device: str | torch.device = "cpu", act_dtype: str = "float32",
                 seed: int = 0) -> Transformer:
    """A Transformer of `cfg` with random weights, built in place on `device` (no float copy of a 4-bit model).

    Float dtypes: weights ~ N(0, 0.02^2) in that dtype. "int4": every decoder linear a WQLinear with random 4-bit
    values, zero point 8 and scales near 0.0045 (so that weights have a std near 0.02), the rest in `act_dtype`.
    Norm weights are ones and biases zeros.
    """
    from tinychat.model import Transformer
    from tinychat.quant.linear import LAYER_LINEARS, WQLinear

    device = torch.device(device)
    float_dtype = FLOAT_DTYPES[act_dtype if dtype == "int4" else dtype]
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    with torch.device("meta"):  # shapes only: nothing is allocated until each tensor is filled below
        model = Transformer(cfg)
    if dtype == "int4":
        group = _group_size(cfg)
        for layer in model.layers:
            for name in LAYER_LINEARS:
                parent, attr = name.split(".")
                meta = getattr(getattr(layer, parent), attr)
                q = WQLinear(meta.in_features, meta.out_features, group, meta.bias is not None, device=device,
                             dtype=float_dtype)
                q.qweight.random_(0, 256, generator=gen)  # [N, K/2]: two random 4-bit values per byte
                q.scales.uniform_(0.003, 0.006, generator=gen)  # [N, K/G]
                q.zeros.fill_(8.0)  # [N, K/G]
                setattr(getattr(layer, parent), attr, q)
    model.tie_weights()  # before filling: a tied lm_head is the embedding, not a second random matrix
    made: dict[int, nn.Parameter] = {}  # id of a meta parameter -> its real one (shared parameters stay shared)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in made:
                t = torch.empty(p.shape, dtype=float_dtype, device=device)
                if name == "bias":
                    t.zero_()
                elif p.dim() == 1:  # RMSNorm weights
                    t.fill_(1.0)
                else:
                    t.normal_(0.0, RANDOM_STD, generator=gen)
                made[id(p)] = nn.Parameter(t, requires_grad=False)
            module._parameters[name] = made[id(p)]
    model.cos_sin = model.cos_sin.to(device)  # [context, D] fp32, built for real on the CPU by the constructor
    return model.eval()


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
    from tinychat.quant.linear import LAYER_LINEARS

    linears = sum(_tensor_bytes(layer.get_submodule(n), set()) for layer in model.layers for n in LAYER_LINEARS)
    layers = [_tensor_bytes(layer, set()) for layer in model.layers]
    total = _tensor_bytes(model, set())
    return {"model_bytes": total, "linear_bytes": linears, "layer_bytes": layers[0] if layers else 0,
            "other_bytes": total - sum(layers)}


# ---- loading ----


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TinychatError(f"unknown --device {name!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TinychatError(f"--device {name}: no CUDA device is available here")
    return device


def _check_int4_runs(device: torch.device) -> None:
    """Fail early, in one line, where the int4 op has no kernel (CUDA, for now)."""
    from tinychat.quant.linear import WQLinear

    probe = WQLinear(64, 8, 32, device=device)
    try:
        with torch.inference_mode():
            probe(torch.zeros(1, 64, device=device))
    except (RuntimeError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TinychatError(f"int4 does not run on {device} here: {first}") from None


def _random_subject(cfg: ModelConfig, dtype: str, opts: BenchOptions, max_seq_len: int) -> Subject:
    model = random_model(cfg, dtype, opts.device, opts.act_dtype, opts.seed)
    return Subject(Engine(model, _NoTokenizer(cfg.vocab_size), max_seq_len), "random", cfg.vocab_size)


def _real_subject(args, dtype: str, opts: BenchOptions, max_seq_len: int, awq_int4: bool) -> Subject:
    from tinychat.api import load

    common = {"device": opts.device, "threads": args.threads, "max_seq_len": max_seq_len, "verbose": True}
    if dtype == "int4" and awq_int4:
        llm = load(args.model, dtype=opts.act_dtype, quant="awq", **common)
        weights = "awq"
    else:
        llm = load(args.model, dtype=opts.act_dtype if dtype == "int4" else dtype, quant="none", **common)
        weights = "loaded"
        if dtype == "int4":
            _rtn_in_place(llm.engine.model)
            weights = "rtn"
    engine = llm.engine
    return Subject(engine, weights, min(engine.model.config.vocab_size, llm.tokenizer.vocab_size))


def _rtn_in_place(model) -> None:
    """Round-to-nearest 4-bit quantization of every decoder linear (no search: a speed bench, not a quality one)."""
    from tinychat.quant.awq import quantize_model
    from tinychat.quant.linear import quantize_model_layers
    from tinychat.quant.pipeline import auto_group_size
    from tinychat.quant.quantize import QuantConfig

    qcfg = QuantConfig(4, auto_group_size(model))
    qdict = quantize_model(model, None, qcfg, method="rtn", progress=False)
    quantize_model_layers(model, qdict, qcfg)


# ---- measurement ----


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


def bench_subject(subject: Subject, dtype: str, opts: BenchOptions, log) -> dict:
    engine, device = subject.engine, subject.engine.device
    rng = random.Random(opts.seed)
    sizes = weight_bytes(engine.model)
    prefill, decode = [], []
    for n in opts.prompt_lens:
        r = measure_prefill(engine, [rng.randrange(subject.vocab) for _ in range(n)], opts.repeats)
        log(f"{dtype}: prefill {n:>5} tokens  {r['tok_s']:10.1f} tok/s  TTFT {r['ttft_s'] * 1000:9.1f} ms")
        prefill.append(r)
    for n in opts.ctx_lens:
        r = measure_decode(engine, [rng.randrange(subject.vocab) for _ in range(n)], opts.decode_tokens, opts.repeats)
        r["gb_s"] = sizes["model_bytes"] * r["tok_s"] / 1e9
        log(f"{dtype}: decode at {n:>5}      {r['tok_s']:10.1f} tok/s  {r['ms_per_token']:9.1f} ms/token")
        decode.append(r)
    mem, kind = peak_memory(device)
    return {"dtype": dtype, "weights": subject.weights, **sizes, "peak_memory_bytes": mem, "peak_memory_kind": kind,
            "prefill": prefill, "decode": decode}


def _add_estimates(result: dict, full_layers: int) -> None:
    """For a model cut to its first n layers: full-model figures. Weight bytes are exact (every layer has the same
    shapes); decode tok/s is scaled by weight bytes (decode is bandwidth-bound), prefill TTFT by the layer count
    (the embedding lookup and the one-token lm_head are small next to the layers). Both are estimates."""
    n = result["layers"]
    for r in result["results"]:
        full = r["other_bytes"] + full_layers * r["layer_bytes"]
        r["full_model_bytes"] = full
        for d in r["decode"]:
            d["est_full_tok_s"] = d["tok_s"] * r["model_bytes"] / full
        for p in r["prefill"]:
            p["est_full_tok_s"] = p["tok_s"] * n / full_layers


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


def run_bench(args, log=None) -> dict:
    """Build each subject in turn, measure it, free it; return the whole result (what --json writes)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.shape is not None and args.model is not None:
        raise TinychatError("give a MODEL or --shape, not both")
    if args.layers is not None and args.shape is None:
        raise TinychatError("--layers applies to --shape (a random-weight model)")
    for flag, value in (("--repeats", args.repeats), ("--decode-tokens", args.decode_tokens)):
        if value < 1:
            raise TinychatError(f"{flag} must be >= 1, got {value}")
    act_dtype = _ALIASES.get(args.dtype.lower(), args.dtype.lower()) if args.dtype else "float32"
    if act_dtype not in FLOAT_DTYPES:
        raise TinychatError(f"unknown --dtype {args.dtype!r} (the float dtype of what int4 runs keep unquantized); "
                            f"choose from {', '.join(FLOAT_DTYPES)}; compare dtypes with --dtypes")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)

    awq_int4 = False
    if args.shape is not None:
        full_cfg = SHAPES.get(args.shape.lower())
        cfg = shape_config(args.shape, args.layers)
        name, source = args.shape.lower(), "random weights"
        default_dtypes: tuple[str, ...] = ("int4",)
    else:
        from tinychat.io.loader import read_source_config, resolve_source

        path = resolve_source(args.model)
        source_cfg = read_source_config(path)
        cfg = full_cfg = ModelConfig.from_hf(source_cfg, source=str(path))
        prequantized = source_cfg.get("quantization_config") is not None
        awq_int4 = prequantized or args.quant == "awq" or (args.quant == "auto" and args.model is None)
        name, source = path.name, str(path)
        default_dtypes = ("int4",) if awq_int4 else (act_dtype,)
    dtypes = parse_dtypes(args.dtypes) if args.dtypes else default_dtypes
    if args.shape is None and prequantized and any(d != "int4" for d in dtypes):
        raise TinychatError(f"{path} is a 4-bit AWQ checkpoint: it runs as int4 only; to compare dtypes, bench the "
                            "full-precision model")

    ctx, n_dec = cfg.context_length, args.decode_tokens
    prompt_lens = fit_lens(parse_lens(args.prompt_lens, "--prompt-lens") if args.prompt_lens else None,
                           DEFAULT_PROMPT_LENS, ctx - 1, "--prompt-lens", f"{ctx} tokens hold a prompt of")
    ctx_lens = fit_lens(parse_lens(args.ctx_lens, "--ctx-lens") if args.ctx_lens else None, DEFAULT_CTX_LENS,
                        ctx - n_dec - 1, "--ctx-lens", f"with --decode-tokens {n_dec}, {ctx} tokens hold a context of")
    if min(ctx_lens) < 1:
        raise TinychatError(f"--decode-tokens {n_dec} leaves no room in the model's context of {ctx} tokens")
    opts = BenchOptions(dtypes, prompt_lens, ctx_lens, n_dec, args.repeats, str(device), act_dtype)
    max_seq_len = max(max(prompt_lens) + 1, max(ctx_lens) + n_dec + 1)  # the KV cache holds the longest run
    if "int4" in dtypes:
        _check_int4_runs(device)
    if args.plot:
        _matplotlib()  # fail before the measurements, not after

    truncated = cfg.num_layers < full_cfg.num_layers
    if truncated:
        log(f"{name}: building the first {cfg.num_layers} of its {full_cfg.num_layers} decoder layers")
    results = []
    for dtype in dtypes:
        _free(device)
        if args.shape is not None:
            subject = _random_subject(cfg, dtype, opts, max_seq_len)
        else:
            subject = _real_subject(args, dtype, opts, max_seq_len, awq_int4)
        results.append(bench_subject(subject, dtype, opts, log))
        del subject
    _free(device)

    result = {
        "benchmark": "tinychat bench",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": name,
        "source": source,
        "layers": cfg.num_layers,
        "total_layers": full_cfg.num_layers,
        "truncated": truncated,
        "config": dataclasses.asdict(full_cfg),
        "settings": {**dataclasses.asdict(opts), "warmup_runs": 1, "sampling": "greedy, no stop tokens",
                     "kv_cache_tokens": max_seq_len},
        "machine": machine_info(device),
        "results": results,
    }
    if truncated:
        _add_estimates(result, full_cfg.num_layers)
    return result


# ---- output ----


def format_table(columns: list[str], rows: list[list]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(columns))]

    def line(values):
        padded = (v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))
        return "  ".join(padded).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"
    return str(v)


_WEIGHTS = {"random": "random", "loaded": "as loaded", "awq": "AWQ 4-bit", "rtn": "RTN 4-bit of the loaded weights"}


def format_report(result: dict) -> str:
    s, m = result["settings"], result["machine"]
    cut = result["truncated"]
    layers = (f"first {result['layers']} of {result['total_layers']} layers" if cut
              else f"{result['layers']} layers")
    threads = f"{m['threads']} thread{'s' * (m['threads'] != 1)}"
    head = [f"tinychat bench: {result['model']} ({result['source']}, {layers})",
            (f"{m['device_name']}, {threads}, torch {m['torch']}; warm-up excluded, median of {s['repeats']}; "
             f"decode: {s['decode_tokens']} greedy tokens after a prefill to the context length")]
    est = ["est. full tok/s"] if cut else []
    rows = []
    for r in result["results"]:
        for p in r["prefill"]:
            rows.append([r["dtype"], "prefill", p["prompt_len"], p["tok_s"], p["ttft_s"] * 1000, None]
                        + ([p["est_full_tok_s"]] if cut else []))
        for d in r["decode"]:
            rows.append([r["dtype"], "decode", d["ctx_len"], d["tok_s"], d["ms_per_token"], d["gb_s"]]
                        + ([d["est_full_tok_s"]] if cut else []))
    speed = format_table(["dtype", "phase", "tokens", "tok/s", "ms (TTFT | per token)", "GB/s", *est], rows)
    mb = 1e6
    size_rows = [[r["dtype"], _WEIGHTS[r["weights"]], r["model_bytes"] / mb, r["linear_bytes"] / mb,
                  r["peak_memory_bytes"] / mb] + ([r["full_model_bytes"] / mb] if cut else [])
                 for r in result["results"]]
    mem_kind = result["results"][0]["peak_memory_kind"]
    sizes = format_table(["dtype", "weights", "model MB", "linears MB", "peak memory MB",
                          *(["full model MB"] if cut else [])], size_rows)
    notes = [("tokens: prompt length (prefill) or context length (decode); GB/s = model bytes x decode tok/s; "
              f"peak memory: {mem_kind}")]
    if any(r["weights"] == "rtn" for r in result["results"]):
        notes.append("int4 (RTN): round-to-nearest 4-bit of the loaded weights, no AWQ search; the same layout and op, "
                     "so the same speed, as an AWQ checkpoint")
    if cut:
        notes.append(f"measured on {layers}; est. full: decode scaled by weight bytes, prefill by layer count "
                     "(estimates, not measurements)")
    return "\n".join([*head, "", speed, "", sizes, "", *notes])


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise TinychatError("--plot needs matplotlib: pip install matplotlib (or the tinychat[bench] extra)") from None
    return matplotlib


def write_plot(result: dict, path: str | os.PathLike) -> Path:
    """Decode tok/s against context length and prefill tok/s against prompt length, one line per dtype (PNG)."""
    _matplotlib()
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_dec, ax_pre = fig.subplots(1, 2)
    for r in result["results"]:
        label = f"{r['dtype']} ({r['weights']})"
        ax_dec.plot([d["ctx_len"] for d in r["decode"]], [d["tok_s"] for d in r["decode"]], marker="o", label=label)
        ax_pre.plot([p["prompt_len"] for p in r["prefill"]], [p["tok_s"] for p in r["prefill"]], marker="o",
                    label=label)
    settings = result["settings"]
    for ax, title, xlabel, lens in ((ax_dec, "decode", "context length (tokens)", settings["ctx_lens"]),
                                    (ax_pre, "prefill", "prompt length (tokens)", settings["prompt_lens"])):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lens, labels=[str(n) for n in lens])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tok/s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    cut = f", first {result['layers']} of {result['total_layers']} layers" if result["truncated"] else ""
    fig.suptitle(f"{result['model']}{cut} on {result['machine']['device_name']} "
                 f"({result['machine']['threads']} thread{'s' * (result['machine']['threads'] != 1)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, format="png")
    return path


def main(args) -> int:
    """`tinychat bench` (tinychat/cli.py parses the arguments)."""
    result = run_bench(args)
    print(format_report(result))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    if args.plot:
        print(f"wrote {write_plot(result, args.plot)}", file=sys.stderr)
    return 0
