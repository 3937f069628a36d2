"""CPU int4: tinychat's kernels and whole-model speed next to llama.cpp and transformers, one run, one machine.

    python benchmarks/bench_cpu_int4.py --threads 2 --out benchmarks/results/cpu_int4_smollm2.json

Two tables:
* kernels: int4_linear GEMV (M = 1) at SmolLM2-135M, Llama-2-7B and Llama-3-8B shapes on each instruction-set path
  (avx512_vnni rounds x to int8), in two parameter forms (AWQ g64: fp32 scales and offsets; GGUF Q4_1 g32: fp16
  scales and offsets), in GB/s of weight bytes (4-bit values + scales and offsets), next to the machine's read bandwidth
  measured in the same run (a large tensor summed with the same threads) and to fp32 / bf16 torch matmuls of the
  same shape;
* models: the same 128-token prompt (token ids from tinychat's tokenizer of the GGUF) and 128 new greedy tokens (no
  stop) through tinychat on the shipped blocks (the chat's default; SmolLM2's are Q4_1, --model gives another GGUF),
  tinychat int4 AWQ g64 (a requantization; --no-awq leaves it out), tinychat fp32, llama.cpp (`llama-cpp-python`,
  the shipped GGUF and a Q4_0 requantization of it) and
  transformers fp32 / bf16: prefill tok/s, decode tok/s, peak RSS and its growth over the child's imports (torch,
  which every child imports, llama.cpp's too: the growth is what compares; tinychat and llama.cpp allocate the same
  context, 512 tokens or prompt + new tokens); for tinychat also the
  bytes a decode step reads (decoder linears, output projection, KV cache at the mean context) and the share of the
  read bandwidth that decoding reaches. Each engine runs in a fresh subprocess (peak RSS is per process); one
  warm-up run, then the median of --repeats; all engines run --rounds times in alternating order and each row keeps
  its best round (the machine's speed drifts over minutes; every round is in the JSON);
* contention (--contention): decode tok/s of tinychat (default settings, and --threads fixed) and llama.cpp on the
  shipped blocks, idle and while another process keeps one core busy (a Python loop), and the ratio of the two.

llama-cpp-python is optional (its rows are skipped with a note when it is missing). Build it for this CPU with
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON
    -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    pip install llama-cpp-python
(about 7 minutes on 2 cores): a default build crashes inside llama.cpp's AMX kernels on some CPUs.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, machine_info, median_time, prompt_ids, time_generation  # noqa: E402

# (name, N, K): the decoder linears as tinychat fuses them (q/k/v and gate/up)
SHAPES = {
    "smollm2-135m": [("wqkv", 960, 576), ("wo", 576, 576), ("w13", 3072, 576), ("w2", 576, 1536)],
    "llama-2-7b": [("wqkv", 12288, 4096), ("wo", 4096, 4096), ("w13", 22016, 4096), ("w2", 4096, 11008)],
    "llama-3-8b": [("wqkv", 6144, 4096), ("wo", 4096, 4096), ("w13", 28672, 4096), ("w2", 4096, 14336)],
}
# int4 parameter forms of the kernel table -> group size: AWQ's (fp32 scales and offsets, the quantizer's default
# group for these shapes) and the shipped model's (GGUF Q4_1 blocks: fp16 scales and offsets per 32)
FORMS = {"AWQ g64 fp32": 64, "Q4_1 g32 fp16": 32}
MIN_CTX = 512  # the least context (KV cache) tinychat and llama.cpp allocate, the same for both (memory)


def read_bandwidth(threads: int) -> float:
    """GB/s of reading a 512 MB tensor (a sum), the best of 5: what a memory-bound GEMV can hope for."""
    torch.set_num_threads(threads)
    x = torch.ones(128 * 2**20, dtype=torch.float32)
    x.sum()
    best = min(median_time(x.sum, 1) for _ in range(5))
    return x.numel() * 4 / best / 1e9


def kernel_rows(threads: int, repeats: int) -> list[dict]:
    from tinychat.int4_layout import to_int4_op
    from tinychat.quant.quantize import QuantConfig, quantize

    torch.set_num_threads(threads)
    best = torch.ops.tinychat.cpu_isa()
    isas = ["avx512_vnni", "avx512", "avx2", "scalar"]
    isas = isas[isas.index(best):]
    rows = []
    for (model, shapes), (form, G) in itertools.product(SHAPES.items(), FORMS.items()):
        for name, N, K in shapes:
            w = torch.randn(N, K) * 0.02
            qweight, scales, offsets = to_int4_op(*quantize(w, QuantConfig(4, G)))
            if form.startswith("Q4_1"):  # GGUF's Q4_1 blocks: fp16 scale and min per 32 weights, as stored
                scales, offsets = scales.half(), offsets.half()
            nbytes = sum(t.numel() * t.element_size() for t in (qweight, scales, offsets))
            x = torch.randn(1, K)
            row = {"model": model, "linear": name, "form": form, "N": N, "K": K, "int4_MB": nbytes / 1e6}
            for isa in isas:
                os.environ["TINYCHAT_CPU_ISA"] = isa
                f = lambda: torch.ops.tinychat.int4_linear(x, qweight, scales, offsets, G)  # noqa: E731
                f()
                t = median_time(f, repeats)
                row[f"{isa}_us"] = t * 1e6
                row[f"{isa}_GBs"] = nbytes / t / 1e9
            os.environ.pop("TINYCHAT_CPU_ISA")
            for dtype in (torch.float32, torch.bfloat16):
                wd, xd = w.to(dtype), x.to(dtype)
                g = lambda: xd @ wd.t()  # noqa: E731
                g()
                t = median_time(g, repeats)
                tag = "fp32" if dtype == torch.float32 else "bf16"
                row[f"{tag}_us"] = t * 1e6
                row[f"{tag}_GBs"] = w.numel() * wd.element_size() / t / 1e9
            rows.append(row)
    return rows


# ---- whole models, one engine per subprocess ----


def bytes_per_token(model, context: float) -> int:
    """What a decode step reads: the decoder linears, the output projection, and the KV cache up to `context`."""
    from tinychat.bench import weight_bytes

    cfg, head = model.config, model.lm_head
    head_bytes = sum(t.numel() * t.element_size() for t in [*head.parameters(), *head.buffers()])
    kv_size = model.layers[0].attn.kv_cache.k.element_size()  # the engine's cache dtype
    kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context * kv_size
    return int(weight_bytes(model)["linear_bytes"] + head_bytes + kv_bytes)


def run_tinychat(spec: dict) -> dict:
    from tinychat.api import load

    if spec.get("isa"):
        os.environ["TINYCHAT_CPU_ISA"] = spec["isa"]
    threads = spec["threads"] if spec.get("fixed_threads") else None  # None: decode tunes the count (the default)
    llm = load(spec.get("path"), quant=spec["quant"], dtype="float32", threads=threads, max_seq_len=spec["ctx"])
    prefill, decode = time_generation(llm.engine, spec["prompt"], spec["new_tokens"], spec["repeats"])
    nbytes = bytes_per_token(llm.engine.model, len(spec["prompt"]) + spec["new_tokens"] / 2)
    return {"prefill_tok_s": prefill, "decode_tok_s": decode, "model": llm.name,
            "cpu_isa": torch.ops.tinychat.cpu_isa(), "MB_per_token": nbytes / 1e6}


def run_llama_cpp(spec: dict) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(spec["path"], n_ctx=spec["ctx"], n_threads=spec["threads"], n_threads_batch=spec["threads"],
                          n_batch=512, verbose=False)
    prompt = spec["prompt"]
    prefill, decode = [], []
    for i in range(spec["repeats"] + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(spec["new_tokens"] - 1):
            token = llm.sample(temp=0.0)
            llm.eval([token])
        t2 = time.perf_counter()
        if i:
            prefill.append(len(prompt) / (t1 - t0))
            decode.append((spec["new_tokens"] - 1) / (t2 - t1))
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "model": os.path.basename(spec["path"])}


def run_transformers(spec: dict) -> dict:
    from transformers import AutoModelForCausalLM

    path = spec["path"]
    dtype = getattr(torch, spec["dtype"])
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=dtype).eval()
    ids = torch.tensor([spec["prompt"]])  # [1, T]
    prefill, decode = [], []
    with torch.inference_mode():
        for i in range(spec["repeats"] + 1):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            t1 = time.perf_counter()
            for _ in range(spec["new_tokens"] - 1):
                out = model(token, past_key_values=out.past_key_values, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            if i:
                prefill.append(ids.shape[1] / (t1 - t0))
                decode.append((spec["new_tokens"] - 1) / (t2 - t1))
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "model": os.path.basename(path)}


RUNNERS = {"tinychat": run_tinychat, "llama.cpp": run_llama_cpp, "transformers": run_transformers}


def child_main(spec_json: str) -> None:
    from tinychat.bench import peak_rss_bytes

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    before = peak_rss_bytes()  # this script's imports (torch), which every engine's child pays alike
    result = RUNNERS[spec["engine"]](spec)
    result["peak_rss_MB"] = peak_rss_bytes() / 2**20
    result["rss_growth_MB"] = (peak_rss_bytes() - before) / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def in_subprocess(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit status {proc.returncode}"}


def file_type(gguf_path: str) -> str:
    """The GGUF's general.file_type as llama.cpp names it ("Q4_1", "Q4_K_M", ...)."""
    import gguf

    field = gguf.GGUFReader(gguf_path).fields.get("general.file_type")
    return "blocks" if field is None else gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_")


