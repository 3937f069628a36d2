"""`tinychat quantize` and the quantize-on-first-use cache, on a tiny model: files, loading, options, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinychat.config import ModelConfig
from tinychat.errors import TinychatError
from tinychat.io.loader import load_model, open_source
from tinychat.linear import WQLinear
from tinychat.pipeline import quantize as pipeline
from tinychat.pipeline.quantize import QuantizeOptions, cached_quantized_model, quantize_checkpoint, search_dtype
from tinychat.quant.quantize import auto_group_size

PROMPT = "hello world, the quick brown fox"
# small calibration text in the tiny tokenizer's alphabet: the byte-level BPE needs no particular words
CALIB_TEXT = "\n\n".join(f"the quick brown fox {i} jumps over the lazy dog, hello world {i * 7}" for i in range(60))
FAST = dict(n_samples=4, seqlen=32)  # a few short blocks keep the tiny search quick


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tinychat", *args], capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.fixture(scope="module")
def src(tmp_path_factory, make_hf_dir):
    return make_hf_dir(tmp_path_factory.mktemp("quantize") / "src", "llama")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT)
    return path


def logits(model, tokenizer):
    with torch.no_grad():
        return model(torch.tensor([tokenizer.encode(PROMPT)]))[0]


def test_cli_quantize_awq_then_load_and_generate(src, calib_file, tmp_path):
    out = tmp_path / "awq"
    r = run_cli("quantize", str(src), "--out", str(out), "--calib", str(calib_file), "--n-samples", "4",
                "--seqlen", "32")
    assert r.returncode == 0, r.stderr
    # the default method; 64 = the largest group that divides 64/128
    assert f"wrote {out}" in r.stdout and "AWQ-GPTQ w4 g64" in r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 64,
                                             "zero_point": True, "modules_to_not_convert": None}
    # streamed: a shard per decoder layer, then the embeddings' (tests/test_quantize_stream.py)
    assert {"model.safetensors.index.json", "model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors",
            "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left

    model, tokenizer = load_model(out)
    assert isinstance(model.layers[0].mlp.w13, WQLinear) and model.layers[0].mlp.w13.group_size == 64
    fp, _ = load_model(src)
    err = (logits(model, tokenizer) - logits(fp, tokenizer)).abs().max() / logits(fp, tokenizer).abs().max()
    assert 0 < err < 0.1  # quantized: close to the float model, not equal
    r = run_cli("generate", str(out), PROMPT, "--temperature", "0", "--max-new-tokens", "5", "--raw")
    assert r.returncode == 0, r.stderr


def test_rtn_and_awq_differ_and_awq_is_deterministic(src, calib_file, tmp_path):
    opts = QuantizeOptions(calib=str(calib_file), **FAST)
    a = load_model(quantize_checkpoint(src, tmp_path / "a", opts, progress=False, log=lambda m: None))[0]
    b = load_model(quantize_checkpoint(src, tmp_path / "b", opts, progress=False, log=lambda m: None))[0]
    rtn_opts = QuantizeOptions(method="rtn", group_size=32)
    c = load_model(quantize_checkpoint(src, tmp_path / "c", rtn_opts, progress=False, log=lambda m: None))[0]
    for name in ("qweight", "scales", "offsets"):
        assert torch.equal(getattr(a.layers[1].attn.wqkv, name), getattr(b.layers[1].attn.wqkv, name))
    assert c.layers[0].attn.wo.group_size == 32
    assert not torch.equal(a.layers[0].attn_norm, c.layers[0].attn_norm)  # AWQ folded scales into the norm


def test_quantized_inputs_option_changes_the_later_layers_only(src, calib_file, tmp_path):
    base = load_model(quantize_checkpoint(src, tmp_path / "fp-inputs", QuantizeOptions(calib=str(calib_file), **FAST),
                                          progress=False, log=lambda m: None))[0]
    out = tmp_path / "q-inputs"
    r = run_cli("quantize", str(src), "--out", str(out), "--calib", str(calib_file), "--n-samples",
                str(FAST["n_samples"]), "--seqlen", str(FAST["seqlen"]), "--quantized-inputs")
    assert r.returncode == 0, r.stderr
    qin = load_model(out)[0]
    # layer 0 sees the same (embedding) inputs either way; layer 1 sees a quantized layer 0's outputs
    assert torch.equal(base.layers[0].attn.wqkv.qweight, qin.layers[0].attn.wqkv.qweight)
    assert not torch.equal(base.layers[1].mlp.w13.scales, qin.layers[1].mlp.w13.scales)


def test_three_bit_writes_a_fake_quantized_float16_model(src, calib_file, tmp_path):
    out = tmp_path / "w3"
    r = run_cli("quantize", str(src), "--out", str(out), "--w-bit", "3", "--group-size", "32", "--method", "rtn")
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tinychat_fake_quant"]["bits"] == 3 and config["tinychat_fake_quant"]["group_size"] == 32
    model, _ = load_model(out)
    w = model.layers[0].mlp.w2.weight.view(model.config.hidden_size, -1, 32)  # [N, K/G, G]
    for row in w.flatten(0, 1)[:50]:  # each group holds at most 2^3 distinct levels
        assert len(torch.unique(row)) <= 8


@pytest.mark.parametrize("args, message", [
    (["--group-size", "128"], "layers.0.attn.wqkv: group size 128 does not divide its 64 input features"),
    (["--calib", "{empty}"], "the calibration file is empty"),
    (["--calib", "{short}"], "too little text for one calibration block"),
    (["--calib", "/no/such/calib.jsonl"], "/no/such/calib.jsonl"),
    (["--w-bit", "5"], "invalid choice: 5"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(src, tmp_path, args, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "short.txt").write_text("hello world")
    args = [a.format(empty=tmp_path / "empty.txt", short=tmp_path / "short.txt") for a in args]
    out = tmp_path / "out"
    r = run_cli("quantize", str(src), "--out", str(out), "--seqlen", "64", *args)
    assert r.returncode in (1, 2) and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_directory_errors_come_before_any_work(src, tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(pipeline, "open_source", no_load)
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(TinychatError, match="existing: already exists"):
        quantize_checkpoint(src, existing, QuantizeOptions(method="rtn"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(TinychatError, match="cannot write a checkpoint there"):
        quantize_checkpoint(src, tmp_path / "a_file" / "out", QuantizeOptions(method="rtn"))
    # a folder nothing can be created in, whoever runs this (root passes permission checks, not /proc's)
    with pytest.raises(TinychatError, match="/proc/tinychat-out: cannot write a checkpoint there .*not writable"):
        quantize_checkpoint(src, "/proc/tinychat-out", QuantizeOptions(method="rtn"))
    assert not list(Path("/proc").glob(".tinychat-out.probe-*"))
    if os.geteuid() != 0:  # and a permission a user lacks
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(TinychatError, match="not writable"):
            quantize_checkpoint(src, locked / "out", QuantizeOptions(method="rtn"))
    assert not [p for p in tmp_path.rglob("*probe*")]  # the probes leave nothing


def test_interrupted_quantization_leaves_nothing(src, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "quantize_layers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, tmp_path / "out", QuantizeOptions(), log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_quantizing_a_quantized_checkpoint_is_refused(src, tmp_path):
    out = quantize_checkpoint(src, tmp_path / "q", QuantizeOptions(method="rtn"), log=lambda m: None)
    with pytest.raises(TinychatError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again", QuantizeOptions(method="rtn"))


def test_auto_group_size(src):
    assert auto_group_size(open_source(src).config) == 64  # in_features 64 and 128


def test_cache_quantizes_once_per_model_and_options(src, tmp_path, monkeypatch):
    monkeypatch.setenv("TINYCHAT_CACHE", str(tmp_path / "cache"))
    calls = []
    real = pipeline.quantize_checkpoint

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "quantize_checkpoint", counting)
    opts = QuantizeOptions(**FAST)  # the built-in corpus
    first = cached_quantized_model(src, opts, progress=False, log=lambda m: None)
    assert first.parent == tmp_path / "cache" and (first / "config.json").exists()
    assert cached_quantized_model(src, opts, log=lambda m: None) == first
    assert cached_quantized_model(src, QuantizeOptions(**FAST, device="meta"), log=lambda m: None) == first
    assert len(calls) == 1
    other = cached_quantized_model(src, QuantizeOptions(method="rtn"), log=lambda m: None)
    assert other != first and len(calls) == 2
    assert cached_quantized_model(first, opts) == first  # a quantized model is used as it is
    model, _ = load_model(first)
    assert isinstance(model.layers[0].attn.wqkv, WQLinear)


def test_cli_quant_flag_runs_a_named_model_in_four_bits(src, tmp_path):
    env = dict(os.environ, TINYCHAT_CACHE=str(tmp_path / "cache"))
    r = run_cli("generate", str(src), PROMPT, "--quant", "awq", "--temperature", "0", "--max-new-tokens", "4",
                "--raw", env=env)
    assert r.returncode == 0, r.stderr
    assert "first use" in r.stderr and len(list((tmp_path / "cache").iterdir())) == 1


@pytest.mark.parametrize("sig, status, says", [
    (signal.SIGINT, 130, "interrupted; nothing was written to"), (signal.SIGTERM, 143, "")])
def test_a_signal_during_the_search_leaves_nothing(smollm2_gguf, tmp_path, sig, status, says):
    """Ctrl-C (SIGINT) and SIGTERM stop the search and leave no temporary directory behind; Ctrl-C says so and that
    the run cannot resume."""
    out = tmp_path / "out"
    # the signal delivered as a terminal or a service manager delivers it, even when this test runs where SIGINT is
    # ignored (`pytest &`)
    proc = subprocess.Popen([sys.executable, "-m", "tinychat", "quantize", "--out", str(out)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stderr:  # wait until the search has started
        lines.append(line)
        if line.startswith("quantizing:"):
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, "".join(lines) + err
    assert says in err and "Traceback" not in err
    assert sig != signal.SIGINT or "cannot resume: run the command again" in err
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_a_previous_checkpoint(src, tmp_path, monkeypatch):
    """overwrite never deletes what it did not write: a folder that is not a checkpoint, the current directory or
    one above it, the source or a folder holding it are refused before any work; a previous checkpoint is replaced,
    with the usual permissions (umask), not mkdtemp's 0700."""
    opts = QuantizeOptions(method="rtn")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    with pytest.raises(TinychatError, match="not a previous checkpoint"):
        quantize_checkpoint(src, notes, opts, overwrite=True)
    assert (notes / "keep.txt").read_text() == "mine"

    out = quantize_checkpoint(src, tmp_path / "ckpt", opts, progress=False, log=lambda m: None)
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~mask for f in out.iterdir())
    again = quantize_checkpoint(src, out, opts, overwrite=True, progress=False, log=lambda m: None)
    assert again == out and (out / "config.json").is_file()

    monkeypatch.chdir(out)  # "." and its parents
    for here in (".", out, out.parent):
        with pytest.raises(TinychatError, match="refusing to replace the current directory"):
            quantize_checkpoint(src, here, opts, overwrite=True)
    monkeypatch.chdir(tmp_path)
    inside = out / "source"  # a source inside the checkpoint it would replace
    shutil.copytree(src, inside)
    with pytest.raises(TinychatError, match="refusing to replace the model being quantized"):
        quantize_checkpoint(inside, out, opts, overwrite=True)
    assert (out / "config.json").is_file()


