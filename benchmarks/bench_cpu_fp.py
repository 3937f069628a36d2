"""Prefill and decode speed of SmolLM2 in full precision on the CPU: tinychat next to transformers, same run.

    python benchmarks/bench_cpu_fp.py --threads 2 --out benchmarks/results/cpu_fp_smollm2.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, machine_info, median_time, prompt_ids, time_generation  # noqa: E402


def bench_tinychat(path, dtype, prompt, new_tokens, repeats):
    from tinychat.engine import Engine
    from tinychat.io.loader import load_model

    model, tokenizer = load_model(path, dtype=dtype)
    engine = Engine(model, tokenizer, max_seq_len=len(prompt) + new_tokens + 8)
    return time_generation(engine, prompt, new_tokens, repeats)


def bench_transformers(path, dtype, prompt, new_tokens, repeats):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    ids = torch.tensor([prompt])

    @torch.inference_mode()
    def prefill():
        return model(ids, use_cache=True)

    @torch.inference_mode()
    def decode():
        out = prefill()
        token = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        return (new_tokens - 1) / (time.perf_counter() - t0)

    prefill()
    decode()
    prefill_s = median_time(prefill, repeats)
    return len(prompt) / prefill_s, statistics.median(decode() for _ in range(repeats))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the SmolLM2 package)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tinychat.io.loader import load_model, resolve_source

    path = resolve_source(args.model)
    _, tokenizer = load_model(path)
    prompt = prompt_ids(lambda t: tokenizer.encode(t, add_special_tokens=False), args.prompt_tokens)
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        engines = [("tinychat", bench_tinychat)] + ([] if args.no_transformers else [("transformers", bench_transformers)])
        for engine, fn in engines:
            pre, dec = fn(path, dtype, prompt, args.new_tokens, args.repeats)
            rows.append({"engine": engine, "dtype": dtype_name, "prefill_tok_s": pre, "decode_tok_s": dec})
    by = {(r["engine"], r["dtype"]): r for r in rows}
    for r in rows:
        base = by.get(("transformers", r["dtype"]))
        if base and r["engine"] != "transformers":
            r["prefill_vs_transformers"] = r["prefill_tok_s"] / base["prefill_tok_s"]
            r["decode_vs_transformers"] = r["decode_tok_s"] / base["decode_tok_s"]
    result = {
        "benchmark": "cpu_fp",
        "date": datetime.date.today().isoformat(),
        "model": str(path.name),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "machine": machine_info(),
        "rows": rows,
    }
    emit(result, ["engine", "dtype", "prefill_tok_s", "decode_tok_s", "prefill_vs_transformers",
                  "decode_vs_transformers"], args.out)


if __name__ == "__main__":
    main()
