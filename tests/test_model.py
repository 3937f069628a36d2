"""The decoder against Hugging Face transformers on the same (tiny, random) weights, for every supported family."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tinychat.model  # noqa: E402
from tinychat.config import ModelConfig  # noqa: E402
from tinychat.io.hf import read_hf_dir  # noqa: E402
from tinychat.io.loader import build_model  # noqa: E402

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=211,
            max_position_embeddings=256)
FAMILIES = {
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "llama3-gqa-tied-ropescaling": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32))),
    "llama-bias": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
    "llama-linear-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "mistral-gqa": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2-bias-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "smollm2-like-headdim": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=2, num_key_value_heads=1,
                                                                      head_dim=48, rms_norm_eps=1e-5)),
    "qwen3-qknorm-tied": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=24,
                                                                  tie_word_embeddings=True)),
    # Gemma 3 with a window (7) shorter than the test sequences, a global layer among sliding ones, their own rotary
    # bases (the global one scaled), an attention scale not of the head dim
    "gemma3-window": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=4, num_key_value_heads=2, head_dim=32, sliding_window=7, query_pre_attn_scalar=20,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
}


def make_hf_model(tmp_path, family):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**BASE, **extra})
    hf = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random, non-trivial norms and biases so that each one matters
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(tmp_path)
    return hf


def load_ours(path, dtype=torch.float32):
    cfg_dict, tensors = read_hf_dir(path)
    return build_model(ModelConfig.from_hf(cfg_dict), tensors, dtype).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tmp_path, family):
    hf = make_hf_model(tmp_path, family)
    ours = load_ours(tmp_path)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 40))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family, slack", [("llama3-gqa-tied-ropescaling", None), ("qwen2-bias-tied", None),
                                           ("qwen3-qknorm-tied", None), ("gemma3-window", None), ("gemma3-window", 5)])
def test_cached_decoding_matches_full_forward(tmp_path, monkeypatch, family, slack):
    """Prefill in two chunks (the second on top of the cache) and then single steps give the full-forward logits.
    slack: the sliding layers' caches hold window + slack rows (a ring the sequence wraps several times; the chunk of
    25 tokens runs in pieces of slack + 1)."""
    hf = make_hf_model(tmp_path, family)
    ours = load_ours(tmp_path)
    tokens = torch.randint(0, BASE["vocab_size"], (1, 50))
    if slack is not None:
        monkeypatch.setattr(tinychat.model, "WINDOW_SLACK", slack)
    with torch.no_grad():
        expected = hf(tokens).logits
        ours.setup_kv_cache(64)
        rows = [layer.attn.kv_cache.k.shape[2] for layer in ours.layers]
        assert rows == ([64] * len(rows) if slack is None else [7 + slack, 7 + slack, 64, 7 + slack])
        chunks = [ours(tokens[:, :20]), ours(tokens[:, 20:45], torch.arange(20, 45))]
        chunks += [ours(tokens[:, i : i + 1], torch.tensor([i])) for i in range(45, 50)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama3-gqa-tied-ropescaling", "gemma3-window"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_is_like_transformers(tmp_path, dtype, family):
    """Our bf16/fp16 logits are no further from the fp32 result than transformers' own bf16/fp16 logits (x2)."""
    hf = make_hf_model(tmp_path, family)
    tokens = torch.randint(0, BASE["vocab_size"], (1, 32))
    with torch.no_grad():
        reference = hf(tokens).logits
        hf_err = (hf.to(dtype)(tokens).logits.float() - reference).abs().max()
        our_err = (load_ours(tmp_path, dtype)(tokens).float() - reference).abs().max()
    assert our_err <= 2 * hf_err + 1e-3, (our_err, hf_err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama3-gqa-tied-ropescaling", "qwen2-bias-tied", "gemma3-window"])
def test_cuda_logits_match_transformers(tmp_path, family):
    hf = make_hf_model(tmp_path, family)
    ours = load_ours(tmp_path).cuda()
    tokens = torch.randint(0, BASE["vocab_size"], (2, 40))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)  # TF32 matmuls may be on


