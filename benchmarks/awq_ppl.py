"""WikiText-2 perplexity of SmolLM2 (or any model) in full precision and quantized with RTN and AWQ, plus the
quantization wall time, on the CPU. One config a line of the table; results merge into --out, so a long sweep
can run in several invocations.

    python benchmarks/awq_ppl.py --data ../shared/data/wikitext2_raw_test.txt \\
        --calib ../shared/data/calib_mix_c4_wiki_tinystories.jsonl --threads 2 \\
        --configs fp rtn-w4-g64 awq-gptq-w4-g64 awq-w4-g64 rtn-w4-g32 awq-gptq-w4-g32 awq-w4-g32 \\
        rtn-w3-g64 awq-gptq-w3-g64 awq-w3-g64 --out benchmarks/results/awq_ppl_smollm2.json

A config is `fp` or `{rtn|awq|awq-gptq}-w{bits}-g{group}` (awq-gptq, the quantizer's default: AWQ's search, fold and
clip ranges, then GPTQ's error-compensated rounding and the scale refit on the shrunk Hessian), and for AWQ any of
the suffixes `-builtin` (calibrate on the built-in offline corpus instead of --calib), `-duo` (duo scaling), `-qin`
(each layer's search sees the previous layers' quantized outputs) and `-noclip`; e.g. `awq-w4-g64-duo`. The
quantized model is evaluated with pseudo-quantized weights (dequantize(quantize(W))), which is what the int4 kernels
compute with. The calibration corpus is never the evaluation text.

`--data python-stdlib` evaluates on a held-out domain instead, code: the .py files of a fixed list of this Python's
standard-library packages (PYTHON_STDLIB_PACKAGES), sorted by path, joined by blank lines, as they are (the Python
version is in the JSON); e.g. `--data python-stdlib --max-windows 20 --out benchmarks/results/awq_ppl_smollm2_code.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_info  # noqa: E402

CONFIG = re.compile(r"^(fp|(rtn|awq-gptq|awq)-w(\d)-g(\d+)((?:-builtin|-duo|-qin|-noclip)*))$")
PYTHON_STDLIB_PACKAGES = ("asyncio", "email", "json", "logging", "concurrent", "http", "urllib", "xml")


def python_stdlib_text() -> str:
    """The held-out code text: this Python's standard-library .py files of PYTHON_STDLIB_PACKAGES."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for pkg in PYTHON_STDLIB_PACKAGES for f in (root / pkg).rglob("*.py"))
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def run_config(name: str, args, text: str) -> dict:
    from tinychat.io.loader import open_source
    from tinychat.pipeline.calib import load_calibration
    from tinychat.ppl import perplexity
    from tinychat.quant.awq import FORWARD_DTYPE, SEARCH_TOKENS, quantize_model
    from tinychat.quant.quantize import QuantConfig, apply_pseudo_quantized

    m = CONFIG.match(name)
    if not m:
        raise SystemExit(f"bad config {name!r}: use fp or rtn|awq|awq-gptq-w<bits>-g<group>[-builtin][-duo][-qin]"
                         "[-noclip]")
    loaded = open_source(args.model).load(blocks=False)  # a GGUF's blocks dequantized: the fp32 reference
    model, tokenizer = loaded.model, loaded.tokenizer
    row: dict = {"config": name, "method": m.group(2) or "fp"}
    if m.group(2):
        qcfg = QuantConfig(int(m.group(3)), int(m.group(4)))
        row.update(w_bit=qcfg.w_bit, group_size=qcfg.group_size)
        calib, flags = None, set(m.group(5).split("-")[1:])
        search_tokens = SEARCH_TOKENS if args.search_tokens is None else args.search_tokens
        forward_dtype = getattr(torch, args.forward_dtype) if args.forward_dtype else FORWARD_DTYPE
        if m.group(2) != "rtn":
            source = None if "builtin" in flags else args.calib
            calib = load_calibration(source, tokenizer, n_samples=args.n_samples, seqlen=args.seqlen_calib)
            row.update(calib=str(source) if source else "built-in", calib_blocks=calib.shape[0],
                       calib_seqlen=calib.shape[1], search_tokens=search_tokens, forward_dtype=str(forward_dtype),
                       duo_scaling="duo" in flags,
                       quantized_inputs="qin" in flags, clip="noclip" not in flags)
        t0 = time.perf_counter()
        qdict = quantize_model(model, calib, qcfg, method=m.group(2), duo_scaling="duo" in flags,
                               quantized_inputs="qin" in flags, clip="noclip" not in flags,
                               search_tokens=search_tokens, forward_dtype=forward_dtype)
        row["quantize_s"] = round(time.perf_counter() - t0, 1)
        apply_pseudo_quantized(model, qdict, qcfg)
    t0 = time.perf_counter()
    r = perplexity(model, tokenizer, text, seqlen=args.seqlen, max_windows=args.max_windows)
    row.update(ppl=round(r.ppl, 4), nll_mean=r.nll_mean, tokens_evaluated=r.tokens_evaluated, windows=r.windows,
               seqlen=args.seqlen, eval_s=round(time.perf_counter() - t0, 1))
    return row


