"""End-to-end speed on a CUDA GPU: tinychat int4 and fp16 against Hugging Face transformers fp16, same shapes.

Llama-2-7B- and Llama-3-8B-shaped models with random weights (no download): tinychat int4 (4-bit decoder linears,
fp16 elsewhere, built directly in the int4 layout by tinychat.bench.random_model), tinychat fp16, and transformers
fp16 (LlamaConfig + AutoModelForCausalLM.from_config, random init on the GPU). Per model:

* decode tok/s at context 4, 1024 and 4096: the cache filled by a prefill, then --decode-tokens greedy tokens timed
  from the first to the last (tinychat.bench.measure_decode; transformers: the same span, from a streamer's
  per-token timestamps). tinychat is timed with CUDA-graph decoding (the default) and eagerly (cuda_graphs=False).
* TTFT for prompts of 256, 1024 and 4096 tokens on an empty cache: prefill and first token
  (tinychat.bench.measure_prefill; transformers: generate() until its first token).
* peak memory: torch.cuda.max_memory_allocated over that model's runs.

One warm-up run, then the median of --repeats. Llama 2's context is 4096 tokens: here its shape's context is raised
until 4096 tokens of context plus the decoded ones fit (a longer rope table; nothing else changes).

Goals (H100), each checked in the JSON: the Llama-2-7B shape in int4 decodes >= 600 tok/s at the shortest context
and >= 3x transformers fp16 there; int4 TTFT <= 1.3x the compute bound, 2 x (decoder linear parameters) x prompt
tokens / the GPU's peak dense fp16 tensor FLOP/s (nominal datasheet numbers, PEAK_FP16_TFLOPS; attention FLOPs and
the one-token lm_head are left out). The GPU name, clocks (nvidia-smi), torch and transformers versions are recorded.

    python benchmarks/bench_cuda_e2e.py
    python benchmarks/bench_cuda_e2e.py --shapes llama-2-7b --no-hf --repeats 5 --out /tmp/e2e.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import random
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_cuda_int4 import device_info, gpu_slug, parse_ints
from common import cuda_problem, emit, machine_info  # noqa: E402

DEFAULT_SHAPES = ("llama-2-7b", "llama-3-8b")
CTX_LENS = (4, 1024, 4096)
PROMPT_LENS = (256, 1024, 4096)

# Nominal peak dense fp16 tensor-core FLOP/s (fp32 accumulate; datasheets, no sparsity), by GPU name: the first
# pattern that matches torch.cuda.get_device_name() wins, so the specific ones come first.
PEAK_FP16_TFLOPS = (
    (r"GH200|H200", 989.0, "H200 / GH200"),
    (r"H100.*PCIe", 756.0, "H100 PCIe"),
    (r"H100.*NVL", 835.0, "H100 NVL"),
    (r"H100|H800", 989.0, "H100 SXM"),
    (r"B200", 2250.0, "B200"),
    (r"A100|A800", 312.0, "A100"),
    (r"L40S", 362.0, "L40S"),
    (r"\bL4\b", 121.0, "L4"),
    (r"\bA10\b", 125.0, "A10"),
)

GOAL_DECODE_TOK_S = 600.0  # llama-2-7b int4 (graphs) at the shortest context
GOAL_VS_HF = 3.0  # int4 decode tok/s / transformers fp16, shortest context
GOAL_TTFT_OF_BOUND = 1.3  # int4 TTFT / compute bound


# ---- pure helpers (no GPU) ----


def peak_fp16_tflops(gpu_name: str) -> tuple[float, str] | None:
    """(nominal peak dense fp16 TFLOP/s, the table entry) for a GPU name, or None when the table lacks it."""
    for pattern, tflops, label in PEAK_FP16_TFLOPS:
        if re.search(pattern, gpu_name, re.IGNORECASE):
            return tflops, label
    return None


def linear_params(cfg) -> int:
    """Weights of the decoder layers' linears (q/k/v, o, gate/up, down), which every prompt token multiplies."""
    h, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = cfg.hidden_size * (h + 2 * kv) + h * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * per_layer


