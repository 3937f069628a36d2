"""The compiled ops (torch.ops.tinychat.*) against the PyTorch references in tinychat.ops.

These tests FAIL (never skip) when tinychat._C is not built; only the CUDA cases skip
on machines without a GPU.
"""

import subprocess
import sys

import pytest
import torch

from tinychat import ops

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[needs_cuda, pytest.mark.cuda])]
LOW = [torch.bfloat16, torch.float16]
EPS = 1e-5


def tc():
    """torch.ops.tinychat, asserting the extension is built."""
    assert ops.EXTENSION_AVAILABLE, "tinychat._C is not built: pip install --no-build-isolation -e ."
    return torch.ops.tinychat


def inv_freq(D: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)  # [D/2]


def check_close(out, inputs, ref, naive, dtype):
    """out (dtype) against ref: fp32 tight; low precision: vs fp32 math on the same inputs.

    ref(*inputs) does fp32 math and casts once, so out must match it to about 1 ulp; and out's
    error against the fp32 result must be no worse than 2x that of the same computation done
    in `dtype` by plain torch (naive).
    """
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref(*inputs), atol=1e-5, rtol=1e-5)
        return
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref(*inputs))  # dtype-aware default tolerances (~1 ulp)
    exact = ref(*[t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs])
    err = (out.float() - exact).abs().max().item()
    err_naive = (naive(*inputs).float() - exact).abs().max().item()
    one_ulp = torch.finfo(dtype).eps * exact.abs().max().item()
    assert err <= max(2 * err_naive, one_ulp), (err, err_naive, one_ulp)


def naive_rms_norm(x, w, eps):  # every step in x.dtype
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_extension_is_built():
    assert ops.EXTENSION_AVAILABLE
    import tinychat._C

    for name in ("rms_norm", "add_rms_norm", "rope_kv_write", "attention", "silu_and_mul", "gelu_tanh_and_mul"):
        assert hasattr(torch.ops.tinychat, name)
        has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"tinychat::{name}", "CUDA")
        # without compiled CUDA kernels, the references stand in on CUDA for the attention ops (ops.py)
        assert has_cuda_kernel == (bool(tinychat._C.WITH_CUDA) or name in ("rope_kv_write", "attention",
                                                                            "silu_and_mul", "gelu_tanh_and_mul"))


