"""Speed of tinychat's CUDA int4_linear next to cuBLAS fp16 (torch.matmul) and torch's own int4 kernel
(aten._weight_int4pack_mm), same run.

Llama-2-7B and Llama-3-8B linear shapes (N x K) at M = 1 .. 4096 rows of x, tinychat's weights in each parameter form
of the op (FORMS: AWQ's fp32 scales and offsets at --group-size; GGUF's Q4_0, Q4_1 and Q4_K blocks as the loader
keeps them, groups of 32): time per call (CUDA events, median of --repeats timings of back-to-back calls that cycle
through enough copies of the weights to exceed twice the L2 cache, so every call reads its weights from DRAM),
achieved GB/s (4-bit weights + the form's group parameters + x + y) and TFLOP/s (2 M N K). cuBLAS and
_weight_int4pack_mm (at --group-size) are timed once per shape and M; each form's row holds them and its speedups. The
device-to-device copy bandwidth is measured in the same run; the goals (for an H100) are checked against it, per
form: GEMV (M <= 8) >= 80% of copy bandwidth, >= 3x cuBLAS fp16 at M = 1 and >= 2.5x at M <= 16, >= 0.9x cuBLAS at
M >= 1024, faster than _weight_int4pack_mm at every M. Results: a table (a row per shape, M and form), and JSON
written to --out (rows with "form" and its group size "G").

    python benchmarks/bench_cuda_int4.py                      # fp16 x, every form (AWQ at group size 128)
    python benchmarks/bench_cuda_int4.py --dtype bfloat16 --group-size 64 --forms awq,q4_k --out /tmp/int4.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import cuda_problem, cuda_time_us, emit, machine_info  # noqa: E402

from tinychat.int4_layout import to_int4_op  # noqa: E402

# name -> (N, K): the fused qkv, o, fused gate|up and down projections
SHAPES = {
    "llama2-7b qkv": (12288, 4096),
    "llama3-8b qkv": (6144, 4096),
    "o_proj": (4096, 4096),
    "llama2-7b gate_up": (22016, 4096),
    "llama3-8b gate_up": (28672, 4096),
    "llama2-7b down": (4096, 11008),
    "llama3-8b down": (4096, 14336),
}
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
TORCH_INT4_INNER_K_TILES = 8
# The op's parameter forms (tinychat/int4_layout.py, csrc/common/kquant.h) -> what the weights carry
FORMS = {
    "awq": "AWQ: fp32 scales and offsets m = -z s [N, K/G], G = --group-size (int4_layout.to_int4_op)",
    "q4_0": "GGUF Q4_0: fp16 scales [N, K/32], no offsets (m = -8 s)",
    "q4_1": "GGUF Q4_1: fp16 scales and offsets [N, K/32]",
    "q4_k": "GGUF Q4_K: K-quant superblocks uint8 [N, K/256, 20] (s = d sc, m = -dmin mn per 32)",
}
GGUF_GROUP = 32  # the GGUF forms' group size
KQUANT_SUPER = (256, 20)  # K-quant superblocks: input channels, bytes

# Goals, as fractions or speedups (see the module docstring).
GOAL_GEMV_OF_COPY = 0.8
GOAL_VS_CUBLAS_M1 = 3.0
GOAL_VS_CUBLAS_SMALL = 2.5  # M <= 16
GOAL_VS_CUBLAS_LARGE = 0.9  # M >= 1024


# ---- pure helpers (no GPU) ----


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def select_forms(names: str) -> list[str]:
    """The FORMS named in a comma-separated list ("all": every one), in FORMS order."""
    if names == "all":
        return list(FORMS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in FORMS]
    if unknown or not wanted:
        raise ValueError(f"unknown forms {unknown or names!r}; known: {', '.join(FORMS)}")
    return [f for f in FORMS if f in wanted]


def form_group(form: str, group_size: int) -> int:
    """The group size of a form's weights: --group-size for AWQ, 32 for the GGUF forms."""
    return group_size if form == "awq" else GGUF_GROUP


def select_shapes(names: str) -> dict[str, tuple[int, int]]:
    """The SHAPES named in a comma-separated list ("all": every one)."""
    if names == "all":
        return dict(SHAPES)
    out = {}
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in SHAPES:
            raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
        out[name] = SHAPES[name]
    return out


