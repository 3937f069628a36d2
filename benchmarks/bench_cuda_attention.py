"""Speed of tinychat's CUDA attention kernels next to torch's scaled_dot_product_attention, same run.

Decode (one query token, B = 1) at contexts 1024..32768 for Llama-2-7B (32 heads, head dim 128) and Llama-3-8B
(32 query / 8 kv heads): time per call and GB/s of KV-cache read (2 * Hkv * context * head_dim * element size
bytes per call), next to SDPA (flash backend where it takes the shape, else efficient, else math). Prefill of a
fresh prompt (causal, T = 256 / 1024 / 4096) in TFLOP/s (4 * H * T^2 * D / 2 FLOPs: causal halves the work) next
to SDPA's flash backend. Results: a table, and JSON written to --out.

    python benchmarks/bench_cuda_attention.py --dtype float16
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import cuda_problem, cuda_time_us, emit, machine_info  # noqa: E402

MODELS = {"llama2-7b": (32, 32, 128), "llama3-8b": (32, 8, 128)}  # name -> (H, Hkv, D)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def sdpa_call(q, k, v, causal: bool):
    """A zero-argument SDPA call on [B, T, H, D] q and [B, Hkv, S, D] caches and the backend it runs on: flash,
    else efficient, else math; GQA through enable_gqa when the backend takes it, else by expanded kv heads."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt = q.transpose(1, 2)  # [B, H, T, D]
    rep = q.shape[2] // k.shape[1]
    k_rep, v_rep = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("math", SDPBackend.MATH)):
        for gqa in (True, False):
            kk, vv = (k, v) if gqa else (k_rep, v_rep)
            kwargs = dict(is_causal=causal, enable_gqa=True) if gqa else dict(is_causal=causal)

            def call(kk=kk, vv=vv, kwargs=kwargs, backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qt, kk, vv, **kwargs)

            try:
                call()
            except (RuntimeError, TypeError):
                continue
            return call, name + ("" if gqa else " (expanded kv heads)")
    raise RuntimeError("no SDPA backend takes these shapes")


def bench_decode(model, ctx, dtype, repeats):
    H, Hkv, D = MODELS[model]
    dev = "cuda"
    q = torch.randn(1, 1, H, D, device=dev, dtype=dtype)
    k = torch.randn(1, Hkv, ctx, D, device=dev, dtype=dtype)
    v = torch.randn(1, Hkv, ctx, D, device=dev, dtype=dtype)
    pos = torch.tensor([ctx - 1], device=dev)
    scale = D ** -0.5
    ours = cuda_time_us([lambda: torch.ops.tinychat.attention(q, k, v, pos, scale)], repeats, 50)
    call, backend = sdpa_call(q, k, v, causal=False)  # one query at the end: it sees every row
    theirs = cuda_time_us([call], repeats, 50)
    diff = (torch.ops.tinychat.attention(q, k, v, pos, scale) - call().transpose(1, 2)).abs().max().item()
    gb = 2 * Hkv * ctx * D * q.element_size() / 1e9
    return {"kind": "decode", "model": model, "len": ctx, "tinychat_us": round(ours, 2),
            "tinychat_GBps": round(gb / (ours * 1e-6), 1), "sdpa_us": round(theirs, 2),
            "sdpa_GBps": round(gb / (theirs * 1e-6), 1), "speedup_vs_sdpa": round(theirs / ours, 2),
            "sdpa_backend": backend, "max_abs_diff": diff}


def bench_prefill(model, T, dtype, repeats):
    H, Hkv, D = MODELS[model]
    dev = "cuda"
    q = torch.randn(1, T, H, D, device=dev, dtype=dtype)
    k = torch.randn(1, Hkv, T, D, device=dev, dtype=dtype)
    v = torch.randn(1, Hkv, T, D, device=dev, dtype=dtype)
    pos = torch.arange(T, device=dev)
    scale = D ** -0.5
    inner = max(1, 4096 // T)
    ours = cuda_time_us([lambda: torch.ops.tinychat.attention(q, k, v, pos, scale)], repeats, inner)
    call, backend = sdpa_call(q, k, v, causal=True)
    theirs = cuda_time_us([call], repeats, inner)
    diff = (torch.ops.tinychat.attention(q, k, v, pos, scale) - call().transpose(1, 2)).abs().max().item()
    tflop = 4 * H * T * T * D / 2 / 1e12
    return {"kind": "prefill", "model": model, "len": T, "tinychat_us": round(ours, 2),
            "tinychat_TFLOPs": round(tflop / (ours * 1e-6), 2), "sdpa_us": round(theirs, 2),
            "sdpa_TFLOPs": round(tflop / (theirs * 1e-6), 2), "speedup_vs_sdpa": round(theirs / ours, 2),
            "sdpa_backend": backend, "max_abs_diff": diff}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    ap.add_argument("--contexts", default="1024,4096,8192,32768", help="decode context lengths")
    ap.add_argument("--prefill-lens", default="256,1024,4096", help="prefill prompt lengths")
    ap.add_argument("--models", default=",".join(MODELS), help=f"of {', '.join(MODELS)}")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None,
                    help="JSON output (default benchmarks/results/cuda_attention_<gpu>.json); '-' for none")
    args = ap.parse_args(argv)

    problem = cuda_problem("bench_cuda_attention")
    if problem:
        print(problem, file=sys.stderr)
        return 2

    dtype = DTYPES[args.dtype]
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}")
    rows = []
    with torch.inference_mode():
        for m in models:
            for ctx in (int(c) for c in args.contexts.split(",") if c):
                rows.append(bench_decode(m, ctx, dtype, args.repeats))
                print(rows[-1], file=sys.stderr, flush=True)
        for m in models:
            for T in (int(c) for c in args.prefill_lens.split(",") if c):
                rows.append(bench_prefill(m, T, dtype, args.repeats))
                print(rows[-1], file=sys.stderr, flush=True)
    gpu = torch.cuda.get_device_name()
    result = {"benchmark": "cuda_attention", "date": datetime.date.today().isoformat(), "dtype": args.dtype,
              "gpu": gpu, "machine": machine_info(), "settings": {"repeats": args.repeats}, "rows": rows}
    out = args.out
    if out is None:
        slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")
        out = os.path.join(os.path.dirname(__file__), "results", f"cuda_attention_{slug}.json")
    columns = ["kind", "model", "len", "tinychat_us", "tinychat_GBps", "tinychat_TFLOPs", "sdpa_us", "sdpa_GBps",
               "sdpa_TFLOPs", "speedup_vs_sdpa", "sdpa_backend"]
    emit(result, columns, None if out == "-" else out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
