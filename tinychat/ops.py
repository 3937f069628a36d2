"""tinychat's fused ops: the compiled kernels (torch.ops.tinychat.*) and their PyTorch references.

The model calls only the public wrappers (rms_norm, add_rms_norm, rotary_embedding, int4_linear,
decode_attention). They run the compiled kernels when the tinychat._C extension is built, else the *_ref functions
below, which define the semantics: fp32 math, each result cast once to the input dtype.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from tinychat.quant.pack import unpack_int4_op

# ---- pure-PyTorch references ----


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * weight. x [..., H], weight [H] -> [..., H] in x.dtype."""
    xf = x.float()  # [..., H]
    inv_rms = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)  # [..., 1]
    return (xf * inv_rms * weight.float()).to(x.dtype)


def add_rms_norm_ref(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """r = x + residual in x.dtype (as Hugging Face adds residuals); returns (rms_norm(r), r)."""
    r = x + residual  # [..., H]
    return rms_norm_ref(r, weight, eps), r


def rotary_embedding_ref(x: Tensor, positions: Tensor, cos_sin: Tensor) -> Tensor:
    """Rotate-half (GPT-NeoX / Hugging Face Llama) rotary embedding.

    x [B, T, nH, D], positions int64 [B, T] or [T], cos_sin fp32 [max_pos, D] = [cos | sin]
    -> [B, T, nH, D] in x.dtype.
    """
    half = x.shape[-1] // 2
    cos, sin = cos_sin[positions].unsqueeze(-2).split(half, dim=-1)  # [B, T, 1, D/2] or [T, 1, D/2]
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]  # [B, T, nH, D/2]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # [B, T, nH, D]
    return out.to(x.dtype)