# ---- rms_norm / add_rms_norm ----


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("H", [1, 7, 576, 4097])
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5)])
def test_rms_norm(device, dtype, H, lead):
    x = (torch.randn(*lead, H) * 3).to(device, dtype)
    w = (torch.rand(H) + 0.5).to(device, dtype)
    out = tc().rms_norm(x, w, EPS)
    assert out.shape == x.shape and out.is_contiguous()
    check_close(out, (x, w, EPS), ops.rms_norm_ref, naive_rms_norm, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("H", [1, 7, 576, 4097])
@pytest.mark.parametrize("lead", [(1,), (2, 5)])
def test_add_rms_norm(device, dtype, H, lead):
    x = torch.randn(*lead, H).to(device, dtype)
    res = (torch.randn(*lead, H) * 4).to(device, dtype)
    w = (torch.rand(H) + 0.5).to(device, dtype)
    out, r = tc().add_rms_norm(x, res, w, EPS)
    assert torch.equal(r, x + res)  # the residual add rounds to dtype, exactly like torch
    assert r.shape == out.shape == x.shape
    check_close(out, (r, w, EPS), ops.rms_norm_ref, naive_rms_norm, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_strided_input(device, dtype):
    H = 96
    fused = torch.randn(6, 3 * H).to(device, dtype)  # e.g. a fused projection output
    x = fused[:, H : 2 * H]  # evenly strided rows: used in place
    y = torch.randn(4, 5, H).to(device, dtype).transpose(0, 1)  # uneven row strides: copied
    w = torch.randn(H).to(device, dtype)
    for t in (x, y):
        assert not t.is_contiguous()
        torch.testing.assert_close(tc().rms_norm(t, w, 1e-6), ops.rms_norm_ref(t, w, 1e-6))
        out, r = tc().add_rms_norm(t, t.flip(0), w, 1e-6)
        ref_out, ref_r = ops.add_rms_norm_ref(t, t.flip(0), w, 1e-6)
        torch.testing.assert_close(out, ref_out)
        assert torch.equal(r, ref_r)


# ---- rope_kv_write ----

# (B, T, H, Hkv, start): decode and prefill rows, MHA and GQA, a chunk over an existing cache
ROPE_SHAPES = [(1, 1, 1, 1, 0), (2, 5, 4, 2, 3), (1, 9, 32, 8, 100), (3, 7, 9, 3, 0)]


def naive_rotary(x, positions, cos_sin):  # every step in x.dtype
    half = x.shape[-1] // 2
    cos, sin = cos_sin.to(x.dtype)[positions].unsqueeze(-2).split(half, dim=-1)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotate(x, positions, cos_sin):
    """Rotary embedding of x [B, T, nH, D] through rope_kv_write (x as the queries, nH kv heads of zeros)."""
    B, T, nH, D = x.shape
    qkv = torch.cat((x, torch.zeros_like(x), torch.zeros_like(x)), dim=2)  # [B, T, 3 nH, D]
    cache = x.new_zeros(B, nH, int(positions.max()) + 1, D)
    return tc().rope_kv_write(qkv, positions, cos_sin, cache, cache.clone())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("shape", ROPE_SHAPES)
def test_rope_kv_write(device, dtype, D, shape):
    B, T, H, Hkv, start = shape
    S, max_pos = start + T + 5, 4096
    cos_sin = ops.rope_cos_sin(inv_freq(D), max_pos).to(device)  # [max_pos, D]
    qkv = torch.randn(B, T, H + 2 * Hkv, D).to(device, dtype)
    positions = torch.arange(start, start + T, device=device)
    k_cache, v_cache = torch.randn(B, Hkv, S, D).to(device, dtype), torch.randn(B, Hkv, S, D).to(device, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q = tc().rope_kv_write(qkv, positions, cos_sin, k_cache, v_cache)
    assert q.shape == (B, T, H, D) and q.is_contiguous()
    torch.testing.assert_close(q, ops.rope_kv_write_ref(qkv, positions, cos_sin, k_ref, v_ref))
    torch.testing.assert_close(k_cache, k_ref)  # the rows written, and every other row untouched
    assert torch.equal(v_cache, v_ref)  # values are copied, never rounded
    assert torch.equal(v_cache[:, :, start : start + T], qkv[:, :, H + Hkv :].transpose(1, 2))
    check_close(q, (qkv[:, :, :H], positions, cos_sin), ops.rotary_embedding_ref, naive_rotary, dtype)
    check_close(k_cache[:, :, start : start + T].transpose(1, 2), (qkv[:, :, H : H + Hkv], positions, cos_sin),
                ops.rotary_embedding_ref, naive_rotary, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kv_write_strided_qkv_and_any_positions(device, dtype):
    B, T, H, Hkv, D, S = 2, 6, 8, 2, 64, 40
    cos_sin = ops.rope_cos_sin(inv_freq(D), 64).to(device)
    wide = torch.randn(B, T, H + 2 * Hkv + 3, D).to(device, dtype)
    qkv = wide[:, :, 2 : 2 + H + 2 * Hkv]  # strided over heads and tokens
    assert not qkv.is_contiguous()
    positions = torch.tensor([39, 0, 7, 6, 20, 1], device=device)  # any order
    k_cache, v_cache = torch.zeros(B, Hkv, S, D).to(device, dtype), torch.zeros(B, Hkv, S, D).to(device, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    torch.testing.assert_close(tc().rope_kv_write(qkv, positions, cos_sin, k_cache, v_cache),
                               ops.rope_kv_write_ref(qkv, positions, cos_sin, k_ref, v_ref))
    torch.testing.assert_close(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)


def test_rope_cos_sin_matches_definition():
    D, max_pos = 8, 50
    table = ops.rope_cos_sin(inv_freq(D), max_pos)
    assert table.shape == (max_pos, D) and table.dtype == torch.float32
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq(D).double()[None, :]
    torch.testing.assert_close(table, torch.cat((ang.cos(), ang.sin()), -1).float(), atol=2e-5, rtol=0)


def test_rotary_is_a_rotation():
    # Dot products of a rotated query and key depend on the distance of their positions only.
    D = 64
    cos_sin = ops.rope_cos_sin(inv_freq(D), 256)
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)
    dots = [(rotate(q, torch.tensor([p + 10]), cos_sin) * rotate(k, torch.tensor([p]), cos_sin)).sum()
            for p in (0, 37, 200)]
    torch.testing.assert_close(dots[1], dots[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dots[2], dots[0], atol=1e-4, rtol=1e-4)


def test_references_match_transformers_llama():
    # Pins the conventions (rotate-half rotary, its cos/sin table, the norm, the MLP activation) to Hugging Face.
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

    B, T, nH, D = 2, 6, 4, 64
    config = LlamaConfig(hidden_size=nH * D, num_attention_heads=nH, head_dim=D, max_position_embeddings=64,
                         rope_theta=500000.0, rms_norm_eps=1e-6)
    norm = LlamaRMSNorm(nH * D, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(nH * D) + 0.5)
    h = torch.randn(B, T, nH * D)
    torch.testing.assert_close(tc().rms_norm(h, norm.weight.detach(), 1e-6), norm(h).detach())

    rope = LlamaRotaryEmbedding(config)
    positions = torch.arange(T) + 40
    cos, sin = rope(h, positions[None].expand(B, T))  # [B, T, D]
    q, k = torch.randn(B, T, nH, D), torch.randn(B, T, nH, D)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    cos_sin = ops.rope_cos_sin(rope.inv_freq, 64)
    torch.testing.assert_close(rotate(q, positions, cos_sin), q_hf)
    torch.testing.assert_close(rotate(k, positions, cos_sin), k_hf)

    gate_up = torch.randn(B, T, 2 * 96)
    expected = torch.nn.functional.silu(gate_up[..., :96]) * gate_up[..., 96:]
    torch.testing.assert_close(tc().silu_and_mul(gate_up), expected)


# ---- silu_and_mul ----


def naive_silu_and_mul(x):  # every step in x.dtype
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("device", DEVICES)
def test_silu_and_mul_extremes_and_strided(device):
    x = torch.tensor([[-1000.0, -90.0, -20.0, 0.0, 20.0, 90.0, 1000.0, 3.0] + [2.0] * 8]).to(device)  # [1, 16]
    torch.testing.assert_close(tc().silu_and_mul(x), ops.silu_and_mul_ref(x), atol=1e-6, rtol=1e-6)
    wide = torch.randn(6, 3, 40).to(device)[:, 1]  # [6, 40], rows 120 apart
    torch.testing.assert_close(tc().silu_and_mul(wide), ops.silu_and_mul_ref(wide), atol=1e-6, rtol=1e-6)


# ---- gelu_tanh_and_mul ----


def naive_gelu_tanh_and_mul(x):  # every step in x.dtype
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


# gated activation op -> (reference, every step in x.dtype, a gate scale reaching far into both tails)
GATED = {"silu_and_mul": (ops.silu_and_mul_ref, naive_silu_and_mul, 6.0),
         "gelu_tanh_and_mul": (ops.gelu_tanh_and_mul_ref, naive_gelu_tanh_and_mul, 4.0)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("shape", [(1, 2), (3, 2 * 1536), (2, 5, 2 * 17), (4, 1, 2 * 6913)])
@pytest.mark.parametrize("act", sorted(GATED))
def test_gated_activation(device, dtype, shape, act):
    reference, naive, spread = GATED[act]
    x = (torch.randn(shape) * spread).to(device, dtype)
    out = getattr(tc(), act)(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.is_contiguous() and out.dtype == dtype
    check_close(out, (x,), reference, naive, dtype)


@pytest.mark.parametrize("I", [1, 7, 16, 33, 1000])
def test_gelu_tanh_and_mul_every_isa(I, isa):
    """Each CPU path against torch's F.gelu(approximate="tanh") in fp32, within 1e-6 relative to the output's scale
    (torch's own 0.5 g (1 + tanh) cancels in the negative tail: an error of about eps |gate * up| there), and
    elementwise within 3e-5 relative of the exact value (fp64), odd sizes taking the vector loops' tails."""
    x = torch.randn(3, 2 * I) * 5
    gate, up = x.chunk(2, dim=-1)
    expected = torch.nn.functional.gelu(gate, approximate="tanh") * up
    out = tc().gelu_tanh_and_mul(x)
    scale = 1e-6 * expected.abs().max().item()
    torch.testing.assert_close(out, expected, atol=scale, rtol=1e-6)
    torch.testing.assert_close(out, ops.gelu_tanh_and_mul_ref(x), atol=scale, rtol=1e-6)
    g = gate.double()
    exact = g / (1 + torch.exp(-2 * 0.7978845608028654 * (g + 0.044715 * g**3))) * up.double()  # 0.5 g (1 + tanh)
    torch.testing.assert_close(out.double(), exact, atol=1e-30, rtol=3e-5)
    for dtype in LOW:
        torch.testing.assert_close(tc().gelu_tanh_and_mul(x.to(dtype)), ops.gelu_tanh_and_mul_ref(x.to(dtype)))


@pytest.mark.parametrize("device", DEVICES)
def test_gelu_tanh_and_mul_extremes_and_strided(device):
    x = torch.tensor([[-1e30, -1000.0, -90.0, -20.0, 0.0, 20.0, 90.0, 1000.0, 3.0] + [2.0] * 9]).to(device)  # [1, 18]
    out = tc().gelu_tanh_and_mul(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ops.gelu_tanh_and_mul_ref(x), atol=1e-6, rtol=1e-6)
    wide = torch.randn(6, 3, 40).to(device)[:, 1]  # [6, 40], rows 120 apart
    torch.testing.assert_close(tc().gelu_tanh_and_mul(wide), ops.gelu_tanh_and_mul_ref(wide), atol=1e-6, rtol=1e-6)


# ---- bad input ----


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 8)
    w = torch.randn(8)
    cs = ops.rope_cos_sin(inv_freq(16), 32)  # [32, 16]
    qkv = torch.randn(1, 3, 6, 16)  # H = 4, Hkv = 1
    kc = torch.zeros(1, 1, 40, 16)
    pos = torch.arange(3)

    def rope(qkv=qkv, pos=pos, cs=cs, k=kc, v=None):
        return tc().rope_kv_write(qkv, pos, cs, k, kc.clone() if v is None else v)

    cases = [
        (lambda: tc().rms_norm(x, w.half(), EPS), "weight dtype"),
        (lambda: tc().rms_norm(x, torch.randn(7), EPS), r"weight must have shape \[8\]"),
        (lambda: tc().rms_norm(x, w, 0.0), "eps must be > 0"),
        (lambda: tc().rms_norm(x.t(), torch.randn(2), EPS), "contiguous in its last dimension"),
        (lambda: tc().rms_norm(x.long(), w, EPS), "x must be float32, bfloat16 or float16"),
        (lambda: tc().rms_norm(torch.tensor(1.0), w, EPS), "at least 1 dimension"),
        (lambda: tc().add_rms_norm(x, torch.randn(2, 7), w, EPS), "residual shape"),
        (lambda: tc().add_rms_norm(x, x.half(), w, EPS), "residual dtype"),
        (lambda: rope(pos=torch.tensor([0, 1, 32])), r"positions must be in \[0, 32\)"),  # past cos_sin
        (lambda: rope(pos=torch.tensor([0, -1, 2])), r"positions must be in \[0, 32\)"),
        (lambda: rope(qkv=qkv[0]), r"qkv must have shape \[B, T, n_heads \+ 2 n_kv_heads, head_dim\]"),
        (lambda: rope(pos=pos.int()), "positions must be int64"),
        (lambda: rope(pos=torch.arange(4)), r"positions must be a contiguous \[T\] = \[3\]"),
        (lambda: rope(cs=cs[:, :8]), r"cos_sin must be a contiguous \[max_pos, 16\]"),
        (lambda: rope(cs=cs.half()), "cos_sin must be float32"),
        (lambda: rope(qkv=torch.randn(1, 3, 6, 15), cs=ops.rope_cos_sin(inv_freq(14), 32)), "must be even"),
        (lambda: rope(k=kc.half()), "the caches' dtype must be"),
        (lambda: rope(k=torch.zeros(1, 4, 40, 16), v=torch.zeros(1, 4, 40, 16)), r"heads must be H \+ 2 Hkv"),
        (lambda: rope(k=torch.zeros(1, 1, 16, 40).transpose(2, 3), v=torch.zeros(1, 1, 40, 16)),
         "caches must be contiguous"),
        (lambda: tc().silu_and_mul(torch.randn(3, 5)), "last dimension must be even"),
        (lambda: tc().silu_and_mul(torch.randn(3, 4).long()), "x must be float32, bfloat16 or float16"),
        (lambda: tc().gelu_tanh_and_mul(torch.randn(3, 5)), "gelu_tanh_and_mul: .*last dimension must be even"),
        (lambda: tc().gelu_tanh_and_mul(torch.randn(3, 4).long()), "x must be float32, bfloat16 or float16"),
        (lambda: tc().attention(qkv[:, :, :4], kc, kc, pos, 1.0, -2), "attention: window must be >= 0"),
    ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()


# ---- torch.compile and opcheck (exercise the fake implementations) ----


def _block(x, residual, w, positions, cos_sin, k_cache, v_cache):  # x, residual [B, T, 6 D]: q | k | v, 2 heads each
    B, T, _ = x.shape
    h, r = ops.add_rms_norm(x, residual, w, EPS)
    q = ops.rope_kv_write(h.view(B, T, 6, -1), positions, cos_sin, k_cache, v_cache)  # [B, T, 2, D]
    y = ops.attention(q, k_cache, v_cache, positions, 0.5)  # [B, T, 2, D]
    return ops.rms_norm(ops.silu_and_mul(y.reshape(B, T, -1)), w[: y.shape[-1]], EPS)


@pytest.mark.parametrize("backend, dynamic", [("inductor", False), ("aot_eager", True)])
def test_torch_compile_fullgraph(backend, dynamic):
    tc()
    D = 32
    w, cos_sin = torch.randn(6 * D), ops.rope_cos_sin(inv_freq(D), 16)
    torch._dynamo.reset()
    compiled = torch.compile(_block, fullgraph=True, backend=backend, dynamic=dynamic)
    for B, T in ((2, 5), (1, 3)):  # two shapes
        x, res, positions = torch.randn(B, T, 6 * D), torch.randn(B, T, 6 * D), torch.arange(T) + 2
        caches = [torch.zeros(B, 2, 16, D) for _ in range(4)]
        torch.testing.assert_close(compiled(x, res, w, positions, cos_sin, *caches[:2]),
                                   _block(x, res, w, positions, cos_sin, *caches[2:]))
        torch.testing.assert_close(caches[0], caches[2])  # the compiled graph wrote the caches too
        torch.testing.assert_close(caches[1], caches[3])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    t = tc()
    cs = ops.rope_cos_sin(inv_freq(16), 32).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(3, 4, 24).to(device, dtype), torch.randn(24).to(device, dtype)
        torch.library.opcheck(t.rms_norm.default, (x, w, 1e-6))
        torch.library.opcheck(t.add_rms_norm.default, (x, torch.randn_like(x), w, 1e-6))
        torch.library.opcheck(t.silu_and_mul.default, (x,))
        torch.library.opcheck(t.gelu_tanh_and_mul.default, (x,))
        qkv = torch.randn(2, 5, 6, 16).to(device, dtype)
        caches = [torch.zeros(2, 2, 32, 16).to(device, dtype) for _ in range(2)]
        torch.library.opcheck(t.rope_kv_write.default, (qkv, torch.arange(3, 8, device=device), cs, *caches))
        torch.library.opcheck(t.rope_kv_write.default, (qkv[:, :, 1:5], torch.arange(5, device=device), cs,
                                                        caches[0][:, :1].contiguous(), caches[1][:, :1].contiguous()))


# ---- the Python face ----


def test_public_ops_are_the_compiled_ops():
    assert ops.rms_norm is torch.ops.tinychat.rms_norm.default
    assert ops.add_rms_norm is torch.ops.tinychat.add_rms_norm.default
    assert ops.rope_kv_write is torch.ops.tinychat.rope_kv_write.default
    assert ops.attention is torch.ops.tinychat.attention.default
    assert ops.silu_and_mul is torch.ops.tinychat.silu_and_mul.default
    assert ops.gelu_tanh_and_mul is torch.ops.tinychat.gelu_tanh_and_mul.default


FALLBACK_SCRIPT = """
import sys, warnings
sys.modules["tinychat._C"] = None  # makes `import tinychat._C` fail
warnings.simplefilter("always")
import torch
from tinychat import ops, model  # noqa: F401  (a second module importing ops must not warn again)
assert not ops.EXTENSION_AVAILABLE
assert ops.rms_norm is ops.rms_norm_ref and ops.add_rms_norm is ops.add_rms_norm_ref
assert ops.rope_kv_write is ops.rope_kv_write_ref and ops.attention is ops.attention_ref
assert ops.silu_and_mul is ops.silu_and_mul_ref and ops.gelu_tanh_and_mul is ops.gelu_tanh_and_mul_ref
from tinychat.config import ModelConfig
cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8)
m = model.Transformer(cfg).eval()
torch.manual_seed(0)
torch.nn.init.normal_(m.embed.weight)  # the constructor leaves it uninitialized (the loader fills it)
m.setup_kv_cache(16)
with torch.no_grad():
    full = m(torch.arange(6)[None])
    step = torch.cat([m(torch.arange(5)[None]), m(torch.tensor([[5]]), torch.tensor([5]))], dim=1)
torch.testing.assert_close(full, step, rtol=1e-5, atol=1e-5)  # the whole decoder runs on the references
print("ok")
"""


def test_missing_extension_falls_back_with_one_warning():
    out = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert out.stderr.count("compiled extension tinychat._C is missing") == 1, out.stderr
