"""The int8_linear op (compiled CPU kernel) against its PyTorch reference, and the Int8Linear output projection
that the CPU backend gives 4-bit models."""

import copy

import pytest
import torch

from tinychat import ops
from tinychat.errors import TinychatError
from tinychat.linear import Int8Linear, int8_lm_head
from test_int4_linear import int8_rounding_bound, kquant_scales


def tc():
    assert ops.EXTENSION_AVAILABLE, "tinychat._C is not built: pip install --no-build-isolation -e ."
    return torch.ops.tinychat


def make_layer(N, K, seed=0):
    return Int8Linear.from_float(torch.randn(N, K, generator=torch.Generator().manual_seed(seed)))


# The group forms the op runs: the int8 head (one fp32 scale per row), GGUF Q8_0 / Q5_0 (fp16 scales, G 32), Q5_1
# (fp16 scales and offsets), fp32 scales and offsets, Q6_K (fp32 scales, G 16), Q5_K (K-quant superblocks, G 32).
FORMS = {"row": None, "q8_0": 32, "q5_1": 32, "fp32": 32, "q6_k": 16, "q5_k": 32}


def make_form(N, K, form, seed=0):
    """(qweight, scales, offsets, group_size) of a random [N, K] weight in one of FORMS."""
    if form == "row":
        layer = make_layer(N, K, seed)
        return layer.qweight, layer.scales, None, K
    G = FORMS[form]
    gen = torch.Generator().manual_seed(seed)
    lo, hi = {"q8_0": (-128, 128), "q5_1": (0, 32), "fp32": (0, 32), "q6_k": (-32, 32), "q5_k": (0, 32)}[form]
    q = torch.randint(lo, hi, (N, K), dtype=torch.int8, generator=gen)
    if form == "q5_k":
        return q, kquant_scales(N, K, gen), None, G
    scales = torch.rand(N, K // G, generator=gen) * 0.1 + 0.01
    offsets = -16 * scales + torch.randn(N, K // G, generator=gen) * 0.05 if form in ("q5_1", "fp32") else None
    dtype = torch.float16 if form in ("q8_0", "q5_1") else torch.float32
    return q, scales.to(dtype), None if offsets is None else offsets.to(dtype), G


def vnni_gemv_runs(isa, M, G):
    """Whether int8_linear rounds x to int8 (int4_linear's VNNI GEMV, two levels): avx512_vnni, up to 8 rows of x,
    groups of 32 or more that divide 128 or are multiples of it."""
    return isa == "avx512_vnni" and M <= 8 and G % 32 == 0 and (128 % G == 0 or G % 128 == 0)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 17, 64, 300])
def test_matches_reference(M, form, isa, threads):
    """GEMV (1..4 rows of x at a time), the VNNI GEMV (x rounded to int8 at two levels: within that rounding's
    bound) and dequantize + GEMM, every group form; odd K for one group per row (a scalar tail after the SIMD lanes),
    K that ends inside a 128-channel chunk (64, 576)."""
    for N, K in ((7, 576), (200, 64), (33, 100), (5, 8), (9, 512), (3, 128)):
        if (form != "row" and K % 32) or (form == "q5_k" and K % 256):
            continue
        qweight, scales, offsets, G = make_form(N, K, form, seed=N + K)
        w = ops.int8_linear_ref(torch.eye(K), qweight, scales, offsets, G).t()  # [N, K] fp32
        tol = 1e-5 * w.abs().sum(1).max().item()  # fp32 sums in another order, relative to sum |W|
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
        out = tc().int8_linear(x, qweight, scales, offsets, G)
        assert out.shape == (M, N) and out.dtype == torch.float32 and out.is_contiguous()
        ref = ops.int8_linear_ref(x, qweight, scales, offsets, G)
        if vnni_gemv_runs(isa, M, G):
            error = (out - ref).abs()
            assert (error <= int8_rounding_bound(x, w, levels=2)).all(), (N, K, error.max())
            assert error.max() > 0  # really the int8 path
            continue
        torch.testing.assert_close(out, ref, atol=tol, rtol=1e-4)
        for dtype in (torch.bfloat16, torch.float16):
            xl = x.to(dtype)
            torch.testing.assert_close(tc().int8_linear(xl, qweight, scales, offsets, G),
                                       ops.int8_linear_ref(xl, qweight, scales, offsets, G), atol=tol, rtol=1.6e-2)


