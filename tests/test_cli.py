"""`tinychat chat` and `tinychat generate` as a user runs them (default model, piped input)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "tinychat", *args], input=stdin, capture_output=True, text=True,
                          timeout=900)  # the first 4-bit use quantizes the default model (minutes)


def test_chat_full_precision_multi_turn_then_exit(smollm2_gguf):
    out = run_cli("chat", "--quant", "none", "--temperature", "0", "--max-new-tokens", "48",
                  stdin="What is the capital of France?\nAnd of Germany?\n/exit\nnever read\n")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "Berlin" in out.stdout  # the second answer needed the first turn
    assert "never read" not in out.stdout
    assert "4 bits" not in out.stderr and ".gguf (float32" in out.stderr


def test_chat_default_model_runs_its_blocks(smollm2_gguf):
    """The default model runs its Q4_1 blocks as shipped: loaded from the GGUF itself, nothing quantized or cached on
    first use; it answers, and keeps the conversation."""
    out = run_cli("chat", "--temperature", "0", "--max-new-tokens", "40",
                  stdin="What is the capital of France?\nRepeat your last answer.\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert f"loading {smollm2_gguf}" in out.stderr and "first use" not in out.stderr
    assert not any(Path(os.environ["TINYCHAT_CACHE"]).glob("*"))
    assert out.stdout.count("Paris") >= 2, out.stdout  # the second answer needed the first turn


def test_chat_exits_cleanly_on_eof(smollm2_gguf):
    out = run_cli("chat", "--temperature", "0", "--max-new-tokens", "8", stdin="Hi\n\n/stats\n")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    # piped: the answer alone on stdout, no prompts (">>> >>>" for the empty line and the command before)
    assert ">>>" not in out.stdout and ">>>" not in out.stderr and out.stdout.strip()


def test_generate_prints_stats(smollm2_gguf):
    out = run_cli("generate", "--temperature", "0", "--max-new-tokens", "16", "What is 2+2?")
    assert out.returncode == 0, out.stderr
    assert "tok/s" in out.stderr and out.stdout.strip()


@pytest.mark.parametrize("args, message", [
    (["chat", "/no/such/model.gguf"], "no such file"),
    (["generate", "--temperature", "-1", "hi"], "temperature must be finite and >= 0"),
    (["chat", "--dtype", "float8"], "unknown dtype"),
    (["generate", "--threads", "-1", "hi"], "threads must be a whole number >= 1, got -1"),
    (["generate", "--threads", "0", "hi"], "threads must be a whole number >= 1, got 0"),
    (["generate", "--device", "tpu", "hi"], "unknown device 'tpu'"),
    (["generate", "--device", "mps", "hi"], "tinychat runs on cpu or cuda"),
    (["generate", "--device", "cuda:64", "hi"], "device 'cuda:64': "),  # no GPU, or not that many
    (["generate", "--ctx", "1000000000", "hi"], "must be 1 .. 8192, this model's context length; got 1000000000"),
    (["generate", "--ctx", "-5", "hi"], "got -5"),
    (["quantize", "--threads", "0", "x", "--out", "y"], "threads must be a whole number >= 1"),
    (["generate", "--repetition-penalty", "inf", "hi"], "repetition_penalty must be finite"),
])
def test_bad_input_is_one_clear_line(args, message, smollm2_gguf):
    out = run_cli(*args)
    assert out.returncode == 1
    assert message in out.stderr and "Traceback" not in out.stderr


def test_serve_on_a_port_in_use_fails_before_loading(smollm2_gguf):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = run_cli("serve", "--port", str(port))
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr
    assert "loading" not in out.stderr  # refused before the model loads


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.mark.parametrize("tty", [False, True])
def test_a_long_prefill_shows_progress(monkeypatch, tty):
    """The chat's prefill progress: nothing for a prompt read in under 2 s; for a longer one, on a terminal a line
    updated in place with the time left and cleared when the answer starts; piped, one line saying how long."""
    import io

    from tinychat import chat

    clock = _Clock()
    monkeypatch.setattr(chat.time, "perf_counter", clock)

    class Err(io.StringIO):
        def isatty(self):
            return tty

    fast, slow = Err(), Err()
    for err, per_chunk in ((fast, 0.3), (slow, 1.0)):
        progress = chat.PrefillProgress(err)
        for done in (256, 512, 600):
            clock.t += per_chunk
            progress(done, 600)
    assert fast.getvalue() == ""  # 0.3 s of 600 / 256 chunks: 0.7 s expected
    if tty:
        assert slow.getvalue() == ("\r\033[K[reading the prompt: 256 of 600 tokens, about 1 s left]"
                                   "\r\033[K[reading the prompt: 512 of 600 tokens, about 0 s left]\r\033[K")
    else:
        assert slow.getvalue() == "[reading a long prompt: 600 tokens, about 2 s]\n"
