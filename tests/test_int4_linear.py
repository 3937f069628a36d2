"""The int4_linear op (compiled CPU kernel) against its PyTorch reference, and the WQLinear module.

These tests FAIL (never skip) when tinychat._C is not built. The CUDA kernels: tests/test_int4_linear_cuda.py.
"""

import pytest
import torch

from tinychat import ops
from tinychat.errors import TinychatError
from tinychat.int4_layout import pack_int4_op, to_int4_op, unpack_int4_op
from tinychat.linear import WQLinear
from tinychat.model import linear_names
from tinychat.quant.quantize import QuantConfig, dequantize, quantize, quantize_model_layers


def tc():
    """torch.ops.tinychat, asserting the extension is built."""
    assert ops.EXTENSION_AVAILABLE, "tinychat._C is not built: pip install --no-build-isolation -e ."
    return torch.ops.tinychat


def make_weights(N, K, G, seed=0):
    """A random [N, K] weight, RTN-quantized: (reference-layout tensors, plain quantization)."""
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    q, scales, zeros = quantize(w, QuantConfig(4, G))
    return to_int4_op(q, scales, zeros), (q, scales, zeros)


# The group forms the op runs: AWQ (fp32 scales, offsets -z * s), GGUF Q4_1 (fp16 scales and offsets), fp32 scales
# and offsets that are not multiples of the scale, Q4_0 (fp16 scales, no offsets: m = -8 s), Q4_K (K-quant
# superblocks: uint8 scales, G = 32, K a multiple of 256).
FORMS = ("awq", "q4_1", "fp32", "q4_0", "q4_k")


