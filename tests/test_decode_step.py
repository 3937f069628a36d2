"""The one-call CPU decoder (csrc/cpu/decode_step.cpp, Transformer.one_call_decoder) against the model's op-by-op
forward, the reference: the same logits bit for bit (the same kernels in the same order) and so the same greedy
tokens, on every CPU path with 1 and 2 threads, for every linear form the loaders make (4-bit groups with fp16 or
fp32 parameters, with and without offsets; 8-bit groups; float; biases; the int8 head) and both KV cache dtypes.
Models it cannot run fall back to the op-by-op path; a bad description is refused."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import tinychat.model
from tinychat.config import ModelConfig, RopeConfig
from tinychat.linear import Int8Linear, RowStack, WQLinear, int8_lm_head
from tinychat.model import Transformer

CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, qkv_bias=True, max_position_embeddings=64)
# Gemma 3's extras: q/k norms, post norms, GELU-tanh, a sliding layer (window 5) with its own rotary table before a
# global one, a scaled embedding, an attention scale of its own
GEMMA = dataclasses.replace(CFG, qkv_bias=False, qk_norm=True, post_norms=True, hidden_act="gelu_tanh",
                            sliding_window=5, layer_types=("sliding_attention", "full_attention"),
                            rope_local=RopeConfig(theta=100.0), embed_scale=8.0, query_pre_attn_scalar=10.0)


def _int4(linear: nn.Linear, params: torch.dtype, offsets: bool) -> WQLinear:
    N, K = linear.out_features, linear.in_features
    g = torch.Generator().manual_seed(N + K)
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g)
    scales = (torch.rand(N, K // 32, generator=g) * 0.02 + 0.01).to(params)
    offs = (-8 * scales.float() + torch.randn(N, K // 32, generator=g) * 0.01).to(params) if offsets else None
    return WQLinear.from_groups(q, scales, offs, 32, linear.bias)


def _int8(linear: nn.Linear) -> Int8Linear:
    N, K = linear.out_features, linear.in_features
    g = torch.Generator().manual_seed(N * K)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    return Int8Linear.from_groups(q, (torch.rand(N, K // 16, generator=g) * 0.01).half(), None, 16, linear.bias)


# what each decoder linear becomes, by layer: a mix of every form (q|k|v carries the config's bias)
FORMS = {
    "mixed": [{"attn.wqkv": lambda l: _int4(l, torch.float16, True), "attn.wo": _int8,
               "mlp.w13": lambda l: l, "mlp.w2": lambda l: _int4(l, torch.float32, False)},
              {"attn.wqkv": _int8, "attn.wo": lambda l: _int4(l, torch.float32, True),
               "mlp.w13": lambda l: _int4(l, torch.float16, False), "mlp.w2": _int8}],
    "float": [{}, {}],
}


def _model(forms: str, cfg: ModelConfig = CFG) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    nn.init.normal_(model.embed.weight)
    for p in model.layers.parameters():
        nn.init.normal_(p, std=0.2)

    def make(name: str, linear: nn.Module) -> nn.Module:
        layer, _, rest = name.removeprefix("layers.").partition(".")
        return FORMS[forms][int(layer)].get(rest, lambda l: l)(linear)

    model.swap_linears(make)
    if forms == "mixed":
        int8_lm_head(model)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("forms", sorted(FORMS))
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16], ids=["kv32", "kv16"])
@pytest.mark.parametrize("cfg", [CFG, GEMMA], ids=["llama", "gemma3"])
def test_one_call_decoder_equals_op_by_op(forms, kv_dtype, cfg, isa, threads, monkeypatch):
    """Gemma 3's sliding layer keeps a ring of window + 2 rows, which the 15 positions wrap twice (the prompt runs in
    pieces of 3 tokens)."""
    monkeypatch.setattr(tinychat.model, "WINDOW_SLACK", 2)
    reference = _model(forms, cfg)
    fused = copy.deepcopy(reference)
    for m in (reference, fused):
        m.setup_kv_cache(32, dtype=kv_dtype)
    assert fused.one_call_decoder() is not None
    assert [layer.attn.kv_cache.k.shape[2] for layer in fused.layers] == ([7, 32] if cfg is GEMMA else [32, 32])
    prompt = torch.randint(0, CFG.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = reference(prompt, torch.arange(7), one_call=False), fused(prompt, torch.arange(7))
        assert torch.equal(got, want)  # a prefill runs in one call too
        tokens = []
        for pos in range(7, 17):  # greedy decode steps
            token = want[:, -1:].argmax(-1)  # [1, 1]
            tokens.append(int(token))
            want = reference(token, torch.tensor([pos]), one_call=False)
            got = fused(token, torch.tensor([pos]))
            assert torch.equal(got, want), f"step at position {pos}"
    assert len(set(tokens)) > 1  # the steps decode different tokens: the caches are read, not one fixed answer
    for layer_ref, layer_fused in zip(reference.layers, fused.layers):  # both wrote the same KV caches
        assert torch.equal(layer_fused.attn.kv_cache.k, layer_ref.attn.kv_cache.k)
        assert torch.equal(layer_fused.attn.kv_cache.v, layer_ref.attn.kv_cache.v)


def test_what_it_cannot_run_falls_back():
    """No KV cache, a linear it does not know (RowStack: parts of different forms) or a non-CPU model: no one-call
    decoder, and forward runs op by op. The decoder is built again after the caches or linears change."""
    model = _model("float")
    assert model.one_call_decoder() is None  # no caches yet
    model.setup_kv_cache(16)
    first = model.one_call_decoder()
    assert first is not None and model.one_call_decoder() is first  # built once
    model.setup_kv_cache(16)
    assert model.one_call_decoder() is not first  # new caches: a new decoder
    twin = copy.deepcopy(model)  # a copy builds its own, over its own tensors
    assert twin.one_call_decoder() is not None and twin.one_call_decoder() is not model.one_call_decoder()
    with torch.no_grad():
        assert torch.equal(twin(torch.tensor([[1, 2]])), model(torch.tensor([[1, 2]])))
    model.layers[1].attn.wo = RowStack([nn.Linear(64, 32), nn.Linear(64, 32)])
    model.swap_linears(lambda name, linear: linear)
    assert model.one_call_decoder() is None
    with torch.no_grad():
        assert model(torch.tensor([[1, 2]])).shape == (1, 2, CFG.vocab_size)
    assert model._decoder is False  # the verdict is kept: forward does not walk the layers again at every step


@pytest.mark.parametrize("spec, tensors, message", [
    ([1, 4, 2, 16, 0, 0, 0, 0, 0], 0, "fewer tensors than the spec describes"),
    ([0, 4, 2, 16, 0, 0, 0, 3, 32, 0, 0], 2, "a linear's bits must be 0, 4 or 8, got 3"),
    ([0, 4, 2, 16, 0, 0, 0, 0, 0, 0, 0], 3, "1 tensors and 0 spec numbers left over"),
    ([0, 4, 2, 16, 2, 0, 0], 0, "the activation must be 0"),
    ([1, 4, 2, 16, 0, 0, 0, -1, 0], 1, "a layer's window must be >= 0"),
    ([0, 4, 2], 0, "the spec is too short"),
])
def test_a_bad_description_is_refused(spec, tensors, message):
    with pytest.raises(RuntimeError, match=message):
        torch.classes.tinychat.CpuDecoder([torch.ones(4)] * tensors, spec, 1e-5, 0.25)