def decode_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: int, scale: float) -> Tensor:
    """One new query per sequence against the first `length` cache positions, softmax in fp32.

    q [B, H, D]; k_cache, v_cache [B, Hkv, S, D] with H % Hkv == 0 (query head h reads kv head h // (H // Hkv))
    -> [B, H, D] in q.dtype.
    """
    B, H, D = q.shape
    Hkv = k_cache.shape[1]
    k = k_cache[:, :, :length].float()  # [B, Hkv, L, D]
    v = v_cache[:, :, :length].float()
    qg = q.float().view(B, Hkv, H // Hkv, D)  # [B, Hkv, rep, D]: the query heads of each kv head
    probs = (scale * qg @ k.transpose(-1, -2)).softmax(-1)  # [B, Hkv, rep, L]
    return (probs @ v).reshape(B, H, D).to(q.dtype)


def rope_cos_sin(inv_freq: Tensor, max_pos: int) -> Tensor:
    """The rotary table: inv_freq [D/2] -> fp32 [max_pos, D] = [cos(p * inv_freq) | sin(p * inv_freq)]."""
    pos = torch.arange(max_pos, dtype=torch.float32, device=inv_freq.device)  # [max_pos]
    freqs = torch.outer(pos, inv_freq.float())  # [max_pos, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def int4_linear_ref(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """x @ W.T with W the 4-bit weights in the int4 op layout (tinychat/quant/pack.py), dequantized to fp32.

    x [..., K] (fp32/bf16/fp16, K % 32 == 0); qweight uint8 [N, K/2] (byte j of each 32-channel block b: low nibble
    = channel 32b + j, high nibble = 32b + 16 + j); scales, zeros fp32 [N, K/G];
    W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]. fp32 math, the result cast once -> [..., N] in x.dtype.
    """
    N, K = qweight.shape[0], qweight.shape[1] * 2
    q = unpack_int4_op(qweight).reshape(N, K // group_size, group_size)  # [N, K/G, G]
    w = ((q.float() - zeros[..., None]) * scales[..., None]).reshape(N, K)  # [N, K] fp32
    return (x.float() @ w.t()).to(x.dtype)


# ---- the compiled extension ----


def _rms_norm_fake(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x.new_empty(x.shape)


def _add_rms_norm_fake(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _rotary_embedding_fake(x: Tensor, positions: Tensor, cos_sin: Tensor) -> Tensor:
    return x.new_empty(x.shape)


def _int4_linear_fake(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _decode_attention_fake(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: int, scale: float) -> Tensor:
    return q.new_empty(q.shape)


def _register_fakes() -> None:
    """Shape/dtype-only implementations, so torch.compile can trace the compiled ops."""
    fakes = {"rms_norm": _rms_norm_fake, "add_rms_norm": _add_rms_norm_fake,
             "rotary_embedding": _rotary_embedding_fake, "int4_linear": _int4_linear_fake,
             "decode_attention": _decode_attention_fake}
    for name, fake in fakes.items():
        try:
            torch.library.register_fake(f"tinychat::{name}", fake)
        except RuntimeError as e:  # registered before, e.g. when this module was reloaded
            if "already has" not in str(e):
                raise


def _load_extension() -> bool:
    """Load tinychat._C (which registers torch.ops.tinychat.*); warn once and return False if it is missing."""
    try:
        import tinychat._C  # noqa: F401
    except ImportError as e:
        warnings.warn(
            f"tinychat: the compiled extension tinychat._C is missing ({e}); using the slower "
            "reference PyTorch ops. Build it with `pip install --no-build-isolation -e .` "
            "(export CUDA_HOME=/path/to/cuda for the GPU kernels).",
            stacklevel=2,
        )
        return False
    _register_fakes()
    _register_cuda_stand_ins()
    return True


def _register_cuda_stand_ins() -> None:
    """Ops with a CPU kernel but no CUDA kernel yet run their reference on CUDA tensors (the CUDA decode issue
    replaces these); int4_linear has no stand-in: a 4-bit model on CUDA must wait for its kernel."""
    try:
        torch.library.impl("tinychat::decode_attention", "CUDA")(decode_attention_ref)
    except RuntimeError as e:  # registered before, e.g. when this module was reloaded
        if "already" not in str(e):
            raise


# Decided once, at import: each public op below is either the compiled op or its reference, so a call pays
# no check and torch.compile sees a plain torch op.
EXTENSION_AVAILABLE = _load_extension()


def _pick(name: str, reference):
    return getattr(torch.ops.tinychat, name).default if EXTENSION_AVAILABLE else reference


# ---- public ops (what the model calls) ----

# x [..., H], weight [H] -> [..., H]; see rms_norm_ref
rms_norm = _pick("rms_norm", rms_norm_ref)
# x, residual [..., H], weight [H] -> (normed [..., H], x + residual [..., H]); see add_rms_norm_ref
add_rms_norm = _pick("add_rms_norm", add_rms_norm_ref)
# x [B, T, nH, D], positions [B, T] or [T], cos_sin [max_pos, D] -> new [B, T, nH, D]; see rotary_embedding_ref.
# Positions must lie in [0, max_pos): the CPU kernel raises otherwise; the CUDA kernel does not check (no device
# sync) and writes NaN for those rows.
rotary_embedding = _pick("rotary_embedding", rotary_embedding_ref)
# x [..., K], qweight uint8 [N, K/2], scales/zeros fp32 [N, K/G], group_size -> [..., N] in x.dtype; see
# int4_linear_ref. CPU kernels: AVX-512, AVX2 or portable, picked at run time (torch.ops.tinychat.cpu_isa() says
# which); there is no CUDA kernel yet (the dispatcher refuses CUDA).
int4_linear = _pick("int4_linear", int4_linear_ref)
# q [B, H, D], k_cache/v_cache [B, Hkv, S, D], length, scale -> [B, H, D]; see decode_attention_ref. CPU kernel:
# online softmax over the cache, one pass, GQA groups share each key/value read; on CUDA the reference stands in.
decode_attention = _pick("decode_attention", decode_attention_ref)