# Hugging Face tensor -> llama.cpp's name, as its converter writes Gemma 3 and Qwen3 (convert_hf_to_gguf.py); Gemma's
# norms are stored as 1 + w there. Written here independently of tinychat.io.gguf's map.
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GGUF_NORMS = {
    "qwen3": {"post_attention_layernorm": "ffn_norm"},
    "gemma3": {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"},
}


def write_gguf_like_llama_cpp(hf, arch: str, path, metadata: dict):
    """hf's weights as F32 tensors under llama.cpp's names (no rotary permutation: neither family has one)."""
    from test_gguf import write_gguf

    tensors = []
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and hf.config.tie_word_embeddings:
            continue
        data = t.float().numpy() + (1.0 if arch == "gemma3" and name.endswith("norm.weight") else 0.0)
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            module, suffix = rest.rsplit(".", 1)
            part = {**_GGUF_LAYER_NAMES, **_GGUF_NORMS[arch]}[module]
            gname = f"blk.{i}.{part}.{suffix}"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        tensors.append((gname, data, None))
    c = hf.config
    meta = {f"{arch}.{k}": ("u32", v) for k, v in (
        ("block_count", c.num_hidden_layers), ("context_length", c.max_position_embeddings),
        ("embedding_length", c.hidden_size), ("feed_forward_length", c.intermediate_size),
        ("attention.head_count", c.num_attention_heads), ("attention.head_count_kv", c.num_key_value_heads),
        ("attention.key_length", c.head_dim), ("attention.value_length", c.head_dim), ("vocab_size", c.vocab_size))}
    meta[f"{arch}.attention.layer_norm_rms_epsilon"] = ("f32", c.rms_norm_eps)
    return write_gguf(path, arch, {**meta, **metadata}, tensors)


GEMMA3_GGUF_CASES = {
    # llama.cpp's default for Gemma 3: every 6th layer global, the sliding layers' rotary base 10000
    "default-pattern": (dict(num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"]), {}),
    "pattern-2-local-base": (dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                   "sliding_attention": {"rope_type": "default",
                                                                         "rope_theta": 500.0}}),
                             {"gemma3.attention.sliding_window_pattern": ("u32", 2),
                              "gemma3.rope.freq_base_swa": ("f32", 500.0)}),
}


@pytest.mark.parametrize("case", [*GEMMA3_GGUF_CASES, "qwen3"])
def test_gguf_of_gemma3_and_qwen3_matches_transformers(tmp_path, monkeypatch, case):
    """A GGUF file written as llama.cpp's converter writes these families (names, Gemma's 1 + w norms, metadata:
    window, pattern of global layers, rotary bases) gives transformers' logits, through our GGUF reader's config."""
    from tinychat.io.gguf import read_gguf

    if case == "qwen3":
        arch, meta = "qwen3", {"qwen3.rope.freq_base": ("f32", 10000.0)}
        monkeypatch.setitem(FAMILIES, "case", FAMILIES["qwen3-qknorm-tied"])
    else:
        arch = "gemma3"
        hf_extra, meta = GEMMA3_GGUF_CASES[case]
        _, _, gemma = FAMILIES["gemma3-window"]
        rope = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
        monkeypatch.setitem(FAMILIES, "case", ("Gemma3TextConfig", "Gemma3ForCausalLM", {
            **gemma, "query_pre_attn_scalar": 32, "rope_parameters": rope, **hf_extra}))
        meta = {"gemma3.rope.freq_base": ("f32", 1e6), "gemma3.attention.sliding_window": ("u32", 7), **meta}
    hf = make_hf_model(tmp_path / "hf", "case")
    path = write_gguf_like_llama_cpp(hf, arch, tmp_path / "model.gguf", meta)
    config, refs, _ = read_gguf(path)
    ours = build_model(ModelConfig.from_hf(config, str(path)), refs, torch.float32, norm_offset=0.0).eval()
    tokens = torch.randint(0, BASE["vocab_size"], (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)