def test_large_models_are_held_in_bfloat16_while_quantized():
    llama2_7b = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                            num_kv_heads=32, head_dim=128, max_position_embeddings=4096)
    smollm2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                          num_kv_heads=3, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True)
    assert search_dtype(llama2_7b) == "bfloat16"  # 6.7e9 params: 27 GB in float32 would not fit 24 GiB
    assert search_dtype(smollm2) == "float32"


def test_each_file_is_opened_once(src, tmp_path, monkeypatch):
    """Quantizing on first use reads the source's header once and keeps it (no second parse to load the weights);
    loading then opens the source and the cached checkpoint once each."""
    import tinychat
    from tinychat.io import loader

    opened = []
    real = loader.read_hf_dir
    monkeypatch.setattr(loader, "read_hf_dir", lambda path: opened.append(path.resolve()) or real(path))
    monkeypatch.setenv("TINYCHAT_CACHE", str(tmp_path / "cache"))
    out = cached_quantized_model(src, QuantizeOptions(method="rtn"), log=lambda m: None)
    assert opened == [src.resolve()]
    opened.clear()
    monkeypatch.setattr(pipeline, "QuantizeOptions", lambda **k: QuantizeOptions(method="rtn", **k))
    llm = tinychat.load(src, quant="awq", max_seq_len=32)
    assert opened == [src.resolve(), out.resolve()] and llm.name == out.name
