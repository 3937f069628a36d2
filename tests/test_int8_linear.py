"""The int8_linear op (compiled CPU kernel) against its PyTorch reference, and the Int8Linear output projection
that the CPU backend gives 4-bit models."""

import copy

import pytest
import torch

from tinychat import ops
from tinychat.errors import TinychatError
from tinychat.linear import Int8Linear, int8_lm_head


def tc():
    assert ops.EXTENSION_AVAILABLE, "tinychat._C is not built: pip install --no-build-isolation -e ."
    return torch.ops.tinychat


def make_layer(N, K, seed=0):
    return Int8Linear.from_float(torch.randn(N, K, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 17, 64, 300])
def test_matches_reference(M, isa, threads):
    """GEMV (1..4 rows of x at a time) and dequantize + GEMM, odd K (a scalar tail after the SIMD lanes)."""
    for N, K in ((7, 576), (200, 64), (33, 100), (5, 8)):
        layer = make_layer(N, K, seed=N + K)
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
        out = tc().int8_linear(x, layer.qweight, layer.scales)
        assert out.shape == (M, N) and out.dtype == torch.float32 and out.is_contiguous()
        torch.testing.assert_close(out, ops.int8_linear_ref(x, layer.qweight, layer.scales), atol=1e-4, rtol=1e-4)
        for dtype in (torch.bfloat16, torch.float16):
            xl = x.to(dtype)
            torch.testing.assert_close(tc().int8_linear(xl, layer.qweight, layer.scales),
                                       ops.int8_linear_ref(xl, layer.qweight, layer.scales))


def test_strided_and_batched_x():
    layer = make_layer(24, 96)
    x = torch.randn(5, 2, 96).transpose(0, 1)  # [2, 5, 96], rows not evenly strided
    assert not x.is_contiguous()
    out = tc().int8_linear(x, layer.qweight, layer.scales)
    assert out.shape == (2, 5, 24)
    torch.testing.assert_close(out, ops.int8_linear_ref(x, layer.qweight, layer.scales), atol=1e-4, rtol=1e-4)
    assert tc().int8_linear(torch.randn(0, 96), layer.qweight, layer.scales).shape == (0, 24)


def test_from_float_rounds_per_row():
    w = torch.randn(50, 64) * torch.logspace(-3, 2, 50)[:, None]  # rows of very different magnitude
    layer = Int8Linear.from_float(w)
    assert layer.qweight.dtype == torch.int8 and layer.scales.dtype == torch.float32
    assert (layer.qweight.abs().amax(1) == 127).all()  # each row's largest weight maps to +-127
    w_hat = layer.qweight.float() * layer.scales[:, None]
    assert ((w_hat - w).abs() <= layer.scales[:, None] / 2 * (1 + 1e-5)).all()  # round to nearest
    zero = Int8Linear.from_float(torch.zeros(3, 32))
    assert torch.equal(zero(torch.randn(2, 32)), torch.zeros(2, 3))


def test_module_casts_and_errors():
    layer = make_layer(16, 64).to(torch.bfloat16)
    assert layer.scales.dtype == torch.float32 and layer.qweight.dtype == torch.int8
    assert layer(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    x = torch.randn(3, 64)
    for args, message in [
        ((x, layer.qweight.to(torch.uint8), layer.scales), "qweight must be int8"),
        ((x, layer.qweight[:, :32].contiguous(), layer.scales), r"qweight must be a contiguous \[N, K\] = \[N, 64\]"),
        ((x, layer.qweight, layer.scales[:8]), r"scales must be a contiguous float32 \[N\] = \[16\]"),
        ((x, layer.qweight, layer.scales.half()), "scales must be a contiguous float32"),
        ((x.long(), layer.qweight, layer.scales), "x must be float32, bfloat16 or float16"),
    ]:
        with pytest.raises(RuntimeError, match="int8_linear: .*" + message):
            tc().int8_linear(*args)
    with pytest.raises(TinychatError, match="not an nn.Linear without bias"):
        int8_lm_head(_with_head(bias=True))


def _with_head(bias):
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(32, 10, bias=bias)
    return model


def test_int8_lm_head_on_a_tied_model():
    """The head becomes int8; the tied embedding keeps its full-precision weight; logits move by little."""
    from tinychat.config import ModelConfig
    from tinychat.model import Transformer

    cfg = ModelConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=32, tie_word_embeddings=True)
    model = Transformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model.tie_weights()
    model.eval()
    tokens = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        full = model(tokens)
        int8 = int8_lm_head(copy.deepcopy(model))
        got = int8(tokens)
    assert isinstance(int8.lm_head, Int8Linear) and torch.equal(int8.embed.weight, model.embed.weight)
    assert (got - full).abs().max() < 0.01 * full.abs().max()


def test_opcheck():
    layer = make_layer(16, 64)
    torch.library.opcheck(torch.ops.tinychat.int8_linear.default, (torch.randn(3, 64), layer.qweight, layer.scales))
