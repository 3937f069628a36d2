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


def naive_rotary(x, positions, cos_sin):  # every step in x.dtype
    half = x.shape[-1] // 2
    cos, sin = cos_sin.to(x.dtype)[positions].unsqueeze(-2).split(half, dim=-1)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def test_extension_is_built():
    assert ops.EXTENSION_AVAILABLE
    import tinychat._C

    for name in ("rms_norm", "add_rms_norm", "rotary_embedding"):
        assert hasattr(torch.ops.tinychat, name)
        has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(f"tinychat::{name}", "CUDA")
        assert has_cuda_kernel == bool(tinychat._C.WITH_CUDA)


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


# ---- rotary_embedding ----

ROPE_SHAPES = [(1, 1, 1), (2, 5, 4), (1, 9, 32), (3, 7, 8)]  # (B, T, n_heads): q- and kv-like


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("shape", ROPE_SHAPES)
@pytest.mark.parametrize("pos_kind", ["T", "BT", "BT_strided"])
def test_rotary(device, dtype, D, shape, pos_kind):
    B, T, nH = shape
    max_pos = 4096
    cos_sin = ops.rope_cos_sin(inv_freq(D), max_pos).to(device)  # [max_pos, D]
    x = torch.randn(B, T, nH, D).to(device, dtype)
    if pos_kind == "T":
        positions = torch.arange(T) + 100  # [T], broadcast over B
    elif pos_kind == "BT":
        positions = torch.randint(0, max_pos, (B, T))
    else:
        positions = torch.randint(0, max_pos, (T, B)).t()  # [B, T], non-contiguous
    positions = positions.to(device)
    out = tc().rotary_embedding(x, positions, cos_sin)
    assert out.shape == x.shape and out.is_contiguous()
    check_close(out, (x, positions, cos_sin), ops.rotary_embedding_ref, naive_rotary, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_strided_x(device, dtype):
    B, T, nH, nKV, D = 2, 6, 8, 2, 64
    cos_sin = ops.rope_cos_sin(inv_freq(D), 64).to(device)
    positions = torch.arange(T, device=device) + 3
    qkv = torch.randn(B, T, (nH + 2 * nKV) * D).to(device, dtype)  # a fused qkv projection
    q = qkv[..., : nH * D].view(B, T, nH, D)
    k = qkv[..., nH * D : (nH + nKV) * D].view(B, T, nKV, D)
    bhtd = torch.randn(B, nH, T, D).to(device, dtype).transpose(1, 2)  # [B, T, nH, D], permuted strides
    for x in (q, k, bhtd, bhtd[1:], bhtd[:, ::2]):
        assert not x.is_contiguous()
        pos = positions[: x.shape[1]]
        torch.testing.assert_close(tc().rotary_embedding(x, pos, cos_sin),
                                   ops.rotary_embedding_ref(x, pos, cos_sin))


def test_rope_cos_sin_matches_definition():
    D, max_pos = 8, 50
    table = ops.rope_cos_sin(inv_freq(D), max_pos)
    assert table.shape == (max_pos, D) and table.dtype == torch.float32
    ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq(D).double()[None, :]
    torch.testing.assert_close(table, torch.cat((ang.cos(), ang.sin()), -1).float(), atol=2e-5, rtol=0)


def test_rotary_is_a_rotation():
    # Rotating position p then q by the inverse angle is the identity; dot products depend on p - q only.
    D = 64
    cos_sin = ops.rope_cos_sin(inv_freq(D), 256)
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)
    dots = [
        (tc().rotary_embedding(q, torch.tensor([p + 10]), cos_sin)
         * tc().rotary_embedding(k, torch.tensor([p]), cos_sin)).sum()
        for p in (0, 37, 200)
    ]
    torch.testing.assert_close(dots[1], dots[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dots[2], dots[0], atol=1e-4, rtol=1e-4)


def test_references_match_transformers_llama():
    # Pins the conventions (rotate-half rotary, its cos/sin table, the norm) to Hugging Face Llama.
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
    positions = torch.randint(0, 64, (B, T))
    cos, sin = rope(h, positions)  # [B, T, D]
    q, k = torch.randn(B, T, nH, D), torch.randn(B, T, nH, D)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    cos_sin = ops.rope_cos_sin(rope.inv_freq, 64)
    torch.testing.assert_close(tc().rotary_embedding(q, positions, cos_sin), q_hf)
    torch.testing.assert_close(tc().rotary_embedding(k, positions, cos_sin), k_hf)


# ---- bad input ----


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 8)
    w = torch.randn(8)
    cs = ops.rope_cos_sin(inv_freq(16), 32)  # [32, 16]
    xr = torch.randn(1, 3, 2, 16)
    pos = torch.arange(3)
    cases = [
        (lambda: tc().rms_norm(x, w.half(), EPS), "weight dtype"),
        (lambda: tc().rms_norm(x, torch.randn(7), EPS), r"weight must have shape \[8\]"),
        (lambda: tc().rms_norm(x, w, 0.0), "eps must be > 0"),
        (lambda: tc().rms_norm(x.t(), torch.randn(2), EPS), "contiguous in its last dimension"),
        (lambda: tc().rms_norm(x.long(), w, EPS), "x must be float32, bfloat16 or float16"),
        (lambda: tc().rms_norm(torch.tensor(1.0), w, EPS), "at least 1 dimension"),
        (lambda: tc().add_rms_norm(x, torch.randn(2, 7), w, EPS), "residual shape"),
        (lambda: tc().add_rms_norm(x, x.half(), w, EPS), "residual dtype"),
        (lambda: tc().rotary_embedding(xr, torch.tensor([0, 1, 32]), cs), r"positions must be in \[0, 32\)"),
        (lambda: tc().rotary_embedding(xr, torch.tensor([0, -1, 2]), cs), r"positions must be in \[0, 32\)"),
        (lambda: tc().rotary_embedding(xr[0], pos, cs), r"x must have shape \[B, T, n_heads, head_dim\]"),
        (lambda: tc().rotary_embedding(xr, pos.int(), cs), "positions must be int64"),
        (lambda: tc().rotary_embedding(xr, torch.arange(4), cs), r"positions must have shape \[T\] or \[B, T\]"),
        (lambda: tc().rotary_embedding(xr, pos, cs[:, :8]), r"cos_sin must have shape \[max_pos, 16\]"),
        (lambda: tc().rotary_embedding(xr, pos, cs.half()), "cos_sin must be float32"),
        (lambda: tc().rotary_embedding(torch.randn(1, 3, 2, 15), pos, cs), "must be even"),
    ]
    for fn, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()