def compute_bound_s(params: int, tokens: int, peak_tflops: float) -> float:
    """Seconds that 2 x params x tokens FLOPs take at the peak rate: no prefill can be faster."""
    return 2 * params * tokens / (peak_tflops * 1e12)


def bench_config(name: str, ctx_needed: int):
    """The shape's ModelConfig (tinychat.bench.SHAPES), its context raised to ctx_needed if it is shorter."""
    from tinychat.bench import shape_config

    cfg = shape_config(name, None)
    if cfg.context_length < ctx_needed:
        cfg = dataclasses.replace(cfg, max_position_embeddings=ctx_needed)
    return cfg


def hf_config(cfg):
    """transformers.LlamaConfig of the same shape (plain rope theta: the shapes benched here have no scaling)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                       head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
                       rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope.theta,
                       tie_word_embeddings=cfg.tie_word_embeddings)


def goal_checks(rows: list[dict], peak: float | None) -> list[dict]:
    """The goals of the module docstring against the rows: {goal, shape, value, target, ok}."""
    checks = []
    by = {(r["shape"], r["engine"], r["phase"], r["tokens"]): r for r in rows}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        ctxs = sorted(r["tokens"] for r in rows if r["shape"] == shape and r["phase"] == "decode")
        short = ctxs[0] if ctxs else None
        ours = by.get((shape, "tinychat int4 graphs", "decode", short))
        hf = by.get((shape, "transformers fp16", "decode", short))
        if ours and shape == "llama-2-7b":
            checks.append({"goal": f"int4 decode tok/s at context {short}", "shape": shape,
                           "value": round(ours["tok_s"], 1), "target": GOAL_DECODE_TOK_S,
                           "ok": ours["tok_s"] >= GOAL_DECODE_TOK_S})
        if ours and hf:
            ratio = ours["tok_s"] / hf["tok_s"]
            checks.append({"goal": f"int4 decode / transformers fp16 at context {short}", "shape": shape,
                           "value": round(ratio, 2), "target": GOAL_VS_HF, "ok": ratio >= GOAL_VS_HF})
        for r in rows:
            if r["shape"] == shape and r["engine"] == "tinychat int4 graphs" and r["phase"] == "prefill" and peak:
                ratio = r["ttft_s"] / r["compute_bound_s"]
                checks.append({"goal": f"int4 TTFT / compute bound, {r['tokens']} tokens", "shape": shape,
                               "value": round(ratio, 2), "target": GOAL_TTFT_OF_BOUND,
                               "ok": ratio <= GOAL_TTFT_OF_BOUND, "lower_is_better": True})
    return checks


# ---- measurement ----


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def bench_tinychat(cfg, dtype: str, shape: str, args, rng: random.Random, log) -> list[dict]:
    """Rows for tinychat in `dtype` ("int4": fp16 activations): TTFT, then decode with and without CUDA graphs."""
    from tinychat.bench import (
        _NoTokenizer,
        measure_decode,
        measure_prefill,
        random_model,
        weight_bytes,
    )
    from tinychat.engine import Engine

    max_seq_len = max(max(args.prompt_lens) + 1, max(args.ctx_lens) + args.decode_tokens + 1)
    model = random_model(cfg, dtype, "cuda", act_dtype="float16")
    nbytes = weight_bytes(model)["model_bytes"]
    rows = []
    for graphs in (True, False) if args.eager else (True,):
        engine = Engine(model, _NoTokenizer(cfg.vocab_size), max_seq_len, cuda_graphs=graphs)
        name = f"tinychat {'int4' if dtype == 'int4' else 'fp16'} {'graphs' if graphs else 'eager'}"
        base = {"shape": shape, "engine": name, "model_bytes": nbytes}
        if graphs:  # the prefill is eager either way: timed once
            for n in args.prompt_lens:
                r = measure_prefill(engine, [rng.randrange(cfg.vocab_size) for _ in range(n)], args.repeats)
                rows.append({**base, "phase": "prefill", "tokens": n, "ttft_s": r["ttft_s"], "tok_s": r["tok_s"]})
                log(rows[-1])
        for n in args.ctx_lens:
            r = measure_decode(engine, [rng.randrange(cfg.vocab_size) for _ in range(n)], args.decode_tokens,
                               args.repeats)
            rows.append({**base, "phase": "decode", "tokens": n, "tok_s": r["tok_s"], "ms_per_token":
                         r["ms_per_token"], "gb_s": nbytes * r["tok_s"] / 1e9, "graph_captures":
                         engine.graph_captures, "graph_error": engine.graph_error})
            log(rows[-1])
        del engine
    peak = torch.cuda.max_memory_allocated()
    for r in rows:
        r["peak_memory_bytes"] = peak
    del model
    return rows


class _TokenTimes:
    """A transformers streamer that timestamps each put(): the prompt first, then every new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:  # generate() hands over value.cpu(): the token is there when this runs
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_generate(model, ids: list[int], new_tokens: int, cache: str) -> tuple[float, float]:
    """One greedy generate() of new_tokens from an empty cache: (TTFT s, s per decoded token after the first)."""
    x = torch.tensor([ids], device="cuda")
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    timer = _TokenTimes()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0, streamer=timer, **extra)
    new = timer.times[1:]
    if len(new) != new_tokens:
        raise RuntimeError(f"transformers generated {len(new)} tokens, expected {new_tokens}")
    per_token = (new[-1] - new[0]) / (new_tokens - 1) if new_tokens > 1 else float("nan")
    return new[0] - t0, per_token