def requantize_q4_0(src: str, dst: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not requantize {src} to Q4_0")


def model_rows(args) -> tuple[list[dict], list[str]]:
    from tinychat.io.loader import load_model, resolve_source

    gguf = str(resolve_source(args.model))
    _, tokenizer = load_model(gguf)
    # one prompt for every engine (they share the GGUF's vocabulary), tokenized here, not in each child
    prompt = prompt_ids(lambda t: tokenizer.encode(t, add_special_tokens=False), args.prompt_tokens)
    base = {"prompt": prompt, "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads,
            "ctx": max(MIN_CTX, args.prompt_tokens + args.new_tokens)}
    shipped = f"shipped {file_type(gguf)}"
    configs = [
        ("tinychat", f"{shipped} blocks", {"quant": "auto", "path": gguf}),
        ("tinychat", "int4 AWQ g64", {"quant": "awq", "path": gguf}),
        ("tinychat", "fp32", {"quant": "none", "path": gguf}),
    ]
    if args.no_awq:
        del configs[1]
    if torch.ops.tinychat.cpu_isa() == "avx512_vnni":  # the default rounds activations to int8: the fp32 path too
        configs.insert(1, ("tinychat", f"{shipped} blocks, fp32 activations", {"quant": "auto", "path": gguf,
                                                                              "isa": "avx512"}))
    notes = []
    try:
        import llama_cpp  # noqa: F401

        q4_0 = os.path.join(args.workdir, os.path.basename(gguf).removesuffix(".gguf") + "-Q4_0.gguf")
        if not os.path.exists(q4_0):
            os.makedirs(args.workdir, exist_ok=True)
            requantize_q4_0(gguf, q4_0)
        configs += [("llama.cpp", shipped, {"path": gguf}), ("llama.cpp", "Q4_0", {"path": q4_0})]
    except ImportError:
        notes.append("llama-cpp-python is not installed: no llama.cpp rows (see this script's docstring)")
    if not args.no_transformers:
        configs += [("transformers", "fp32", {"path": gguf, "dtype": "float32"}),
                    ("transformers", "bf16", {"path": gguf, "dtype": "bfloat16"})]
    # each engine runs once per round, the order reversed every other round: a machine whose speed drifts over the
    # minutes of a run then favours no engine; each row keeps its best round (the least disturbed one)
    runs = {i: [] for i in range(len(configs))}
    for round_ in range(args.rounds):
        order = range(len(configs)) if round_ % 2 == 0 else reversed(range(len(configs)))
        for i in order:
            engine, label, extra = configs[i]
            print(f"round {round_ + 1}/{args.rounds}: {engine} {label} ...", file=sys.stderr, flush=True)
            runs[i].append(in_subprocess({**base, **extra, "engine": engine}))
    rows = []
    for i, (engine, label, _) in enumerate(configs):
        ok = [r for r in runs[i] if "error" not in r]
        best = max(ok, key=lambda r: r["decode_tok_s"]) if ok else runs[i][-1]
        if ok:
            best = {**best, "prefill_tok_s": max(r["prefill_tok_s"] for r in ok)}
        rows.append({"engine": engine, "weights": label, **best,
                     "rounds": [{k: r.get(k) for k in ("prefill_tok_s", "decode_tok_s", "error")} for r in runs[i]]})
    for r in rows:
        if "MB_per_token" in r:  # the share of the memory-bandwidth bound that decoding reaches
            r["bandwidth_use"] = r["decode_tok_s"] * r["MB_per_token"] * 1e6 / (args.bandwidth * 1e9)
    by = {(r["engine"], r["weights"]): r for r in rows}
    for weights, key in (("Q4_0", "llama_q4_0"), (shipped, "llama_shipped")):
        ref = by.get(("llama.cpp", weights))
        if ref and "error" not in ref:
            for r in rows:
                if "error" not in r:
                    r[f"decode_vs_{key}"] = r["decode_tok_s"] / ref["decode_tok_s"]
                    r[f"prefill_vs_{key}"] = r["prefill_tok_s"] / ref["prefill_tok_s"]
                    r[f"rss_growth_vs_{key}"] = r["rss_growth_MB"] / ref["rss_growth_MB"]
    return rows, notes


def contention_rows(args) -> list[dict]:
    """Decode speed idle and with one core kept busy by another process, each engine in turn, --rounds times."""
    from tinychat.io.loader import load_model, resolve_source

    gguf = str(resolve_source(args.model))
    _, tokenizer = load_model(gguf)
    prompt = prompt_ids(lambda t: tokenizer.encode(t, add_special_tokens=False), args.prompt_tokens)
    base = {"prompt": prompt, "new_tokens": 64, "repeats": 1, "threads": args.threads, "path": gguf,
            "ctx": max(MIN_CTX, args.prompt_tokens + 64)}
    shipped = f"shipped {file_type(gguf)}"
    configs = [("tinychat", f"{shipped} blocks, default threads", {"quant": "auto"}),
               ("tinychat", f"{shipped} blocks, --threads {args.threads}", {"quant": "auto", "fixed_threads": True})]
    try:
        import llama_cpp  # noqa: F401

        configs.append(("llama.cpp", f"{shipped}, {args.threads} threads", {}))
    except ImportError:
        pass
    runs = {(i, busy): [] for i in range(len(configs)) for busy in (False, True)}
    for round_ in range(args.rounds):
        for i, (engine, label, extra) in enumerate(configs):
            for busy in (False, True):
                print(f"contention round {round_ + 1}/{args.rounds}: {engine} {label}, {'busy' if busy else 'idle'}",
                      file=sys.stderr, flush=True)
                hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
                try:
                    runs[i, busy].append(in_subprocess({**base, **extra, "engine": engine}))
                finally:
                    if hog is not None:
                        hog.kill()
                        hog.wait()
    rows = []
    for i, (engine, label, _) in enumerate(configs):
        idle, busy = ([r.get("decode_tok_s", 0.0) for r in runs[i, b]] for b in (False, True))
        rows.append({"engine": engine, "weights": label, "idle_decode_tok_s": max(idle),
                     "busy_decode_tok_s": max(busy), "busy_vs_idle": max(busy) / max(idle) if max(idle) else None,
                     "rounds": {"idle": idle, "busy": busy}})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="GGUF file (default: the SmolLM2 package)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="runs of every engine, in alternating order (best kept)")
    ap.add_argument("--kernel-repeats", type=int, default=50)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-awq", action="store_true", help="leave out tinychat's AWQ requantization of the model")
    ap.add_argument("--no-models", action="store_true", help="the kernel table only")
    ap.add_argument("--contention", action="store_true",
                    help="also decode with one core kept busy by another process (the contention table)")
    ap.add_argument("--workdir", default=os.path.join(os.path.expanduser("~"), ".cache", "tinychat", "bench"),
                    help="where the Q4_0 requantization is written (default: ~/.cache/tinychat/bench)")
    ap.add_argument("--out", default=None, help="write the JSON here too")
    args = ap.parse_args()
    if args.child is not None:
        child_main(args.child)
        return
    import tinychat.ops  # noqa: F401  (loads the kernels)

    bandwidth = args.bandwidth = read_bandwidth(args.threads)
    kernels = kernel_rows(args.threads, args.kernel_repeats)
    for r in kernels:
        r["best_vs_bandwidth"] = max(v for k, v in r.items() if k.endswith("_GBs") and k[:-4] in
                                     ("avx512_vnni", "avx512", "avx2", "scalar")) / bandwidth
    models, notes = ([], []) if args.no_models else model_rows(args)
    result = {
        "benchmark": "cpu_int4",
        "date": datetime.date.today().isoformat(),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "machine": dict(machine_info(), torch_threads=args.threads, read_bandwidth_GBs=bandwidth,
                        cpu_isa=torch.ops.tinychat.cpu_isa()),
        "notes": notes,
        "kernels": kernels,
        "rows": models,
    }
    if args.contention:
        result["contention"] = contention_rows(args)
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s ({args.threads} threads)")
    emit({"rows": kernels}, ["model", "linear", "form", "N", "K", "int4_MB", "avx512_vnni_GBs", "avx512_GBs", "avx2_GBs",
                             "scalar_GBs", "fp32_GBs", "bf16_GBs", "best_vs_bandwidth"], None)
    emit(result, ["engine", "weights", "prefill_tok_s", "decode_tok_s", "peak_rss_MB", "rss_growth_MB",
                  "rss_growth_vs_llama_shipped", "prefill_vs_llama_q4_0",
                  "decode_vs_llama_q4_0", "prefill_vs_llama_shipped", "decode_vs_llama_shipped", "MB_per_token",
                  "bandwidth_use", "error"], args.out)
    if args.contention:
        emit({"rows": result["contention"]}, ["engine", "weights", "idle_decode_tok_s", "busy_decode_tok_s",
                                              "busy_vs_idle"], None)


if __name__ == "__main__":
    main()
