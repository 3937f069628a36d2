"""decode_attention (the compiled CPU kernel; the reference stands in on CUDA) against its PyTorch reference and
against SDPA, and the model's decode path built on it."""

import pytest
import torch
import torch.nn.functional as F

from tinychat import ops

# (B, H, Hkv, S, length, D): one head, GQA groups of 3 and 4, MHA, lengths 1, odd, one past a block, the full cache
SHAPES = [(1, 1, 1, 8, 1, 64), (1, 9, 3, 100, 37, 64), (2, 8, 2, 300, 65, 128), (3, 4, 4, 64, 64, 16),
          (1, 32, 8, 1030, 1029, 128)]


def tc():
    assert ops.EXTENSION_AVAILABLE, "tinychat._C is not built: pip install --no-build-isolation -e ."
    return torch.ops.tinychat


def inputs(B, H, Hkv, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,Hkv,S,length,D", SHAPES)
def test_matches_reference_and_sdpa(B, H, Hkv, S, length, D, dtype):
    q, k, v = inputs(B, H, Hkv, S, D, dtype)
    out = tc().decode_attention(q, k, v, length, D**-0.5)
    assert out.shape == (B, H, D) and out.dtype == dtype
    ref = ops.decode_attention_ref(q, k, v, length, D**-0.5)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(out, ref, **tol)
    sdpa = F.scaled_dot_product_attention(q.float()[:, :, None], k[:, :, :length].float(), v[:, :, :length].float(),
                                          enable_gqa=H != Hkv)[:, :, 0]  # [B, H, D]
    torch.testing.assert_close(ref.float(), sdpa, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-2)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_and_strided_query(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q4 = torch.randn(2, 3, 8, 64).transpose(1, 2)  # [B, T, H, D] seen as [B, H, T, D], as the model makes q
        _, k, v = inputs(2, 8, 2, 50, 64, torch.float32)
        q = q4[:, :, 1]
        assert not q.is_contiguous()
        torch.testing.assert_close(tc().decode_attention(q, k, v, 33, 0.125),
                                   ops.decode_attention_ref(q, k, v, 33, 0.125), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_large_scores_do_not_overflow():
    q, k, v = inputs(1, 2, 1, 200, 64, torch.float32)
    out = tc().decode_attention(q * 100, k, v, 200, 1.0)  # scores in the thousands: online softmax must rescale
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ops.decode_attention_ref(q * 100, k, v, 200, 1.0), atol=1e-4, rtol=1e-4)


def _bad():
    q, k, v = inputs(1, 4, 2, 16, 8, torch.float32)
    yield "length 0", (q, k, v, 0, 1.0), r"length must be in \[1, 16\]"
    yield "length past the cache", (q, k, v, 17, 1.0), r"length must be in \[1, 16\]"
    yield "heads", (torch.randn(1, 3, 8), k, v, 4, 1.0), r"must be a multiple of the caches'"
    yield "dtype", (q, k.double(), v, 4, 1.0), r"dtype must match"
    yield "shape", (q, k, v[:, :, :8], 4, 1.0), r"same shape"
    yield "q rank", (q[0], k, v, 4, 1.0), r"q must have shape \[B, H, D\]"


@pytest.mark.parametrize("case", list(_bad()), ids=lambda c: c[0])
def test_bad_input(case):
    _, args, message = case
    with pytest.raises(RuntimeError, match="decode_attention: .*" + message):
        tc().decode_attention(*args)


def test_opcheck():
    q, k, v = inputs(1, 4, 2, 16, 8, torch.float32)
    torch.library.opcheck(torch.ops.tinychat.decode_attention.default, (q, k, v, 5, 0.3))


def test_model_decode_matches_full_forward():
    """The decode path (one token at a time over the cache) gives the logits of one full forward pass."""
    from tinychat.config import ModelConfig
    from tinychat.model import Transformer

    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=128)
    model = Transformer(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    model.eval()
    tokens = torch.randint(0, 64, (1, 70))
    with torch.no_grad():
        full = model(tokens)  # [1, 70, V], no cache: SDPA with a causal mask
        model.setup_kv_cache(128)
        model(tokens[:, :3], start=0)
        steps = [model(tokens[:, i : i + 1], start=i)[:, 0] for i in range(3, 70)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 3:], atol=1e-4, rtol=1e-4)