def bench_hf(cfg, shape: str, args, rng: random.Random, log) -> list[dict]:
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):  # random init on the GPU: a 7B model initialized on a CPU takes minutes
        try:
            model = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=torch.float16)
        except TypeError:  # transformers before `dtype` (4.56)
            model = AutoModelForCausalLM.from_config(hf_config(cfg), torch_dtype=torch.float16)
    model.eval()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    base = {"shape": shape, "engine": "transformers fp16", "model_bytes": nbytes, "cache": args.hf_cache}
    rows = []
    with torch.inference_mode():
        for n in args.prompt_lens:
            ids = [rng.randrange(cfg.vocab_size) for _ in range(n)]
            ttft = statistics.median([_hf_generate(model, ids, 1, args.hf_cache)[0]
                                      for _ in range(args.repeats + 1)][1:])
            rows.append({**base, "phase": "prefill", "tokens": n, "ttft_s": ttft, "tok_s": n / ttft})
            log(rows[-1])
        for n in args.ctx_lens:
            ids = [rng.randrange(cfg.vocab_size) for _ in range(n)]
            per = statistics.median([_hf_generate(model, ids, args.decode_tokens + 1, args.hf_cache)[1]
                                     for _ in range(args.repeats + 1)][1:])
            rows.append({**base, "phase": "decode", "tokens": n, "tok_s": 1 / per, "ms_per_token": per * 1000,
                         "gb_s": nbytes / per / 1e9})
            log(rows[-1])
    peak = torch.cuda.max_memory_allocated()
    for r in rows:
        r["peak_memory_bytes"] = peak
    del model
    return rows


