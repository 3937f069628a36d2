"""`tinychat bench`: prefill and decode speed, memory and effective bandwidth of a model, per dtype.

Two kinds of subject: a real model (loaded as `tinychat chat` loads it) or a known architecture shape with random
weights (`--shape`, optionally only its first `--layers N` decoder layers), which needs neither weights nor a
tokenizer. Each dtype in `--dtypes` (float32, bfloat16, float16, int4) is built, measured and freed in turn.

The package's modules: `shapes` (the known shapes), `random_model` (random weights in a shape), `measure` (what is
measured, and how), `report` (the text report and the plot); this one parses the options, builds each subject and
runs the whole bench.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tinychat.api import load
from tinychat.bench.measure import (machine_info, measure_decode, measure_prefill, peak_memory, peak_rss_bytes,
                                    weight_bytes)
from tinychat.bench.random_model import FLOAT_DTYPES, random_model
from tinychat.bench.report import _matplotlib, format_report, write_plot
from tinychat.bench.shapes import SHAPES, shape_config
from tinychat.config import ModelConfig
from tinychat.engine import Engine
from tinychat.errors import TinychatError
from tinychat.io.loader import ModelSource, open_source
from tinychat.linear import WQLinear
from tinychat.quant.awq import quantize_model
from tinychat.quant.quantize import QuantConfig, auto_group_size, quantize_model_layers

__all__ = ["DTYPES", "SHAPES", "BenchOptions", "format_report", "main", "peak_rss_bytes", "random_model", "run_bench",
           "weight_bytes", "write_plot"]

DTYPES = (*FLOAT_DTYPES, "int4")
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "w4": "int4"}
DEFAULT_PROMPT_LENS = (32, 128, 512)
DEFAULT_CTX_LENS = (128, 512, 1024, 2048)


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
    weights: str  # "random", "loaded", "gguf-blocks" (a GGUF as stored), "awq" or "rtn" (rounded from "loaded")
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
    probe = WQLinear(64, 8, 32, device=device)
    try:
        with torch.inference_mode():
            probe(torch.zeros(1, 64, device=device))
    except (RuntimeError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TinychatError(f"int4 does not run on {device} here: {first}") from None


def _random_subject(cfg: ModelConfig, dtype: str, opts: BenchOptions, max_seq_len: int,
                    tune_threads: bool) -> Subject:
    model = random_model(cfg, dtype, opts.device, opts.act_dtype, opts.seed)
    engine = Engine(model, _NoTokenizer(cfg.vocab_size), max_seq_len, tune_threads=tune_threads)
    return Subject(engine, "random", cfg.vocab_size)


def _real_subject(src: ModelSource, args, dtype: str, opts: BenchOptions, max_seq_len: int, plan: str) -> Subject:
    """The model of `src` for one dtype of the bench. int4: as `plan` (ModelSource.plan) runs it quantized (a GGUF's
    blocks, an AWQ checkpoint or AWQ on first use), or rounded to nearest from float when it runs in float."""
    common = {"device": opts.device, "threads": args.threads, "max_seq_len": max_seq_len, "verbose": True}
    if dtype == "int4" and plan == "blocks":
        llm = load(src, dtype=opts.act_dtype, quant="auto", **common)
        weights = "gguf-blocks"
    elif dtype == "int4" and plan in ("checkpoint", "awq"):
        llm = load(src, dtype=opts.act_dtype, quant="awq", **common)
        weights = "awq"
    else:
        llm = load(src, dtype=opts.act_dtype if dtype == "int4" else dtype, quant="none", **common)
        weights = "loaded"
        if dtype == "int4":
            _rtn_in_place(llm.engine.model)
            weights = "rtn"
    engine = llm.engine
    return Subject(engine, weights, min(engine.model.config.vocab_size, llm.tokenizer.vocab_size))


def _rtn_in_place(model) -> None:
    """Round-to-nearest 4-bit quantization of every decoder linear (no search: a speed bench, not a quality one)."""
    qcfg = QuantConfig(4, auto_group_size(model.config))
    qdict = quantize_model(model, None, qcfg, method="rtn", progress=False)
    quantize_model_layers(model, qdict, qcfg)


# ---- the run ----


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

    plan = "none"
    if args.shape is not None:
        full_cfg = SHAPES.get(args.shape.lower())
        cfg = shape_config(args.shape, args.layers)
        name, source = args.shape.lower(), "random weights"
        default_dtypes: tuple[str, ...] = ("int4",)
    else:
        src = open_source(args.model)  # the header only; the weights load per dtype below
        path, cfg = src.path, src.config
        full_cfg = cfg
        prequantized = src.quantized
        plan = src.plan(args.quant)
        name, source = path.name, str(path)
        default_dtypes = (act_dtype,) if plan == "none" else ("int4",)
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
            subject = _random_subject(cfg, dtype, opts, max_seq_len, tune_threads=not args.threads)
        else:
            subject = _real_subject(src, args, dtype, opts, max_seq_len, plan)
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
