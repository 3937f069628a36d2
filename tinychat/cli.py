"""The `tinychat` command."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from tinychat.errors import TinychatError
from tinychat.quant.awq import DEFAULT_METHOD, METHODS, SEARCH_TOKENS


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF file, Hugging Face model directory or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's count, which decode lowers while other processes "
                   "keep cores busy)")
    p.add_argument("--quant", choices=("auto", "awq", "none"), default="auto",
                   help="auto (default): a quantized model (GGUF blocks, AWQ checkpoint) runs as stored, a "
                        "full-precision one is quantized with AWQ on first use and cached; awq: quantize with AWQ "
                        "whatever the source (a GGUF's blocks are requantized); none: float weights (a GGUF's "
                        "blocks dequantized)")


def _add_ctx_arg(p: argparse.ArgumentParser) -> None:
    from tinychat.engine import DEFAULT_CONTEXT

    p.add_argument("--ctx", type=int, default=None,
                   help=f"context length to allocate (default: the model's, at most {DEFAULT_CONTEXT})")
    p.add_argument("--kv-dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="the KV cache's dtype (default: float16 for a float32 model on a CPU, as llama.cpp; else the "
                   "model's)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    from tinychat.engine import CLI_SAMPLING as d

    p.add_argument("--temperature", type=float, default=d.temperature, help=f"0 for greedy (default: {d.temperature})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"0: off (default: {d.top_k})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"1: off (default: {d.top_p})")
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                   help=f"1: off (default: {d.repetition_penalty})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"(default: {d.max_new_tokens})")
    _add_ctx_arg(p)


def _sampling(args):
    from tinychat.engine import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed,
                          max_new_tokens=args.max_new_tokens)


def _load(args):
    from tinychat.api import load

    return load(args.model, device=args.device, dtype=args.dtype, quant=args.quant, threads=args.threads,
                max_seq_len=getattr(args, "ctx", None), kv_dtype=getattr(args, "kv_dtype", None), verbose=True)


def cmd_chat(args) -> int:
    from tinychat.chat import ChatSession, run_chat

    params = _sampling(args)
    llm = _load(args)
    session = ChatSession(llm, system=args.system, params=params)
    print(f"chatting with {llm.name}: /help lists the commands, /exit or Ctrl-D quits", file=sys.stderr)
    return run_chat(session, interactive=sys.stdin.isatty() and sys.stdout.isatty())


def cmd_generate(args) -> int:
    import dataclasses

    sampling = dataclasses.asdict(_sampling(args))
    llm = _load(args)
    if args.raw:
        stream = llm.generate(args.prompt, stream=True, **sampling)
    else:
        stream = llm.chat([{"role": "user", "content": args.prompt}], stream=True, **sampling)
    with stream:
        for piece in stream:
            print(piece, end="", flush=True)
    print()
    c = stream.completion
    print(f"[{c.prompt_tokens} prompt tokens, {c.completion_tokens} generated, TTFT {c.ttft_s * 1000:.0f} ms, "
          f"{c.decode_tok_s:.1f} tok/s, finish: {c.finish_reason}]", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from tinychat.server import listen, serve

    if args.max_request_bytes is not None and args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    sock = listen(args.host, args.port)  # a port in use fails here, before minutes of loading
    with sock:
        llm = _load(args)
        print(f"serving {llm.name} on http://{args.host}:{args.port}/v1 (OpenAI API; Ctrl-C stops)", file=sys.stderr)
        limit = {} if args.max_request_bytes is None else {"max_request_bytes": args.max_request_bytes}
        serve(llm, sock, api_key=args.api_key, **limit)
    return 0


def cmd_ppl(args) -> int:
    import time

    from tinychat.api import load_transformer
    from tinychat.ppl import load_wikitext, perplexity

    text = load_wikitext(args.data)  # before the model: a bad path fails at once
    model, tokenizer, _ = load_transformer(args.model, device=args.device, dtype=args.dtype, quant=args.quant,
                                           threads=args.threads, verbose=True)  # no engine: no KV cache to allocate
    t0 = time.perf_counter()
    r = perplexity(model, tokenizer, text, seqlen=args.seqlen, max_windows=args.max_windows)
    print(f"perplexity: {r.ppl:.4f}")
    print(f"tokens evaluated: {r.tokens_evaluated}")
    print(f"windows: {r.windows} x {args.seqlen}")
    print(f"[mean NLL {r.nll_mean:.5f} nats/token, {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    return 0


def cmd_quantize(args) -> int:
    from tinychat.io.loader import set_threads
    from tinychat.pipeline.quantize import QuantizeOptions, quantize_checkpoint

    set_threads(args.threads)
    search_tokens = SEARCH_TOKENS if args.search_tokens is None else args.search_tokens or None  # 0: all
    opts = QuantizeOptions(w_bit=args.w_bit, group_size=args.group_size, method=args.method, calib=args.calib,
                           n_samples=args.n_samples, seqlen=args.seqlen, clip=not args.no_clip,
                           duo_scaling=args.duo_scaling, search_tokens=search_tokens,
                           quantized_inputs=args.quantized_inputs, device=args.device,
                           seed=args.seed)
    try:
        out = quantize_checkpoint(args.model, args.out, opts, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(f"\ntinychat quantize: interrupted; nothing was written to {args.out} (the checkpoint is written "
              "atomically, at the end). A quantization cannot resume: run the command again to start over.",
              file=sys.stderr)
        return 130
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    return 0


def cmd_bench(args) -> int:
    from tinychat.bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinychat", description="AWQ 4-bit LLM runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("chat", help="interactive chat in the terminal")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("generate", help="answer one prompt and print the timings")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, ...)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: 8000)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/* (default: none)")
    p.add_argument("--max-request-bytes", type=int, default=None,
                   help="refuse request bodies larger than this with 413 (default: 8 MiB)")
    _add_ctx_arg(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("ppl", help="perplexity on WikiText-2 (non-overlapping windows, as GPTQ/AWQ report it)")
    _add_model_args(p)
    p.add_argument("--data", required=True,
                   help="WikiText test split: wiki.test.raw (.txt/.raw) or the Hugging Face rows as a .json list")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default: 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows (default: all)")
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("quantize", help="quantize a model with AWQ (or AWQ + GPTQ, or RTN) into a 4-bit AutoAWQ "
                       "checkpoint",
                       description="Writes a Hugging Face directory in the AutoAWQ GEMM format (tinychat, "
                                   "transformers and vLLM load it); with --w-bit 3, a float16 directory of the "
                                   "fake-quantized weights, for evaluation. The write is atomic.")
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF file, Hugging Face model directory or hub id (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output directory (must not exist, unless --overwrite)")
    p.add_argument("--w-bit", type=int, choices=(4, 3), default=4)
    p.add_argument("--group-size", type=int, choices=(128, 64, 32), default=None,
                   help="input channels per scale and zero (default: the largest of 128/64/32 that fits the model)")
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                   help="awq-gptq (default): AWQ's scale search and clip ranges, then GPTQ's error-compensated "
                   "rounding and a least-squares refit of the group scales; awq: the paper's search and clip, "
                   "rounded to nearest; rtn: round to nearest")
    p.add_argument("--calib", default=None,
                   help="calibration text: a .txt/.jsonl file or a Hugging Face dataset name (AWQ's own: "
                        "mit-han-lab/pile-val-backup; needs `datasets` and a network); default: built-in corpus")
    p.add_argument("--n-samples", type=int, default=128, help="calibration blocks (default: 128)")
    p.add_argument("--seqlen", type=int, default=None,
                   help="tokens per calibration block (default: 512, or the model's context if shorter)")
    p.add_argument("--no-clip", action="store_true", help="skip the clip search")
    p.add_argument("--duo-scaling", action="store_true", help="AutoAWQ's duo scaling: s = x^a / w^(1-a)")
    p.add_argument("--quantized-inputs", action="store_true",
                   help="search each layer on the outputs of the already quantized layers before it (default: "
                        "full-precision outputs, as AWQ does)")
    p.add_argument("--search-tokens", type=int, default=None,
                   help="tokens on which each scale candidate runs the attention and MLP blocks (0: all "
                        f"calibration tokens; default: {SEARCH_TOKENS})")
    p.add_argument("--device", default="cpu", help="where the search runs, one layer at a time (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="calibration shuffle seed (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds a previous checkpoint (never another folder, ., or the source)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("bench", help="prefill/decode speed, memory and GB/s of a model or a known shape, per dtype",
                       description="Prefill tok/s and TTFT per prompt length, decode tok/s per context length, "
                                   "model bytes, peak memory and effective GB/s; warm-up excluded, medians reported.")
    _add_model_args(p)
    p.add_argument("--shape", default=None,
                   help="random weights in a known architecture's shape, e.g. llama-2-7b, llama-3-8b, mistral-7b, "
                        "qwen2-7b, smollm2-135m (no MODEL, weights or tokenizer needed)")
    p.add_argument("--layers", type=int, default=None,
                   help="with --shape: build only the first N decoder layers (full-model figures are estimated)")
    p.add_argument("--dtypes", default=None,
                   help="comma list of float32, bfloat16, float16, int4 compared in one run (default: int4 for "
                        "--shape; a model as it loads); --dtype sets what int4 runs keep in float")
    p.add_argument("--prompt-lens", default=None, help="prefill prompt lengths (default: 32,128,512)")
    p.add_argument("--ctx-lens", default=None,
                   help="decode context lengths (default: 128,512,1024,2048, those that fit the model)")
    p.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed per run (default: 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; medians (default: 3)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every result and the machine info here")
    p.add_argument("--plot", default=None, metavar="PATH.png", help="plot tok/s against length (needs matplotlib)")
    p.set_defaults(func=cmd_bench)
    return parser


def _terminated(signum, frame):
    raise SystemExit(128 + signum)  # unwinds as Ctrl-C does: half-written checkpoints and caches are removed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        return args.func(args)
    except (TinychatError, ValueError) as e:
        print(f"tinychat: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outside the chat's own handling: nothing half-written is left (atomic saves)
        print("\ntinychat: interrupted", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
