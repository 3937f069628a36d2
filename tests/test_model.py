"""The decoder against Hugging Face transformers on the same (tiny, random) weights, for every supported family."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

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


@pytest.mark.parametrize("family", ["llama3-gqa-tied-ropescaling", "qwen2-bias-tied"])
def test_cached_decoding_matches_full_forward(tmp_path, family):
    """Prefill in two chunks (the second on top of the cache) and then single steps give the full-forward logits."""
    hf = make_hf_model(tmp_path, family)
    ours = load_ours(tmp_path)
    tokens = torch.randint(0, BASE["vocab_size"], (1, 50))
    with torch.no_grad():
        expected = hf(tokens).logits
        ours.setup_kv_cache(64)
        chunks = [ours(tokens[:, :20]), ours(tokens[:, 20:45], torch.arange(20, 45))]
        chunks += [ours(tokens[:, i : i + 1], torch.tensor([i])) for i in range(45, 50)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_is_like_transformers(tmp_path, dtype):
    """Our bf16/fp16 logits are no further from the fp32 result than transformers' own bf16/fp16 logits (x2)."""
    hf = make_hf_model(tmp_path, "llama3-gqa-tied-ropescaling")
    tokens = torch.randint(0, BASE["vocab_size"], (1, 32))
    with torch.no_grad():
        reference = hf(tokens).logits
        hf_err = (hf.to(dtype)(tokens).logits.float() - reference).abs().max()
        our_err = (load_ours(tmp_path, dtype)(tokens).float() - reference).abs().max()
    assert our_err <= 2 * hf_err + 1e-3, (our_err, hf_err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama3-gqa-tied-ropescaling", "qwen2-bias-tied"])
def test_cuda_logits_match_transformers(tmp_path, family):
    hf = make_hf_model(tmp_path, family)
    ours = load_ours(tmp_path).cuda()
    tokens = torch.randint(0, BASE["vocab_size"], (2, 40))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)  # TF32 matmuls may be on