def bytes_moved(kind: str, M: int, N: int, K: int, G: int, elem: int = 2) -> int:
    """Bytes one call reads and writes at least once: weights (and their group parameters), x [M, K], y [M, N].

    kind: a tinychat form (uint8 [N, K/2] + "awq": fp32 scales and offsets [N, K/G]; "q4_0": fp16 scales [N, K/G];
    "q4_1": fp16 scales and offsets [N, K/G]; "q4_k": superblocks uint8 [N, K/256, 20]), "cublas" (fp16/bf16 [N, K])
    or "torch_int4" (int4 [N, K/2] + bf16 scales_and_zeros [K/G, N, 2]).
    """
    if kind in FORMS:
        params = {"awq": 2 * 4 * (K // G), "q4_0": 2 * (K // G), "q4_1": 2 * 2 * (K // G),
                  "q4_k": K // KQUANT_SUPER[0] * KQUANT_SUPER[1]}[kind]
        weights = N * K // 2 + N * params
    elif kind == "cublas":
        weights = N * K * elem
    elif kind == "torch_int4":
        weights = N * K // 2 + (K // G) * N * 2 * 2
    else:
        raise ValueError(kind)
    return weights + M * K * elem + M * N * elem


def flops(M: int, N: int, K: int) -> int:
    return 2 * M * N * K


def copies_to_exceed(cache_bytes: int, nbytes: int, factor: int = 2, cap: int = 64) -> int:
    """How many copies of an nbytes working set exceed factor x the cache (at least 1, at most cap)."""
    if nbytes <= 0:
        return 1
    return max(1, min(cap, -(-factor * cache_bytes // nbytes)))


def goal_checks(rows: list[dict], copy_gbps: float) -> list[dict]:
    """Each goal of the module docstring against the rows: {goal, shape, form, M, value, target, ok}."""
    checks = []
    for r in rows:
        M = r["M"]
        wanted = [("speedup vs _weight_int4pack_mm", r.get("vs_torch_int4"), 1.0)]
        if M <= 8 and copy_gbps:
            wanted.append(("gemv GB/s / copy GB/s", r["tinychat_GBps"] / copy_gbps, GOAL_GEMV_OF_COPY))
        if M == 1:
            wanted.append(("speedup vs cuBLAS fp16 (M=1)", r.get("vs_cublas"), GOAL_VS_CUBLAS_M1))
        elif M <= 16:
            wanted.append(("speedup vs cuBLAS fp16 (M<=16)", r.get("vs_cublas"), GOAL_VS_CUBLAS_SMALL))
        if M >= 1024:
            wanted.append(("speedup vs cuBLAS fp16 (M>=1024)", r.get("vs_cublas"), GOAL_VS_CUBLAS_LARGE))
        checks += [{"goal": goal, "shape": r["shape"], "form": r["form"], "M": M, "value": round(value, 3),
                    "target": target, "ok": value >= target} for goal, value, target in wanted if value is not None]
    return checks


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ---- measurement ----


def copy_bandwidth_gbps(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second) of an nbytes buffer."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = cuda_time_us([lambda: dst.copy_(src)], repeats, 5)
    return 2 * nbytes / (us * 1e-6) / 1e9


def device_info() -> dict:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    info = {k: getattr(props, k) for k in dir(props)
            if not k.startswith("_") and isinstance(getattr(props, k), (int, float, str, bool))}
    try:
        smi = subprocess.run(
            ["nvidia-smi", ("--query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,"
                            "power.limit,pstate"), "--format=csv", "-i", str(torch.cuda.current_device())],
            capture_output=True, text=True, timeout=30, check=True)
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        info["nvidia_smi"] = f"unavailable: {e}"
    return info


def int4_weights(form: str, N: int, K: int, G: int):
    """Random tinychat int4 weights in one of FORMS (timing only; finite parameters): (qweight uint8 [N, K/2],
    scales, offsets or None), the op's arguments with group size G."""
    if form == "awq":  # the plain quantization's integer zeros -> fp32 offsets -z s
        q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device="cuda")
        scales = torch.rand(N, K // G, device="cuda") * 0.01
        zeros = torch.randint(0, 16, (N, K // G), device="cuda").float()
        return to_int4_op(q, scales, zeros)
    qweight = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
    if form == "q4_k":  # fp16 d in [0.001, 0.011] and dmin in [0, 0.02], 6-bit sc and mn
        n_super = K // KQUANT_SUPER[0]
        superblocks = torch.randint(0, 64, (N, n_super, KQUANT_SUPER[1]), dtype=torch.uint8, device="cuda")
        superblocks[..., 0:2] = (torch.rand(N, n_super, 1, device="cuda") * 0.01 + 0.001).half().view(torch.uint8)
        superblocks[..., 2:4] = (torch.rand(N, n_super, 1, device="cuda") * 0.02).half().view(torch.uint8)
        return qweight, superblocks, None
    scales = (torch.rand(N, K // G, device="cuda") * 0.01).half()
    offsets = (torch.rand(N, K // G, device="cuda") * -0.08).half() if form == "q4_1" else None
    return qweight, scales, offsets


def torch_int4_weights(N: int, K: int, G: int):
    """(packed int4 weight, scales_and_zeros bf16 [K/G, N, 2]) for aten._weight_int4pack_mm, or raises."""
    qweight = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
    packed = torch.ops.aten._convert_weight_to_int4pack(qweight, TORCH_INT4_INNER_K_TILES)
    sz = torch.rand(K // G, N, 2, device="cuda").to(torch.bfloat16)
    return packed, sz


def baseline_row(M, N, K, G, dtype, x, fp_w, torch_int4, repeats, inner) -> dict:
    """cuBLAS (fp_w: weights [N, K] in x's dtype) and _weight_int4pack_mm (torch_int4: its weights, or an error
    string) at one M: the row's cublas_* and torch_int4_* keys (torch_int4_error when it cannot run)."""
    elem = torch.finfo(dtype).bits // 8
    fp = cuda_time_us([lambda w=w: torch.matmul(x, w.t()) for w in fp_w], repeats, inner)
    row = {"cublas_us": round(fp, 2),
           "cublas_GBps": round(bytes_moved("cublas", M, N, K, G, elem) / (fp * 1e-6) / 1e9, 1),
           "cublas_TFLOPs": round(flops(M, N, K) / (fp * 1e-6) / 1e12, 2)}
    if isinstance(torch_int4, str):
        return {**row, "torch_int4_error": torch_int4}
    error = None
    for x_dtype in dict.fromkeys((dtype, torch.bfloat16)):  # torch's CUDA kernel may take bf16 x only
        xi = x.to(x_dtype)
        calls = [lambda w=w, xi=xi: torch.ops.aten._weight_int4pack_mm(xi, w[0], G, w[1]) for w in torch_int4]
        try:
            t = cuda_time_us(calls, repeats, inner)
        except RuntimeError as e:
            error = f"_weight_int4pack_mm ({x_dtype}): {e}".splitlines()[0]
            continue
        return {**row, "torch_int4_us": round(t, 2), "torch_int4_x_dtype": str(x_dtype).replace("torch.", ""),
                "torch_int4_GBps": round(bytes_moved("torch_int4", M, N, K, G, elem) / (t * 1e-6) / 1e9, 1)}
    return {**row, "torch_int4_error": error}


def bench_shape(name, N, K, forms, group_size, ms, dtype, repeats, cache_bytes):
    """The rows of one shape: cuBLAS and _weight_int4pack_mm (at group_size) at every M, then each form at every M."""
    elem = torch.finfo(dtype).bits // 8
    inner = {M: 20 if M <= 256 else 5 for M in ms}
    xs = {M: torch.randn(M, K, device="cuda", dtype=dtype) for M in ms}
    fp_w = [torch.randn(N, K, device="cuda", dtype=dtype) * 0.02
            for _ in range(copies_to_exceed(cache_bytes, N * K * elem))]
    n_torch_int4 = copies_to_exceed(cache_bytes, bytes_moved("torch_int4", 0, N, K, group_size, elem))
    try:
        torch_int4 = [torch_int4_weights(N, K, group_size) for _ in range(n_torch_int4)]
    except (RuntimeError, AttributeError) as e:
        torch_int4 = f"_convert_weight_to_int4pack: {e}".splitlines()[0]
    base = {M: baseline_row(M, N, K, group_size, dtype, xs[M], fp_w, torch_int4, repeats, inner[M]) for M in ms}
    del fp_w, torch_int4

    rows = []
    for form in forms:
        G = form_group(form, group_size)
        ours_w = [int4_weights(form, N, K, G)
                  for _ in range(copies_to_exceed(cache_bytes, bytes_moved(form, 0, N, K, G, elem)))]
        for M in ms:
            x = xs[M]
            calls = [lambda w=w, x=x: torch.ops.tinychat.int4_linear(x, w[0], w[1], w[2], G) for w in ours_w]
            ours = cuda_time_us(calls, repeats, inner[M])
            row = {"shape": name, "form": form, "N": N, "K": K, "G": G, "M": M, "tinychat_us": round(ours, 2),
                   "tinychat_GBps": round(bytes_moved(form, M, N, K, G, elem) / (ours * 1e-6) / 1e9, 1),
                   "tinychat_TFLOPs": round(flops(M, N, K) / (ours * 1e-6) / 1e12, 2), **base[M]}
            row["vs_cublas"] = round(row["cublas_us"] / ours, 2)
            if "torch_int4_us" in row:
                row["vs_torch_int4"] = round(row["torch_int4_us"] / ours, 2)
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
        del ours_w
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    ap.add_argument("--group-size", type=int, default=128,
                    help="group size of the AWQ form and of _weight_int4pack_mm (the GGUF forms: 32)")
    ap.add_argument("--forms", default="all", help=f"comma-separated forms of: {', '.join(FORMS)}; or all")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="rows of x (M) to time")
    ap.add_argument("--shapes", default="all", help=f"comma-separated names of: {', '.join(SHAPES)}; or all")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None,
                    help="JSON output (default benchmarks/results/cuda_int4_<gpu>.json); '-' for none")
    args = ap.parse_args(argv)
    try:
        shapes = select_shapes(args.shapes)
        forms = select_forms(args.forms)
    except ValueError as e:
        ap.error(str(e))
    ms = parse_ints(args.ms)
    if args.group_size <= 0 or args.group_size % 32:
        ap.error(f"--group-size must be a positive multiple of 32, got {args.group_size}")
    bad = [f"{name} (K = {K})" for name, (_N, K) in shapes.items() if K % args.group_size]
    if bad:
        ap.error(f"--group-size {args.group_size} does not divide K of: {', '.join(bad)}")

    problem = cuda_problem("bench_cuda_int4")
    if problem:
        print(problem, file=sys.stderr)
        return 2

    dtype = DTYPES[args.dtype]
    info = device_info()
    cache_bytes = int(info.get("L2_cache_size", 0)) or 64 << 20
    with torch.inference_mode():
        copy_gbps = copy_bandwidth_gbps()
        print(f"device-to-device copy: {copy_gbps:.0f} GB/s", file=sys.stderr, flush=True)
        rows = []
        for name, (N, K) in shapes.items():
            rows += bench_shape(name, N, K, forms, args.group_size, ms, dtype, args.repeats, cache_bytes)
            torch.cuda.empty_cache()  # the shape's weights are gone: hand their memory back before the next
    checks = goal_checks(rows, copy_gbps)
    gpu = torch.cuda.get_device_name()
    result = {"benchmark": "cuda_int4", "date": datetime.date.today().isoformat(), "dtype": args.dtype,
              "group_size": args.group_size, "forms": {f: FORMS[f] for f in forms}, "gpu": gpu, "device": info,
              "machine": machine_info(),
              "copy_GBps": round(copy_gbps, 1), "settings": {"repeats": args.repeats, "ms": ms},
              "rows": rows, "goals": checks,
              "goals_met": f"{sum(c['ok'] for c in checks)}/{len(checks)}"}
    out = args.out
    if out is None:
        out = os.path.join(os.path.dirname(__file__), "results", f"cuda_int4_{gpu_slug(gpu)}.json")
    columns = ["shape", "form", "M", "tinychat_us", "tinychat_GBps", "tinychat_TFLOPs", "cublas_us", "cublas_TFLOPs",
               "vs_cublas", "torch_int4_us", "vs_torch_int4"]
    emit(result, columns, None if out == "-" else out)
    failed = [c for c in checks if not c["ok"]]
    print(f"goals met: {result['goals_met']}" + (f"; missed: {failed}" if failed else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
