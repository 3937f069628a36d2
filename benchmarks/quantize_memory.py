"""Peak memory of `tinychat quantize` against the number of decoder layers: streaming quantization holds the
embeddings, one layer and the calibration activations, so the peak should not grow with the layers.

Writes random Llama-2-7B-shaped float16 Hugging Face directories (config.json, one safetensors shard per layer and
one for the embeddings, a byte-level tokenizer.json of the full vocabulary) with 2 and 4 layers under --work (a
temporary folder by default, never the project), runs `python -m tinychat quantize` on each in a subprocess for each
method, and reads the child's peak RSS (ru_maxrss, from os.wait4 of that child alone). The growth between the
smallest and largest layer counts is reported in layers' worth (one layer's float16 bytes, ~404 MB for 7B), with
the peak projected for a full Llama-2-7B (32 layers) and 70B (80 layers) from the fixed part, the working set of
one layer and the growth per layer; JSON into --out.

    python benchmarks/quantize_memory.py --methods rtn awq --n-samples 2 --seqlen 64 \\
        --out benchmarks/results/quantize_memory.json
    python benchmarks/quantize_memory.py --hidden 256 --intermediate 688 --heads 4 --kv-heads 4 --vocab 1000 \\
        --layers 1 2 --out /tmp/quantize_memory_toy.json     # a quick check of the script itself

Projection (per method, in bytes): peak(L) = base + skeleton + working * layer_params / layer_params_measured
+ L * growth_per_layer + activations, where base is a child that only imports tinychat, skeleton is the embedding
and lm_head in the dtype quantization holds them (tinychat.pipeline.quantize.search_dtype: float32 for the small
measured directories, bfloat16 for 7B and 70B), working = the measured peak at the smallest layer count less base,
skeleton and that count's growth (the fp32 layer, its quantization's temporaries, the X^T X Gram matrices: these
grow as K^2, scaled here by their own sizes), and activations the calibration's residual streams and captured
linear inputs, n * T * (5 C + I) elements in the holding dtype (0 for RTN), for the calibration given by
--project-samples / --project-seqlen (default 128 x 512, `tinychat quantize`'s default).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_info  # noqa: E402

LLAMA2_7B = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000, layers=32)
LLAMA2_70B = dict(hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=32000, layers=80)
GB = 1e9


def layer_params(s: dict) -> int:
    """Weights of one decoder layer's linears (q, k, v, o, gate, up, down); norms are negligible."""
    C, I, D = s["hidden"], s["intermediate"], s["hidden"] // s["heads"]
    return C * (s["heads"] * D) * 2 + C * (s["kv_heads"] * D) * 2 + 3 * C * I


def gram_bytes(s: dict) -> int:
    """The largest X^T X of a layer's search (the down projection's, K = I): fp64 accumulator and fp32 products."""
    return s["intermediate"] ** 2 * (8 + 4 + 4)


def skeleton_bytes(s: dict, n_layers: int) -> tuple[int, int]:
    """(bytes of the embedding and untied lm_head, bytes per element) in the dtype quantization holds them for a
    model of n_layers (tinychat.pipeline.quantize.search_dtype's rule)."""
    from tinychat.pipeline.quantize import FLOAT32_MAX_BYTES

    n_params = n_layers * layer_params(s) + 2 * s["vocab"] * s["hidden"]
    per = 4 if 4 * n_params <= FLOAT32_MAX_BYTES else 2
    return 2 * s["vocab"] * s["hidden"] * per, per