def _versions() -> dict:
    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": hf}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                    help="comma-separated names of tinychat.bench.SHAPES (`tinychat bench --shape x` lists them)")
    ap.add_argument("--ctx-lens", default=",".join(map(str, CTX_LENS)), help="decode context lengths")
    ap.add_argument("--prompt-lens", default=",".join(map(str, PROMPT_LENS)), help="TTFT prompt lengths")
    ap.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed per run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--no-fp16", action="store_true", help="skip tinychat fp16")
    ap.add_argument("--no-eager", dest="eager", action="store_false", help="skip tinychat's eager decode runs")
    ap.add_argument("--hf-cache", choices=("dynamic", "static"), default="dynamic", help="transformers' KV cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None,
                    help="JSON output (default benchmarks/results/cuda_e2e_<gpu>.json); '-' for none")
    args = ap.parse_args(argv)
    shapes = [s.strip().lower() for s in args.shapes.split(",") if s.strip()]
    try:
        args.ctx_lens, args.prompt_lens = sorted(set(parse_ints(args.ctx_lens))), sorted(set(parse_ints(
            args.prompt_lens)))
    except ValueError:
        ap.error("--ctx-lens and --prompt-lens take comma-separated token counts")
    if not shapes or not args.ctx_lens or not args.prompt_lens or min(args.ctx_lens + args.prompt_lens) < 1:
        ap.error("--shapes, --ctx-lens and --prompt-lens must not be empty, and lengths must be >= 1")
    if args.decode_tokens < 2 or args.repeats < 1:
        ap.error("--decode-tokens must be >= 2 and --repeats >= 1")

    problem = cuda_problem("bench_cuda_e2e")
    if problem:
        print(problem, file=sys.stderr)
        return 2
    from tinychat.bench import SHAPES

    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")


    def log(row):
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, file=sys.stderr, flush=True)

    gpu = torch.cuda.get_device_name()
    peak = peak_fp16_tflops(gpu)
    rows = []
    rng = random.Random(args.seed)
    for shape in shapes:
        cfg = bench_config(shape, max(max(args.prompt_lens) + 1, max(args.ctx_lens) + args.decode_tokens + 1))
        params = linear_params(cfg)
        for dtype in ("int4",) if args.no_fp16 else ("int4", "float16"):
            _free()
            rows += bench_tinychat(cfg, dtype, shape, args, rng, log)
        if not args.no_hf:
            _free()
            try:
                rows += bench_hf(cfg, shape, args, rng, log)
            except ImportError as e:
                print(f"bench_cuda_e2e: transformers skipped ({e})", file=sys.stderr)
        for r in rows:
            if r["shape"] == shape:
                r["linear_params"] = params
                if r["phase"] == "prefill" and peak:
                    r["compute_bound_s"] = compute_bound_s(params, r["tokens"], peak[0])
                    r["ttft_of_bound"] = r["ttft_s"] / r["compute_bound_s"]
    _free()
    for r in rows:  # vs transformers fp16 at the same shape, phase and length
        hf = next((h for h in rows if h["engine"] == "transformers fp16" and
                   (h["shape"], h["phase"], h["tokens"]) == (r["shape"], r["phase"], r["tokens"])), None)
        if hf and r is not hf:
            r["vs_hf"] = r["tok_s"] / hf["tok_s"]
        r["peak_memory_mb"] = r["peak_memory_bytes"] / 1e6
        r["ms"] = r["ttft_s"] * 1000 if r["phase"] == "prefill" else r["ms_per_token"]
    checks = goal_checks(rows, peak[0] if peak else None)
    result = {"benchmark": "cuda_e2e", "date": datetime.date.today().isoformat(), "gpu": gpu,
              "peak_fp16_tflops": {"value": peak[0], "entry": peak[1], "nominal": True} if peak else None,
              "device": device_info(), "machine": machine_info(), "versions": _versions(),
              "settings": {"shapes": shapes, "ctx_lens": args.ctx_lens, "prompt_lens": args.prompt_lens,
                           "decode_tokens": args.decode_tokens, "repeats": args.repeats, "warmup_runs": 1,
                           "hf_cache": args.hf_cache, "weights": "random", "int4_act_dtype": "float16",
                           "sampling": "greedy, no stop tokens"},
              "rows": rows, "goals": checks, "goals_met": f"{sum(c['ok'] for c in checks)}/{len(checks)}"}
    out = args.out
    if out is None:
        out = os.path.join(os.path.dirname(__file__), "results", f"cuda_e2e_{gpu_slug(gpu)}.json")
    columns = ["shape", "engine", "phase", "tokens", "tok_s", "ms", "vs_hf", "ttft_of_bound", "peak_memory_mb"]
    emit(result, columns, None if out == "-" else out)
    if peak is None:
        print(f"bench_cuda_e2e: {gpu!r} is not in PEAK_FP16_TFLOPS: the TTFT goal is not checked", file=sys.stderr)
    failed = [c for c in checks if not c["ok"]]
    print(f"goals met: {result['goals_met']}" + (f"; missed: {failed}" if failed else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