def kquant_scales(N, K, gen):
    """Random K-quant superblock parameters uint8 [N, K/256, 20]: finite fp16 d and dmin, 6-bit sc and mn."""
    sb = torch.randint(0, 64, (N, K // 256, 20), dtype=torch.uint8, generator=gen)
    sb[..., 0:2] = (torch.rand(N, K // 256, 1, generator=gen) * 0.01 + 0.001).half().view(torch.uint8)
    sb[..., 2:4] = (torch.rand(N, K // 256, 1, generator=gen) * 0.02).half().view(torch.uint8)
    return sb


def make_form(N, K, G, form, seed=0):
    """(qweight, scales, offsets) of a random [N, K] weight in one of FORMS, with weights of std ~1."""
    if form == "awq":
        return make_weights(N, K, G, seed)[0]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)
    if form == "q4_k":
        return pack_int4_op(q), kquant_scales(N, K, gen), None
    scales = torch.rand(N, K // G, generator=gen) * 0.3 + 0.05  # [N, K/G]
    offsets = -7.5 * scales + torch.randn(N, K // G, generator=gen) * 0.1  # non-integer multiples of the scale
    dtype = torch.float32 if form == "fp32" else torch.float16
    return (pack_int4_op(q), scales.to(dtype), None if form == "q4_0" else offsets.to(dtype))


def test_group_forms_mean_q_times_s_plus_m():
    """The reference: W = q * s + m per group, m = -8 s without offsets; AWQ's offsets keep (q - z) * s."""
    qweight, s, m = make_form(3, 64, 32, "q4_1")
    q = unpack_int4_op(qweight).float()  # [3, 64]
    w = q * s.float().repeat_interleave(32, 1) + m.float().repeat_interleave(32, 1)
    x = torch.eye(64)
    torch.testing.assert_close(ops.int4_linear_ref(x, qweight, s, m, 32), w.t(), atol=0, rtol=0)
    w0 = (q - 8) * s.float().repeat_interleave(32, 1)
    torch.testing.assert_close(ops.int4_linear_ref(x, qweight, s, None, 32), w0.t(), atol=0, rtol=0)
    (qw, sa, ma), (qa, sp, zp) = make_weights(5, 64, 32)
    torch.testing.assert_close(ops.int4_linear_ref(x, qw, sa, ma, 32), dequantize(qa, sp, zp, 32).t())


def shapes():
    for N in (8, 23, 200):
        for K in (64, 192, 512, 576):
            for G in (32, 64, 128):
                if K % G == 0:
                    yield N, K, G


def test_op_is_registered():
    """A CPU kernel always; a CUDA kernel exactly when the extension was built with CUDA."""
    tc()
    import tinychat._C

    assert ops.int4_linear is torch.ops.tinychat.int4_linear.default
    assert torch._C._dispatch_has_kernel_for_dispatch_key("tinychat::int4_linear", "CPU")
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("tinychat::int4_linear", "CUDA")
    assert has_cuda_kernel == bool(tinychat._C.WITH_CUDA)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 64, 65, 300])
def test_matches_reference(M, form, isa, threads, monkeypatch):
    """Every path, every M through the one kernel (1..4 rows of x at a time on the fp32 paths, 8 on VNNI), every
    group form. On avx512_vnni, x is rounded to int8 per block of 32 at two levels in calls of up to 8 rows, left in
    fp32 (the AVX-512 kernels) up to 64 rows and rounded at one level past that (csrc/cpu/int4_linear.cpp)."""
    for N, K, G in shapes():
        if form == "q4_k" and (G != 32 or K % 256):
            continue
        qweight, scales, offsets = make_form(N, K, G, form, seed=N + K + G)
        w = ops.int4_linear_ref(torch.eye(K), qweight, scales, offsets, G).t()  # [N, K] fp32
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
        out = tc().int4_linear(x, qweight, scales, offsets, G)
        assert out.shape == (M, N) and out.dtype == torch.float32 and out.is_contiguous()
        ref = ops.int4_linear_ref(x, qweight, scales, offsets, G)
        xb = x.bfloat16()
        out_b = tc().int4_linear(xb, qweight, scales, offsets, G)
        ref_b = ops.int4_linear_ref(xb, qweight, scales, offsets, G)
        if isa == "avx512_vnni" and (M <= 8 or M > 64):  # within the bound of x's rounding
            levels = 2 if M <= 8 else 1
            for xi, o, r in ((x, out, ref), (xb, out_b, ref_b)):
                error = (o.float() - r.float()).abs()
                rounding = r.float().abs() * 2**-7 * (xi.dtype != torch.float32)  # bf16 outputs: 1 ulp apart
                assert (error <= int8_rounding_bound(xi, w, levels) + rounding).all()
            error = (out - ref).abs()
            assert error.max() > 0  # really the int8 path
            if levels == 1:  # and really one level: errors past what two levels allow
                assert (error > int8_rounding_bound(x, w, 2)).any()
            continue
        if isa == "avx512_vnni":  # 9..64 rows: the AVX-512 kernels themselves
            with monkeypatch.context() as m:
                m.setenv("TINYCHAT_CPU_ISA", "avx512")
                assert torch.equal(out, tc().int4_linear(x, qweight, scales, offsets, G))
                assert torch.equal(out_b, tc().int4_linear(xb, qweight, scales, offsets, G))
        tol = 1e-4 * w.abs().sum(1).max().item()  # fp32 sums in another order, relative to sum |W|
        torch.testing.assert_close(out, ref, atol=tol, rtol=1e-4, msg=lambda m: f"N={N} K={K} G={G}: {m}")
        torch.testing.assert_close(out_b, ref_b, atol=tol, rtol=1.6e-2)  # fp32 math cast once


def test_awq_offsets_give_the_zero_point_kernels_results(isa):
    """An AWQ quantization (integer zeros) runs as offsets -(s * z): the kernels' fp32 arithmetic is the one they
    did with the zero point (s * z rounded once), so the outputs equal that form's, computed here in fp64."""
    (qweight, scales, offsets), (q, s, z) = make_weights(40, 192, 64, seed=3)
    assert torch.equal(offsets, -(s.float() * z.float()))
    x = torch.randn(5, 192, dtype=torch.float64)
    exact = x @ ((q.double() - z.double().repeat_interleave(64, 1)) * s.double().repeat_interleave(64, 1)).t()
    out = tc().int4_linear(x.float(), qweight, scales, offsets, 64).double()
    bound = 1e-5 * (x.abs() @ dequantize(q, s, z, 64).abs().double().t()) + 1e-6
    if isa != "avx512_vnni":
        assert ((out - exact).abs() <= bound).all()


def int8_rounding_bound(x, w, levels=1):
    """The largest error that rounding x [M, K] to int8 per block of 32 channels (scale absmax / 127; at two levels
    the second one rounds the remainder in steps of scale / 256) can cause in x @ w.T for w [N, K]:
    sum_k |w[n, k]| * step(x[m, block of k]) / 2, plus fp32 slack -> [M, N]."""
    M, K = x.shape
    step = x.float().view(M, K // 32, 32).abs().amax(-1).repeat_interleave(32, dim=1) / 127  # [M, K]
    step = step / 256 ** (levels - 1)
    return (step / 2) @ w.abs().t() * (1 + 1e-4) + 1e-4


@pytest.mark.parametrize("M", [3, 70])
def test_nan_and_inf_in_x_reach_the_output(M, isa):
    """Every path (the GEMV and, past 64 rows, the VNNI GEMM): a row of x with a NaN or an infinity gives a row of
    non-finite outputs (the int8 rounding of the VNNI path must not turn them into numbers), and leaves the other
    rows alone."""
    (qweight, scales, zeros), _ = make_weights(24, 192, 64)
    x = torch.randn(M, 192)
    x[0, 5], x[1, 100] = float("nan"), float("inf")
    out = tc().int4_linear(x, qweight, scales, zeros, 64)
    assert not torch.isfinite(out[:2]).any() and torch.isfinite(out[2:]).all()
    assert torch.isnan(out[0]).all()


@pytest.mark.parametrize("form", FORMS)
def test_rows_past_64_are_batch_invariant(form, isa, threads):
    """Past 64 rows of x (the VNNI GEMM: 6 rows of x by 32 rows of W a tile), each output row is computed the same
    way whichever tile and call it lies in: the rows of a call equal the same rows in a larger call, bit for bit,
    also for group sizes that do not divide 128 (G = 96) and N that is no multiple of 16."""
    for N, K, G in ((23, 576, 96), (200, 512, 32), (40, 1024, 256)):
        if form == "q4_k" and (G != 32 or K % 256):
            continue
        qweight, scales, offsets = make_form(N, K, G, form, seed=N + K)
        x = torch.randn(203, K, generator=torch.Generator().manual_seed(K))
        whole = tc().int4_linear(x, qweight, scales, offsets, G)
        for rows in (slice(0, 65), slice(100, 203), slice(7, 78)):
            assert torch.equal(tc().int4_linear(x[rows], qweight, scales, offsets, G), whole[rows])
        if isa == "avx512_vnni":
            w = ops.int4_linear_ref(torch.eye(K), qweight, scales, offsets, G).t()  # [N, K] fp32
            error = (whole - ops.int4_linear_ref(x, qweight, scales, offsets, G)).abs()
            assert (error <= int8_rounding_bound(x, w)).all() and error.max() > 0


def test_unknown_isa_is_refused(monkeypatch):
    (qweight, scales, zeros), _ = make_weights(8, 64, 32)
    monkeypatch.setenv("TINYCHAT_CPU_ISA", "avx9")
    with pytest.raises(RuntimeError,
                       match="TINYCHAT_CPU_ISA must be native, avx512_vnni, avx512, avx2 or scalar, got 'avx9'"):
        tc().int4_linear(torch.randn(1, 64), qweight, scales, zeros, 32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_batched_and_strided_x(dtype):
    (qweight, scales, zeros), _ = make_weights(24, 192, 64)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {}  # fp32: the kernel sums in another order
    x = torch.randn(2, 5, 192).to(dtype)  # [B, T, K]
    out = tc().int4_linear(x, qweight, scales, zeros, 64)
    assert out.shape == (2, 5, 24)
    torch.testing.assert_close(out, ops.int4_linear_ref(x, qweight, scales, zeros, 64), **tol)
    xt = torch.randn(5, 2, 192).to(dtype).transpose(0, 1)  # rows not evenly strided
    assert not xt.is_contiguous()
    torch.testing.assert_close(tc().int4_linear(xt, qweight, scales, zeros, 64),
                               ops.int4_linear_ref(xt, qweight, scales, zeros, 64), **tol)
    wide = torch.randn(3, 400).to(dtype)[:, 8:200]  # a column slice: last dim contiguous, rows strided
    torch.testing.assert_close(tc().int4_linear(wide, qweight, scales, zeros, 64),
                               ops.int4_linear_ref(wide, qweight, scales, zeros, 64), **tol)


def test_empty_batch():
    (qweight, scales, zeros), _ = make_weights(8, 64, 32)
    out = tc().int4_linear(torch.randn(0, 64), qweight, scales, zeros, 32)
    assert out.shape == (0, 8)


def _bad_inputs():
    (qweight, scales, zeros), _ = make_weights(16, 128, 32)
    x = torch.randn(3, 128)
    yield "x dtype", (x.long(), qweight, scales, zeros, 32), r"x must be float32, bfloat16 or float16"
    yield "0-dim x", (torch.tensor(1.0), qweight, scales, zeros, 32), r"x must have shape \[\.\.\., K\]"
    yield "K not in blocks of 32", (torch.randn(3, 120), qweight, scales, zeros, 32), \
        r"K \(in_features\) must be a positive multiple of 32, got 120"
    yield "group size 16", (x, qweight, scales, zeros, 16), r"group_size must be a multiple of 32, got 16"
    yield "group size 0", (x, qweight, scales, zeros, 0), r"group_size must be > 0"
    yield "group size does not divide", (x, qweight, scales, zeros, 48), r"group_size 48 must divide x's last"
    yield "qweight dtype", (x, qweight.int(), scales, zeros, 32), r"qweight must be uint8"
    yield "qweight shape", (x, qweight[:, :32].contiguous(), scales, zeros, 32), \
        r"qweight must have shape \[N, K/2\] = \[N, 64\]"
    yield "qweight strides", (x, qweight.t().contiguous().t(), scales, zeros, 32), r"qweight must be contiguous"
    yield "scales dtype", (x, qweight, scales.bfloat16(), None, 32), r"scales must be float32, float16 or uint8 \(K-quant superblocks\), got BFloat16"
    yield "scales shape", (x, qweight, scales[:, :2].contiguous(), zeros, 32), \
        r"scales must have shape \[N, K/group_size\] = \[16, 4\]"
    yield "scales strides", (x, qweight, scales.t().contiguous().t(), None, 32), r"scales must be contiguous"
    yield "offsets dtype", (x, qweight, scales, zeros.half(), 32), r"offsets must have the scales' dtype Float, got Half"
    yield "offsets shape", (x, qweight, scales, zeros[:8], 32), r"offsets must have the scales' shape \[16, 4\]"
    yield "offsets strides", (x, qweight, scales, zeros.t().contiguous().t(), 32), r"offsets must be contiguous"
    (qw256, _, _), _ = make_weights(16, 256, 32)
    x256, sb = torch.randn(3, 256), kquant_scales(16, 256, torch.Generator().manual_seed(0))
    yield "K-quant group size", (x256, qw256, sb, None, 64), r"uint8 scales \(K-quant superblocks\) need group_size 32"
    yield "K-quant K", (x, qweight, sb[:, :0], None, 32), r"need group_size 32 and K a multiple of 256, got .* K = 128"
    yield "K-quant shape", (x256, qw256, sb[:, :, :16].contiguous(), None, 32), \
        r"must have shape \[N, K/256, 20\] = \[16, 1, 20\]"
    yield "K-quant offsets", (x256, qw256, sb, sb, 32), r"carry their offsets: offsets must be None"


@pytest.mark.parametrize("case", list(_bad_inputs()), ids=lambda c: c[0])
def test_bad_inputs(case):
    _, args, message = case
    with pytest.raises(RuntimeError, match=r"int4_linear: .*" + message):
        tc().int4_linear(*args)


@pytest.mark.parametrize("form", FORMS)
def test_opcheck(form):
    G = 32 if form == "q4_k" else 64
    qweight, scales, offsets = make_form(24, 256, G, form)
    for x in (torch.randn(3, 256), torch.randn(2, 1, 256).bfloat16()):
        torch.library.opcheck(torch.ops.tinychat.int4_linear.default, (x, qweight, scales, offsets, G))


def test_torch_compile_fullgraph():
    (qweight, scales, zeros), _ = make_weights(24, 192, 64)

    def f(x):
        return torch.nn.functional.silu(ops.int4_linear(x, qweight, scales, zeros, 64)) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for M in (1, 7):
        x = torch.randn(M, 192)
        torch.testing.assert_close(compiled(x), f(x))


# ---- WQLinear ----


@pytest.mark.parametrize("bias", [False, True])
def test_wqlinear_forward(bias):
    _, (q, s, z) = make_weights(24, 128, 32)
    b = torch.randn(24) if bias else None
    layer = WQLinear.from_quantized(q, s, z, 32, b)
    x = torch.randn(2, 3, 128)
    expected = x @ dequantize(q, s, z, 32).t() + (b if bias else 0)
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
    assert (layer.in_features, layer.out_features, layer.group_size) == (128, 24, 32)
    assert set(layer.state_dict()) == {"qweight", "scales", "offsets"} | ({"bias"} if bias else set())


def test_wqlinear_cast_keeps_its_scales_and_offsets():
    _, (q, s, z) = make_weights(8, 64, 32)
    layer = WQLinear.from_quantized(q, s, z, 32, torch.randn(8)).to(torch.bfloat16)
    assert layer.scales.dtype == layer.offsets.dtype == torch.float32 and torch.equal(layer.scales, s)
    assert layer.bias.dtype == torch.bfloat16 and layer.qweight.dtype == torch.uint8
    x = torch.randn(3, 64).bfloat16()
    assert layer(x).dtype == torch.bfloat16
    qweight, s16, m16 = make_form(8, 64, 32, "q4_1")
    q16 = WQLinear.from_groups(qweight, s16, m16, 32).float().to(torch.bfloat16)
    assert q16.scales.dtype == q16.offsets.dtype == torch.float16 and torch.equal(q16.offsets, m16)
    sym = WQLinear.from_groups(qweight, s16, None, 32).to(torch.float32)
    assert sym.offsets is None and set(sym.state_dict()) == {"qweight", "scales"}
    torch.testing.assert_close(sym(x.float()), ops.int4_linear_ref(x.float(), qweight, s16, None, 32))
    with pytest.raises(TinychatError, match=r"offsets \(torch.float32 \(8, 2\)\) must have the scales' dtype"):
        WQLinear.from_groups(qweight, s16, m16.float(), 32)


def test_quantize_model_layers_matches_pseudo_quantized_model():
    from tinychat.config import ModelConfig
    from tinychat.model import Transformer

    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, qkv_bias=True, max_position_embeddings=64)
    model = Transformer(cfg)
    torch.nn.init.normal_(model.embed.weight)
    for layer in model.layers:
        torch.nn.init.normal_(layer.attn.wqkv.bias)
    model.eval()
    qcfg = QuantConfig(4, 32)
    qdict = {name: quantize(model.get_submodule(name).weight.detach(), qcfg) for name in linear_names(cfg)}
    tokens = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        for name, (q, s, z) in qdict.items():
            model.get_submodule(name).weight.copy_(dequantize(q, s, z, 32))
        expected = model(tokens)
        quantize_model_layers(model, qdict, qcfg)
        assert isinstance(model.layers[1].mlp.w13, WQLinear) and model.layers[0].attn.wqkv.bias is not None
        torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(TinychatError, match=r"'layers\.0\.attn\.wqkv' is a WQLinear, not an nn\.Linear"):
        quantize_model_layers(model, qdict, qcfg)  # already swapped
    with pytest.raises(TinychatError, match=r"qdict must hold every decoder linear; missing \['layers\.0\.attn\.wqkv'"):
        quantize_model_layers(model, {"layers.0.attn.wo": qdict["layers.0.attn.wo"]}, qcfg)
    with pytest.raises(TinychatError, match=r"4-bit weights only, not w_bit=3.*evaluation-only"):
        quantize_model_layers(model, qdict, QuantConfig(3, 32))