def write_random_hf_dir(path: Path, s: dict, n_layers: int, seed: int = 0) -> Path:
    """A random Llama-shaped float16 Hugging Face directory, written one layer at a time (weights ~ N(0, 0.02^2),
    norms near 1), with a byte-level tokenizer.json of the full vocabulary (the 256 byte symbols, <s>, </s>, and
    filler tokens); returns path."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    path.mkdir(parents=True)
    C, I, D, V = s["hidden"], s["intermediate"], s["hidden"] // s["heads"], s["vocab"]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).half()

    def norm():
        return (1 + torch.randn(C, generator=gen) * 0.1).half()

    n_files = n_layers + 1
    weight_map, total = {}, 0

    def shard(i: int, tensors: dict) -> None:
        nonlocal total
        file = f"model-{i:05d}-of-{n_files:05d}.safetensors"
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    for i in range(n_layers):
        p = f"model.layers.{i}."
        q, kv = s["heads"] * D, s["kv_heads"] * D
        shard(i + 1, {
            p + "self_attn.q_proj.weight": rand(q, C), p + "self_attn.k_proj.weight": rand(kv, C),
            p + "self_attn.v_proj.weight": rand(kv, C), p + "self_attn.o_proj.weight": rand(C, q),
            p + "mlp.gate_proj.weight": rand(I, C), p + "mlp.up_proj.weight": rand(I, C),
            p + "mlp.down_proj.weight": rand(C, I),
            p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
        })
    shard(n_files, {"model.embed_tokens.weight": rand(V, C), "model.norm.weight": norm(), "lm_head.weight": rand(V, C)})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": C, "intermediate_size": I,
              "num_hidden_layers": n_layers, "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"],
              "vocab_size": V, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": 257,
              "torch_dtype": "float16"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab = {sym: i for i, sym in enumerate(sorted(symbols))}
    vocab.update({"<s>": 256, "</s>": 257})
    vocab.update({f"<filler_{i}>": i for i in range(258, V)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                            "add_bos_token": True}))
    return path


def peak_rss(cmd: list[str], log: Path) -> tuple[int, int, float]:
    """Run cmd (its output to `log`); (exit status, its peak RSS in bytes from os.wait4, wall seconds)."""
    t0 = datetime.datetime.now()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return proc.returncode, usage.ru_maxrss * 1024, (datetime.datetime.now() - t0).total_seconds()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key in ("hidden", "intermediate", "heads", "kv_heads", "vocab"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=LLAMA2_7B[key])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="layer counts to measure (two or more)")
    ap.add_argument("--methods", nargs="+", default=["rtn", "awq"])
    ap.add_argument("--n-samples", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--project-samples", type=int, default=128)
    ap.add_argument("--project-seqlen", type=int, default=512)
    ap.add_argument("--work", help="folder for the random directories and checkpoints (default: a temporary one)")
    ap.add_argument("--out")
    args = ap.parse_args()
    shape = {k: getattr(args, k) for k in ("hidden", "intermediate", "heads", "kv_heads", "vocab")}
    layers = sorted(args.layers)
    with tempfile.TemporaryDirectory(prefix="tinychat-qmem-", dir=args.work) as work:
        work = Path(work)
        dirs = {n: write_random_hf_dir(work / f"src-{n}", shape, n) for n in layers}
        code, base, _ = peak_rss([sys.executable, "-c", "import torch, tinychat.cli, tinychat.pipeline.quantize"],
                                 work / "base.log")
        assert code == 0, (work / "base.log").read_text()
        rows = []
        for method in args.methods:
            for n in layers:
                out, log = work / f"out-{method}-{n}", work / f"{method}-{n}.log"
                code, rss, secs = peak_rss([sys.executable, "-m", "tinychat", "quantize", str(dirs[n]),
                                            "--out", str(out), "--method", method, "--n-samples", str(args.n_samples),
                                            "--seqlen", str(args.seqlen)], log)
                if code != 0:
                    raise SystemExit(f"tinychat quantize failed ({method}, {n} layers):\n{log.read_text()[-3000:]}")
                print(f"{method} {n} layers: peak RSS {rss / GB:.2f} GB ({secs:.0f} s)", flush=True)
                rows.append({"method": method, "layers": n, "peak_rss_bytes": rss, "seconds": round(secs, 1)})
    layer_fp16 = 2 * layer_params(shape)
    result = {"benchmark": "quantize_memory", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": machine_info(), "shape": shape, "n_samples": args.n_samples, "seqlen": args.seqlen,
              "layer_fp16_bytes": layer_fp16, "base_rss_bytes": base, "rows": rows, "methods": {}}
    for method in args.methods:
        peaks = {r["layers"]: r["peak_rss_bytes"] for r in rows if r["method"] == method}
        lo, hi = layers[0], layers[-1]
        growth = peaks[hi] - peaks[lo]
        per_layer = growth / (hi - lo)
        skeleton, _ = skeleton_bytes(shape, lo)
        working = peaks[lo] - base - skeleton - lo * per_layer  # one layer's working set, measured
        # the projection takes a negative working set or growth (measurement noise, on a small shape) as 0
        working_p, per_layer_p = max(0.0, working - (gram_bytes(shape) if method != "rtn" else 0)), max(0.0, per_layer)
        summary = {"growth_bytes": growth, "growth_layers_worth": round(growth / layer_fp16, 3),
                   "growth_per_layer_bytes": round(per_layer), "working_set_bytes": round(working),
                   "projected_peak_bytes": {}}
        for name, target in (("llama2-7b", LLAMA2_7B), ("llama2-70b", LLAMA2_70B)):
            ratio = layer_params(target) / layer_params(shape)
            skel, per = skeleton_bytes(target, target["layers"])
            work_target = working_p * ratio + (gram_bytes(target) if method != "rtn" else 0)
            acts = 0 if method == "rtn" else (args.project_samples * args.project_seqlen
                                               * (5 * target["hidden"] + target["intermediate"]) * per)
            over_layers = target["layers"] * per_layer_p * ratio
            peak = base + skel + work_target + over_layers + acts
            summary["projected_peak_bytes"][name] = {"total": round(peak), "skeleton": skel,
                                                     "one_layer_working_set": round(work_target), "activations": acts,
                                                     "growth_over_layers": round(over_layers)}
            print(f"{method}: projected peak for {name}: {peak / GB:.1f} GB (activations for "
                  f"{args.project_samples} x {args.project_seqlen}: {acts / GB:.1f} GB)")
        print(f"{method}: peak RSS grows by {growth / GB:.3f} GB from {lo} to {hi} layers = "
              f"{growth / layer_fp16:.2f} layers' worth ({layer_fp16 / 1e6:.0f} MB each)")
        result["methods"][method] = summary
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
