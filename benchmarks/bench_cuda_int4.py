"""Speed of tinychat's CUDA int4_linear next to cuBLAS fp16 (torch.matmul) and torch's own int4 kernel
(aten._weight_int4pack_mm), same run.

Llama-2-7B and Llama-3-8B linear shapes (N x K) at M = 1 .. 4096 rows of x: time per call (CUDA events, median of
--repeats timings of back-to-back calls that cycle through enough copies of the weights to exceed twice the L2 cache,
so every call reads its weights from DRAM), achieved GB/s (weights + scales + zeros + x + y) and TFLOP/s (2 M N K).
The device-to-device copy bandwidth is measured in the same run; the goals (for an H100) are checked against it:
GEMV (M <= 8) >= 80% of copy bandwidth, >= 3x cuBLAS fp16 at M = 1 and >= 2.5x at M <= 16, >= 0.9x cuBLAS at
M >= 1024, faster than _weight_int4pack_mm at every M. Results: a table, and JSON written to --out.

    python benchmarks/bench_cuda_int4.py                      # fp16 x, group size 128
    python benchmarks/bench_cuda_int4.py --dtype bfloat16 --group-size 64 --out /tmp/int4.json
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

# Goals, as fractions or speedups (see the module docstring).
GOAL_GEMV_OF_COPY = 0.8
GOAL_VS_CUBLAS_M1 = 3.0
GOAL_VS_CUBLAS_SMALL = 2.5  # M <= 16
GOAL_VS_CUBLAS_LARGE = 0.9  # M >= 1024


# ---- pure helpers (no GPU) ----


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


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
    """Bytes one call reads and writes at least once: weights (and their scales/zeros), x [M, K], y [M, N].

    kind: "tinychat" (uint8 [N, K/2] + fp32 scales and zeros [N, K/G]), "cublas" (fp16/bf16 [N, K]) or
    "torch_int4" (int4 [N, K/2] + bf16 scales_and_zeros [K/G, N, 2]).
    """
    if kind == "tinychat":
        weights = N * K // 2 + 2 * N * (K // G) * 4
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
    """Each goal of the module docstring against the rows: {goal, shape, M, value, target, ok}."""
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
        checks += [{"goal": goal, "shape": r["shape"], "M": M, "value": round(value, 3), "target": target,
                    "ok": value >= target} for goal, value, target in wanted if value is not None]
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


def int4_weights(N: int, K: int, G: int):
    """Random tinychat int4 weights (timing only): qweight uint8 [N, K/2], scales and zeros fp32 [N, K/G]."""
    qweight = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
    scales = torch.rand(N, K // G, device="cuda") * 0.01
    zeros = torch.randint(0, 16, (N, K // G), device="cuda").float()
    return qweight, scales, zeros


def torch_int4_weights(qweight, N: int, K: int, G: int):
    """(packed int4 weight, scales_and_zeros bf16 [K/G, N, 2]) for aten._weight_int4pack_mm, or raises."""
    packed = torch.ops.aten._convert_weight_to_int4pack(qweight, TORCH_INT4_INNER_K_TILES)
    sz = torch.rand(K // G, N, 2, device="cuda").to(torch.bfloat16)
    return packed, sz


def bench_shape(name, N, K, G, ms, dtype, repeats, cache_bytes):
    elem = torch.finfo(dtype).bits // 8
    ours_bytes = bytes_moved("tinychat", 0, N, K, G, elem)
    n_ours = copies_to_exceed(cache_bytes, ours_bytes)
    n_fp = copies_to_exceed(cache_bytes, N * K * elem)
    ours_w = [int4_weights(N, K, G) for _ in range(n_ours)]
    fp_w = [torch.randn(N, K, device="cuda", dtype=dtype) * 0.02 for _ in range(n_fp)]
    torch_int4, torch_int4_error, torch_int4_dtype = None, None, None
    try:
        torch_int4 = [torch_int4_weights(w[0], N, K, G) for w in ours_w]
    except (RuntimeError, AttributeError) as e:
        torch_int4_error = f"_convert_weight_to_int4pack: {e}".splitlines()[0]

    rows = []
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        inner = 20 if M <= 256 else 5
        ours_calls = [lambda w=w, x=x: torch.ops.tinychat.int4_linear(x, w[0], w[1], w[2], G) for w in ours_w]
        ours = cuda_time_us(ours_calls, repeats, inner)
        fp = cuda_time_us([lambda w=w, x=x: torch.matmul(x, w.t()) for w in fp_w], repeats, inner)
        row = {"shape": name, "N": N, "K": K, "M": M, "tinychat_us": round(ours, 2),
               "tinychat_GBps": round(bytes_moved("tinychat", M, N, K, G, elem) / (ours * 1e-6) / 1e9, 1),
               "tinychat_TFLOPs": round(flops(M, N, K) / (ours * 1e-6) / 1e12, 2),
               "cublas_us": round(fp, 2),
               "cublas_GBps": round(bytes_moved("cublas", M, N, K, G, elem) / (fp * 1e-6) / 1e9, 1),
               "cublas_TFLOPs": round(flops(M, N, K) / (fp * 1e-6) / 1e12, 2),
               "vs_cublas": round(fp / ours, 2)}
        if torch_int4 is not None and torch_int4_error is None:
            for x_dtype in dict.fromkeys((dtype, torch.bfloat16)):  # torch's CUDA kernel may take bf16 x only
                xi = x.to(x_dtype)
                calls = [lambda w=w, xi=xi: torch.ops.aten._weight_int4pack_mm(xi, w[0], G, w[1]) for w in torch_int4]
                try:
                    t = cuda_time_us(calls, repeats, inner)
                except RuntimeError as e:
                    torch_int4_error = f"_weight_int4pack_mm ({x_dtype}): {e}".splitlines()[0]
                    continue
                torch_int4_error, torch_int4_dtype = None, str(x_dtype).replace("torch.", "")
                row.update({"torch_int4_us": round(t, 2), "torch_int4_x_dtype": torch_int4_dtype,
                            "torch_int4_GBps": round(bytes_moved("torch_int4", M, N, K, G, elem) / (t * 1e-6) / 1e9,
                                                     1),
                            "vs_torch_int4": round(t / ours, 2)})
                break
        if torch_int4_error is not None:
            row["torch_int4_error"] = torch_int4_error
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="rows of x (M) to time")
    ap.add_argument("--shapes", default="all", help=f"comma-separated names of: {', '.join(SHAPES)}; or all")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None,
                    help="JSON output (default benchmarks/results/cuda_int4_<gpu>.json); '-' for none")
    args = ap.parse_args(argv)
    try:
        shapes = select_shapes(args.shapes)
    except ValueError as e:
        ap.error(str(e))
    ms = parse_ints(args.ms)

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
            rows += bench_shape(name, N, K, args.group_size, ms, dtype, args.repeats, cache_bytes)
            torch.cuda.empty_cache()  # the shape's weights are gone: hand their memory back before the next
    checks = goal_checks(rows, copy_gbps)
    gpu = torch.cuda.get_device_name()
    result = {"benchmark": "cuda_int4", "date": datetime.date.today().isoformat(), "dtype": args.dtype,
              "group_size": args.group_size, "gpu": gpu, "device": info, "machine": machine_info(),
              "copy_GBps": round(copy_gbps, 1), "settings": {"repeats": args.repeats, "ms": ms},
              "rows": rows, "goals": checks,
              "goals_met": f"{sum(c['ok'] for c in checks)}/{len(checks)}"}
    out = args.out
    if out is None:
        out = os.path.join(os.path.dirname(__file__), "results", f"cuda_int4_{gpu_slug(gpu)}.json")
    columns = ["shape", "M", "tinychat_us", "tinychat_GBps", "tinychat_TFLOPs", "cublas_us", "cublas_TFLOPs",
               "vs_cublas", "torch_int4_us", "vs_torch_int4"]
    emit(result, columns, None if out == "-" else out)
    failed = [c for c in checks if not c["ok"]]
    print(f"goals met: {result['goals_met']}" + (f"; missed: {failed}" if failed else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
