"""The second real model, Gemma 3 270M (Q4_K_M GGUF: Q4_K, Q5_0, Q6_K and Q8_0 blocks), in the one decoder: its
config from the file's metadata, its blocks run as stored, the 262k-row embedding kept in its blocks, sliding layers'
KV caches holding their window, and its logits and greedy tokens against transformers (the file dequantized) and
llama.cpp (the same file)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tinychat.engine import Engine, SamplingParams
from tinychat.io.loader import open_source
from tinychat.linear import GroupEmbedding
from tinychat.model import WINDOW_SLACK

PROMPTS = ["The capital of France is", "def fibonacci(n):", "The three primary colors are",
           "Water boils at a temperature of"]
N_TOKENS = 32


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf):
    return open_source(gemma3_gguf).load()


def test_config_from_metadata(gemma3):
    cfg = gemma3.model.config
    assert cfg.architecture == "Gemma3ForCausalLM" and cfg.vocab_size == 262144 and cfg.head_dim == 256
    assert cfg.layer_types == tuple((["sliding_attention"] * 5 + ["full_attention"]) * 3)
    assert cfg.sliding_window == 512 and cfg.rope.theta == 1e6 and cfg.rope_local.theta == 1e4
    assert cfg.hidden_act == "gelu_tanh" and cfg.qk_norm and cfg.post_norms and cfg.embed_scale == 640**0.5
    assert cfg.attn_scale == 256**-0.5


def test_embedding_stays_in_blocks_and_is_the_head(gemma3):
    """262144 x 640 in fp32 would be 671 MB: the Q8_0 table is looked up row by row and is the tied head too."""
    model = gemma3.model
    assert isinstance(model.embed, GroupEmbedding)
    assert model.lm_head is model.embed.table
    floats = sum(p.numel() * p.element_size() for p in model.parameters() if p.is_floating_point())
    assert floats < 50e6, floats


def test_sliding_layers_cache_their_window(gemma3):
    model = gemma3.model
    Engine(model, gemma3.tokenizer, max_seq_len=4096)
    rows = [layer.attn.kv_cache.k.shape[2] for layer in model.layers]
    assert rows == [4096 if t == "full_attention" else 512 + WINDOW_SLACK for t in model.config.layer_types]


def _greedy(model, tokenizer, ids: list[int]) -> list[int]:
    engine = Engine(model, tokenizer, max_seq_len=256)
    return list(engine.generate(ids, SamplingParams(max_new_tokens=N_TOKENS), stop_ids=()))


@pytest.fixture(scope="module")
def hf_gemma3(gemma3_gguf):
    """transformers' float32 model from the same file (its own dequantization and Gemma 3 code)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(str(gemma3_gguf.parent), gguf_file=gemma3_gguf.name,
                                                             dtype=torch.float32).eval()


def test_logits_match_transformers_on_the_dequantized_file(gemma3_gguf, hf_gemma3):
    """The file dequantized to fp32, ours against transformers', over a prompt longer than the window is not: the
    window is exercised by the tiny configs of tests/test_model.py; here every real tensor and config value."""
    loaded = open_source(gemma3_gguf).load(blocks=False)
    ids = loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    with torch.no_grad():
        ours = loaded.model(torch.tensor([ids]))[0]
        theirs = hf_gemma3(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=2e-3)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (built as in benchmarks/bench_cpu_int4.py)")
def test_greedy_tokens_match_llama_cpp(gemma3, gemma3_gguf):
    """32 greedy tokens of 4 prompts, ours (blocks as stored) against llama.cpp on the same file: at least 3 of 4
    the same, and a difference only at a near-tie (our top two logits there within 0.3)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(gemma3_gguf), n_ctx=256, n_threads=torch.get_num_threads(), verbose=False)
    same, gaps = 0, []
    for text in PROMPTS:
        ids = gemma3.tokenizer.encode(text)
        ours = _greedy(gemma3.model, gemma3.tokenizer, ids)
        llm.reset()
        gen = llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0)
        theirs = [next(gen) for _ in range(N_TOKENS)]
        if ours == theirs:
            same += 1
            continue
        i = next(j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        with torch.no_grad():
            top2 = gemma3.model(torch.tensor([ids + ours[:i]]))[0, -1].topk(2).values
        gaps.append(float(top2[0] - top2[1]))
    assert same >= 3 and all(g < 0.3 for g in gaps), (same, gaps)