# ---- torch.compile and opcheck (exercise the fake implementations) ----


def _block(x, residual, w, positions, cos_sin):  # x, residual [B, T, nH * D]
    B, T, _ = x.shape
    h, r = ops.add_rms_norm(x, residual, w, EPS)
    q = ops.rotary_embedding(h.view(B, T, -1, cos_sin.shape[1]), positions, cos_sin)
    return ops.rms_norm(q.view(B, T, -1), w, EPS) + r


@pytest.mark.parametrize("backend, dynamic", [("inductor", False), ("aot_eager", True)])
def test_torch_compile_fullgraph(backend, dynamic):
    tc()
    D = 32
    x, res = torch.randn(2, 5, 4 * D), torch.randn(2, 5, 4 * D)
    w, positions, cos_sin = torch.randn(4 * D), torch.arange(5), ops.rope_cos_sin(inv_freq(D), 16)
    torch._dynamo.reset()
    compiled = torch.compile(_block, fullgraph=True, backend=backend, dynamic=dynamic)
    torch.testing.assert_close(compiled(x, res, w, positions, cos_sin), _block(x, res, w, positions, cos_sin))
    x2, res2 = torch.randn(1, 3, 4 * D), torch.randn(1, 3, 4 * D)  # another shape
    torch.testing.assert_close(compiled(x2, res2, w, positions[:3], cos_sin),
                               _block(x2, res2, w, positions[:3], cos_sin))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    t = tc()
    cs = ops.rope_cos_sin(inv_freq(16), 32).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(3, 4, 24).to(device, dtype), torch.randn(24).to(device, dtype)
        torch.library.opcheck(t.rms_norm.default, (x, w, 1e-6))
        torch.library.opcheck(t.add_rms_norm.default, (x, torch.randn_like(x), w, 1e-6))
        xr = torch.randn(2, 5, 3, 16).to(device, dtype)
        pos = torch.randint(0, 32, (2, 5), device=device)
        torch.library.opcheck(t.rotary_embedding.default, (xr, torch.arange(5, device=device), cs))
        torch.library.opcheck(t.rotary_embedding.default, (xr[:, :, 1:], pos, cs))


# ---- the Python face ----


def test_public_ops_are_the_compiled_ops():
    assert ops.rms_norm is torch.ops.tinychat.rms_norm.default
    assert ops.add_rms_norm is torch.ops.tinychat.add_rms_norm.default
    assert ops.rotary_embedding is torch.ops.tinychat.rotary_embedding.default


FALLBACK_SCRIPT = """
import sys, warnings
sys.modules["tinychat._C"] = None  # makes `import tinychat._C` fail
warnings.simplefilter("always")
import torch
from tinychat import ops, model  # noqa: F401  (a second module importing ops must not warn again)
assert not ops.EXTENSION_AVAILABLE
assert ops.rms_norm is ops.rms_norm_ref and ops.add_rms_norm is ops.add_rms_norm_ref
assert ops.rotary_embedding is ops.rotary_embedding_ref and ops.decode_attention is ops.decode_attention_ref
from tinychat.config import ModelConfig
cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8)
m = model.Transformer(cfg).eval()
torch.manual_seed(0)
torch.nn.init.normal_(m.embed.weight)  # the constructor leaves it uninitialized (the loader fills it)
m.setup_kv_cache(16)
with torch.no_grad():
    full = m(torch.arange(6)[None])
    step = torch.cat([m(torch.arange(5)[None]), m(torch.tensor([[5]]), start=5)], dim=1)
torch.testing.assert_close(full, step, rtol=1e-5, atol=1e-5)  # the whole decoder runs on the references
print("ok")
"""


def test_missing_extension_falls_back_with_one_warning():
    out = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    assert out.stderr.count("compiled extension tinychat._C is missing") == 1, out.stderr
