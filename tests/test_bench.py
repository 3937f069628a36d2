"""`tinychat bench`: random-shape and real-model runs, the JSON, the plot, bad input."""

import json
import subprocess
import sys

import pytest

from tinychat.cli import main

SMOLLM2_PARAMS = 134_515_008  # SmolLM2-135M's parameter count (tied embeddings), from its public checkpoint


def run_bench(*args):
    return subprocess.run([sys.executable, "-m", "tinychat", "bench", *args], check=False, capture_output=True,
                          text=True, timeout=600)


def test_random_shape_truncated_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "r" / "bench.json", tmp_path / "bench.png"
    out = run_bench("--shape", "smollm2-135m", "--layers", "1", "--dtypes", "float32,int4", "--prompt-lens", "4,8",
                    "--ctx-lens", "8,16", "--decode-tokens", "3", "--repeats", "2", "--threads", "1",
                    "--json", str(out_json), "--plot", str(out_png))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    for text in ("first 1 of 30 layers", "prefill", "decode", "est. full tok/s", "model MB", "peak memory MB"):
        assert text in out.stdout, text

    r = json.loads(out_json.read_text())
    assert (r["model"], r["source"], r["layers"], r["total_layers"], r["truncated"]) == (
        "smollm2-135m", "random weights", 1, 30, True)
    assert r["config"]["hidden_size"] == 576 and r["config"]["num_layers"] == 30
    assert r["settings"]["repeats"] == 2 and r["settings"]["warmup_runs"] == 1
    m = r["machine"]
    assert m["threads"] == 1 and m["cpu"] and m["torch"] and m["device_name"] and m["device"] == "cpu"
    assert [x["dtype"] for x in r["results"]] == ["float32", "int4"]
    for x in r["results"]:
        assert x["weights"] == "random"
        assert x["peak_memory_bytes"] > x["model_bytes"] > 0 and "RSS" in x["peak_memory_kind"]
        assert [p["prompt_len"] for p in x["prefill"]] == [4, 8]
        for p in x["prefill"]:
            assert len(p["ttft_s_runs"]) == 2 and 0 < p["ttft_s"] < 60
            assert p["tok_s"] == pytest.approx(p["prompt_len"] / p["ttft_s"])
            assert 0 < p["est_full_tok_s"] < p["tok_s"]
        assert [d["ctx_len"] for d in x["decode"]] == [8, 16]
        for d in x["decode"]:
            assert len(d["ms_per_token_runs"]) == 2 and 0 < d["ms_per_token"] < 60_000
            assert d["tok_s"] == pytest.approx(1000 / d["ms_per_token"])
            assert d["gb_s"] == pytest.approx(x["model_bytes"] * d["tok_s"] / 1e9)
            assert 0 < d["est_full_tok_s"] < d["tok_s"]

    fp32, int4 = r["results"]
    # the whole model in float32 is SmolLM2-135M's parameter count x 4 bytes (computed from one built layer)
    assert fp32["full_model_bytes"] == 4 * SMOLLM2_PARAMS
    assert fp32["model_bytes"] == fp32["other_bytes"] + fp32["layer_bytes"]
    # random 4-bit linears are symmetric (Q4_0's form): half a byte per weight plus an fp32 scale per group of 64 ->
    # 4 / 0.5625 = 7.11x smaller
    assert fp32["linear_bytes"] / int4["linear_bytes"] == pytest.approx(4 / 0.5625)
    assert int4["other_bytes"] == fp32["other_bytes"]  # embeddings stay float32 (--dtype)
    assert int4["model_bytes"] < fp32["model_bytes"]

    png = out_png.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    image = matplotlib.image.imread(str(out_png))
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400


def test_default_model_full_precision_and_rtn_int4(tmp_path, smollm2_gguf):
    out_json = tmp_path / "real.json"
    out = run_bench("--quant", "none", "--dtypes", "float32,int4", "--prompt-lens", "4", "--ctx-lens", "8",
                    "--decode-tokens", "2", "--repeats", "1", "--json", str(out_json))
    assert out.returncode == 0, out.stderr
    assert "RTN" in out.stdout and "est. full" not in out.stdout
    r = json.loads(out_json.read_text())
    assert r["model"] == smollm2_gguf.name and r["truncated"] is False and r["layers"] == 30
    fp32, int4 = r["results"]
    assert (fp32["weights"], int4["weights"]) == ("loaded", "rtn")
    assert fp32["model_bytes"] == 4 * SMOLLM2_PARAMS
    assert int4["linear_bytes"] * 6.4 == pytest.approx(fp32["linear_bytes"])
    for x in r["results"]:
        assert x["prefill"][0]["prompt_len"] == 4 and x["prefill"][0]["tok_s"] > 0
        assert x["decode"][0]["ctx_len"] == 8 and x["decode"][0]["tok_s"] > 0 and x["decode"][0]["gb_s"] > 0


@pytest.mark.parametrize("args, message", [
    (["--shape", "llama-9b"], "unknown shape 'llama-9b'; known shapes: smollm2-135m,"),
    (["--shape", "smollm2-135m", "--dtypes", "float32,int3"], "unknown dtype 'int3'"),
    (["--shape", "smollm2-135m", "--layers", "0"], "--layers must be >= 1"),
    (["--shape", "tinyllama-1.1b", "--layers", "1", "--ctx-lens", "4096"], "--ctx-lens 4096 is beyond the model's"),
    (["--shape", "tinyllama-1.1b", "--layers", "1", "--prompt-lens", "2048"], "at most 2047"),
    (["--shape", "smollm2-135m", "--prompt-lens", "8,x"], "comma-separated token counts"),
    (["--shape", "smollm2-135m", "--repeats", "0"], "--repeats must be >= 1"),
    (["--layers", "2", "--quant", "none"], "--layers applies to --shape"),
    (["model.gguf", "--shape", "llama-2-7b"], "not both"),
])
def test_bad_input_is_one_line(args, message, capsys):
    assert main(["bench", *args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("tinychat: error:"), err


def test_bad_input_from_the_command_line():
    out = run_bench("--shape", "llama-9b")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "known shapes" in out.stderr