def add_derived(rows: dict) -> None:
    """For each AWQ (or AWQ + GPTQ) row: the share of RTN's perplexity increase (over fp) that it removes, same bits
    and group."""
    fp = rows.get("fp")
    for name, row in rows.items():
        if row["method"] not in ("awq", "awq-gptq"):
            continue
        rtn = rows.get(f"rtn-w{row['w_bit']}-g{row['group_size']}")
        if fp and rtn and rtn["windows"] == row["windows"] == fp["windows"]:
            added = rtn["ppl"] - fp["ppl"]
            row["rtn_increase_removed"] = round((rtn["ppl"] - row["ppl"]) / added, 3) if added > 0 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--data", required=True, help="WikiText-2 test split (wiki.test.raw or the rows as .json), or "
                   "python-stdlib (held-out code: python_stdlib_text)")
    p.add_argument("--calib", default=None, help="calibration .jsonl/.txt (default: the built-in corpus)")
    p.add_argument("--configs", nargs="+", default=["fp", "rtn-w4-g64", "awq-w4-g64"])
    p.add_argument("--n-samples", type=int, default=128, help="calibration blocks")
    p.add_argument("--seqlen-calib", type=int, default=512)
    p.add_argument("--search-tokens", type=int, default=None, help="default: the quantizer's (SEARCH_TOKENS)")
    p.add_argument("--forward-dtype", default=None, choices=["bfloat16", "float32"],
                   help="the search's forwards (default: the quantizer's FORWARD_DTYPE)")
    p.add_argument("--seqlen", type=int, default=2048, help="evaluation window")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file to merge the results into")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from tinychat.ppl import load_wikitext

    # once, before any model work: a bad path fails at once
    text = python_stdlib_text() if args.data == "python-stdlib" else load_wikitext(args.data)
    result = {"rows": {}}
    if args.out and Path(args.out).exists():
        result = json.loads(Path(args.out).read_text())
    result.update(benchmark="awq_ppl", machine=machine_info(), model=args.model or "SmolLM2-135M-Instruct.Q4_1.gguf",
                  data=args.data if args.data != "python-stdlib" else
                  f"python-stdlib {sys.version.split()[0]}: {', '.join(PYTHON_STDLIB_PACKAGES)}")
    for name in args.configs:
        row = run_config(name, args, text)
        row["date"] = datetime.date.today().isoformat()
        result["rows"][name] = row
        add_derived(result["rows"])
        print(json.dumps(row), flush=True)
        if args.out:  # after every config, so a long sweep keeps what it has
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    cols = ["config", "ppl", "windows", "quantize_s", "eval_s", "rtn_increase_removed"]
    print("  ".join(f"{c:>20}" for c in cols))
    for row in result["rows"].values():
        print("  ".join(f"{str(row.get(c, '')):>20}" for c in cols))


if __name__ == "__main__":
    main()
