"""Perplexity: the window arithmetic against a hand computation, WikiText loading, SmolLM2 and the CLI."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tinychat.config import ModelConfig
from tinychat.errors import TinychatError
from tinychat.model import Transformer
from tinychat.ppl import load_wikitext, perplexity, wikitext_rows

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, max_position_embeddings=128)


class CharTokenizer:
    """One token per character (mod the vocabulary), plus a BOS like Llama's tokenizers add by default."""

    def encode(self, text):
        return [1] + [ord(c) % CFG.vocab_size for c in text]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Transformer(CFG)
    torch.nn.init.normal_(model.embed.weight)
    return model.eval().requires_grad_(False)


TEXT = "".join(chr(97 + (i * 7 + i // 5) % 26) for i in range(1000))  # 1001 tokens with the BOS


def test_perplexity_matches_a_hand_computation(tiny):
    result = perplexity(tiny, CharTokenizer(), TEXT, seqlen=64, progress=False)
    ids = torch.tensor(CharTokenizer().encode(TEXT))
    windows = ids[: 15 * 64].view(15, 64)  # 1001 // 64 = 15 windows; the 41-token tail is dropped
    logits = tiny(windows)  # [15, 64, V], every window from position 0
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, CFG.vocab_size), windows[:, 1:].reshape(-1))
    assert result.windows == 15 and result.tokens_evaluated == 15 * 63
    assert result.nll_mean == pytest.approx(nll.item(), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_windows_tail_and_max_windows(tiny):
    full = perplexity(tiny, CharTokenizer(), TEXT, seqlen=64, progress=False)
    other_tail = perplexity(tiny, CharTokenizer(), TEXT[:-41] + "z" * 41, seqlen=64, progress=False)
    assert other_tail == full  # the tail that fills no window is not scored
    four = perplexity(tiny, CharTokenizer(), TEXT, seqlen=64, max_windows=4, progress=False)
    first_four = perplexity(tiny, CharTokenizer(), TEXT[: 4 * 64 - 1], seqlen=64, progress=False)
    assert four.windows == 4 and four.tokens_evaluated == 4 * 63 and four == first_four
    assert perplexity(tiny, CharTokenizer(), TEXT, seqlen=128, max_windows=99, progress=False).windows == 7


def test_kv_cache_is_bypassed_and_restored(tiny):
    expected = perplexity(tiny, CharTokenizer(), TEXT, seqlen=64, progress=False)
    tiny.setup_kv_cache(16)  # smaller than a window: would fail if the windows went through it
    try:
        assert perplexity(tiny, CharTokenizer(), TEXT, seqlen=64, progress=False) == expected
        assert tiny.max_seq_len == 16
    finally:
        for layer in tiny.layers:
            layer.attn.kv_cache = None


@pytest.mark.parametrize("kwargs, message", [
    ({"seqlen": 129}, "exceeds the model's context length 128"),
    ({"seqlen": 1}, "seqlen must be >= 2"),
    ({"seqlen": 64, "max_windows": 0}, "max_windows must be >= 1"),
])
def test_bad_arguments(tiny, kwargs, message):
    with pytest.raises(TinychatError, match=message):
        perplexity(tiny, CharTokenizer(), TEXT, progress=False, **kwargs)


def test_text_shorter_than_one_window(tiny):
    with pytest.raises(TinychatError, match="11 tokens, fewer than one window of 64"):
        perplexity(tiny, CharTokenizer(), "ten chars.", seqlen=64, progress=False)


def test_wikitext_rows_from_raw(tmp_path):
    raw = " \n = Title = \n \n Some text . \n \n"
    assert wikitext_rows(raw) == ["", " = Title = \n", "", " Some text . \n", ""]
    (tmp_path / "wiki.test.raw").write_text(raw)
    (tmp_path / "rows.json").write_text(json.dumps(wikitext_rows(raw)))
    assert load_wikitext(tmp_path / "wiki.test.raw") == load_wikitext(tmp_path / "rows.json")
    assert load_wikitext(tmp_path / "rows.json") == "\n\n = Title = \n" + "\n\n" + "\n\n" + " Some text . \n" + "\n\n"
    (tmp_path / "bad.json").write_text('{"text": "not a list"}')
    with pytest.raises(TinychatError, match="list of strings"):
        load_wikitext(tmp_path / "bad.json")
    with pytest.raises(TinychatError, match="no such file"):
        load_wikitext(tmp_path / "missing.txt")


@pytest.fixture(scope="module")
def wiki_raw(shared_data):
    return shared_data("wikitext2_raw_test.txt")


@pytest.fixture(scope="module")
def wiki_rows(shared_data):
    return shared_data("wikitext2_raw_test_hf_rows.json")


def test_shared_wikitext_files_give_the_same_text(wiki_raw, wiki_rows):
    from_raw, from_rows = load_wikitext(wiki_raw), load_wikitext(wiki_rows)
    assert from_raw == from_rows == "\n\n".join(json.loads(wiki_rows.read_text(encoding="utf-8")))
    assert from_raw.startswith("\n\n = Robert Boulter = \n") and len(from_raw) == 1_294_336


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from tinychat.io.loader import load_model

    return load_model(smollm2_gguf)


def test_smollm2_wikitext2_ppl_and_cli(wiki_raw, smollm2):
    model, tokenizer = smollm2
    result = perplexity(model, tokenizer, load_wikitext(wiki_raw), seqlen=512, max_windows=2, progress=False)
    assert result.windows == 2 and result.tokens_evaluated == 2 * 511
    assert math.isfinite(result.ppl) and 5 < result.ppl < 60, result

    out = subprocess.run([sys.executable, "-m", "tinychat", "ppl", "--data", str(wiki_raw), "--seqlen", "512",
                          "--max-windows", "2", "--quant", "none"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"perplexity: {result.ppl:.4f}" in out.stdout
    assert "tokens evaluated: 1022" in out.stdout and "windows: 2 x 512" in out.stdout


def test_cli_errors_are_one_clear_line(smollm2_gguf, tmp_path):
    out = subprocess.run([sys.executable, "-m", "tinychat", "ppl", "--data", str(tmp_path / "none.txt")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "no such file" in out.stderr and "Traceback" not in out.stderr
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([" = Title = \n", " Some text . \n"] * 50))
    out = subprocess.run([sys.executable, "-m", "tinychat", "ppl", "--data", str(rows), "--seqlen", "100000",
                          "--quant", "none"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "exceeds the model's context length" in out.stderr, out.stderr