def test_group_forms_mean_q_times_s_plus_m():
    q, s, m, G = make_form(3, 64, "q5_1")
    w = q.float() * s.float().repeat_interleave(G, 1) + m.float().repeat_interleave(G, 1)
    torch.testing.assert_close(ops.int8_linear_ref(torch.eye(64), q, s, m, G), w.t(), atol=0, rtol=0)
    q, s, _, G = make_form(3, 64, "q6_k")
    torch.testing.assert_close(ops.int8_linear_ref(torch.eye(64), q, s, None, G),
                               (q.float() * s.repeat_interleave(G, 1)).t(), atol=0, rtol=0)


def test_strided_and_batched_x():
    layer = make_layer(24, 96)
    args = (layer.qweight, layer.scales, None, 96)
    x = torch.randn(5, 2, 96).transpose(0, 1)  # [2, 5, 96], rows not evenly strided
    assert not x.is_contiguous()
    out = tc().int8_linear(x, *args)
    assert out.shape == (2, 5, 24)
    torch.testing.assert_close(out, ops.int8_linear_ref(x, *args), atol=1e-4, rtol=1e-4)
    assert tc().int8_linear(torch.randn(0, 96), *args).shape == (0, 24)


def test_from_float_rounds_per_row():
    w = torch.randn(50, 64) * torch.logspace(-3, 2, 50)[:, None]  # rows of very different magnitude
    layer = Int8Linear.from_float(w)
    assert layer.qweight.dtype == torch.int8 and layer.scales.dtype == torch.float32
    assert (layer.qweight.abs().amax(1) == 127).all()  # each row's largest weight maps to +-127
    assert layer.scales.shape == (50, 1) and layer.offsets is None and layer.group_size == 64
    w_hat = layer.qweight.float() * layer.scales
    assert ((w_hat - w).abs() <= layer.scales / 2 * (1 + 1e-5)).all()  # round to nearest
    zero = Int8Linear.from_float(torch.zeros(3, 32))
    assert torch.equal(zero(torch.randn(2, 32)), torch.zeros(2, 3))


def test_module_casts_and_errors():
    layer = make_layer(16, 64).to(torch.bfloat16)
    assert layer.scales.dtype == torch.float32 and layer.qweight.dtype == torch.int8
    assert layer(torch.randn(3, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    x = torch.randn(3, 64)
    q, sc, m, G = make_form(16, 64, "q5_1")
    for args, message in [
        ((x, q.to(torch.uint8), sc, m, G), "qweight must be int8"),
        ((x, q[:, :32].contiguous(), sc, m, G), r"qweight must be a contiguous \[N, K\] = \[N, 64\]"),
        ((x, q, sc[:8], m, G), r"scales must have shape \[N, K/group_size\] = \[16, 2\]"),
        ((x, q, sc.bfloat16(), None, G), r"scales must be float32, float16 or uint8 \(K-quant superblocks\)"),
        ((x, q, sc, m.float(), G), "offsets must have the scales' dtype Half, got Float"),
        ((x, q, sc, m[:, :1].contiguous(), G), r"offsets must have the scales' shape \[16, 2\]"),
        ((x, q, sc, m, 8), "group_size must be a multiple of 16 or K = 64, got 8"),
        ((x, q, sc, m, 48), "group_size 48 must be > 0 and divide x's last dimension K = 64"),
        ((x.long(), q, sc, m, G), "x must be float32, bfloat16 or float16"),
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


@pytest.mark.parametrize("form", FORMS)
def test_opcheck(form):
    torch.library.opcheck(torch.ops.tinychat.int8_linear.default, (torch.randn(3, 256), *make_form(16, 256, form)))
