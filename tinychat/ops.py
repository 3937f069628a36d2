"""tinychat's fused ops: the compiled kernels (torch.ops.tinychat.*) and their PyTorch references.

The model calls only the public wrappers (rms_norm, add_rms_norm, rope_kv_write, attention, silu_and_mul,
gelu_tanh_and_mul, int4_linear, int8_linear). They run the compiled kernels when the tinychat._C extension is built,
else the *_ref functions below, which define the semantics: fp32 math, each result cast once to the input dtype.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from tinychat.int4_layout import unpack_int4_op

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


def rope_kv_write_ref(qkv: Tensor, positions: Tensor, cos_sin: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
    """Rotate q and k of the fused projection, write k and v into the caches (in place) at rows `positions` % S.

    qkv [B, T, H + 2 Hkv, D] (heads q | k | v), positions int64 [T], cos_sin fp32 [max_pos, D];
    k_cache, v_cache [B, Hkv, S, D] in qkv.dtype (on the CPU also float16 / bfloat16 below a float32 qkv: k and v are
    rounded to it once) -> rotated q [B, T, H, D] (contiguous, qkv.dtype). Position p goes to row p % S: row p of a
    cache longer than every position, a ring for a shorter one (a sliding-window layer's, see attention_ref).
    """
    Hkv = k_cache.shape[1]
    H = qkv.shape[2] - 2 * Hkv
    q = rotary_embedding_ref(qkv[:, :, :H], positions, cos_sin)  # [B, T, H, D]
    k = rotary_embedding_ref(qkv[:, :, H : H + Hkv], positions, cos_sin)  # [B, T, Hkv, D]
    rows = positions % k_cache.shape[2]  # [T]
    k_cache[:, :, rows] = k.transpose(1, 2).to(k_cache.dtype)
    v_cache[:, :, rows] = qkv[:, :, H + Hkv :].transpose(1, 2).to(v_cache.dtype)
    return q.contiguous()


def attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, scale: float, window: int = 0
                  ) -> Tensor:
    """Causal attention over the cache, optionally within a sliding window, softmax in fp32.

    Query t at position p_t = positions[t] attends to the positions max(0, p_t - window + 1) .. p_t (window 0:
    0 .. p_t), reading position j at cache row j % S (S = the caches' rows). A cache longer than every position is
    the plain one (row j = position j); a shorter one is a ring, which the caller keeps at S >= window + T - 1 rows
    (positions ascending within a call), so that no position a query sees was overwritten. q [B, T, H, D];
    k_cache, v_cache [B, Hkv, S, D] with H % Hkv == 0 (query head h reads kv head h // (H // Hkv)); positions int64
    [T], >= 0; window >= 0 -> [B, T, H, D] in q.dtype.

    Computed by rows, with no host sync: for query t, row r holds position j = p_t - ((p_t - r) mod S), the latest
    position <= p_t that lands on r, and the row is visible when that j is in the window (j >= 0 for window 0). Each
    visible position is one row as long as a query sees at most S positions (the kernels' condition).
    """
    H, S = q.shape[2], k_cache.shape[2]
    rep = H // k_cache.shape[1]
    k = k_cache.float().repeat_interleave(rep, dim=1)  # [B, H, S, D]
    v = v_cache.float().repeat_interleave(rep, dim=1)
    scores = scale * q.float().transpose(1, 2) @ k.transpose(-1, -2)  # [B, H, T, S]
    rows = torch.arange(S, device=q.device)[None, :]  # [1, S]
    held = positions[:, None] - (positions[:, None] - rows) % S  # [T, S]: the position row r holds for query t
    first = (positions - window + 1).clamp(min=0) if window > 0 else torch.zeros_like(positions)  # [T]
    visible = held >= first[:, None]  # [T, S]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2).to(q.dtype).contiguous()  # [B, T, H, D]


def silu_and_mul_ref(x: Tensor) -> Tensor:
    """silu(gate) * up for x [..., 2I] = [gate | up], in fp32 -> [..., I] in x.dtype."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def gelu_tanh_and_mul_ref(x: Tensor) -> Tensor:
    """gelu_tanh(gate) * up for x [..., 2I] = [gate | up] (GELU with the tanh approximation, Gemma's), in fp32 ->
    [..., I] in x.dtype."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.gelu(gate, approximate="tanh") * up).to(x.dtype)


def rope_cos_sin(inv_freq: Tensor, max_pos: int) -> Tensor:
    """The rotary table: inv_freq [D/2] -> fp32 [max_pos, D] = [cos(p * inv_freq) | sin(p * inv_freq)]."""
    pos = torch.arange(max_pos, dtype=torch.float32, device=inv_freq.device)  # [max_pos]
    freqs = torch.outer(pos, inv_freq.float())  # [max_pos, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


KQUANT_SUPER_BYTES = 20  # K-quant superblock parameters per 256 channels (csrc/common/kquant.h)


def kquant_group_params(scales: Tensor) -> tuple[Tensor, Tensor]:
    """K-quant superblocks, uint8 [N, K/256, 20] (fp16 d, fp16 dmin, 8 6-bit scales sc, 8 mins mn; csrc/common/
    kquant.h) -> fp32 scales d * sc and offsets -(dmin * mn) [N, K/32], exact."""
    N = scales.shape[0]
    d = scales[..., 0:2].contiguous().view(torch.float16).float()  # [N, K/256, 1]
    dmin = scales[..., 2:4].contiguous().view(torch.float16).float()
    s = (d * scales[..., 4:12].float()).reshape(N, -1)  # [N, K/32]
    m = -(dmin * scales[..., 12:20].float()).reshape(N, -1)
    return s, m


def group_weights(q: Tensor, scales: Tensor, offsets: Tensor | None, group_size: int, default_offset: float
                  ) -> Tensor:
    """W = q * s + m per group in fp32: q [N, K] integer codes, scales/offsets [N, K/G] (fp32 or fp16, widened
    exactly; or K-quant superblocks, kquant_group_params); offsets None -> m = default_offset * s. -> fp32 [N, K]."""
    N, K = q.shape
    if scales.dtype == torch.uint8:
        scales, offsets = kquant_group_params(scales)
    s = scales.float()[..., None]  # [N, K/G, 1]
    m = default_offset * s if offsets is None else offsets.float()[..., None]
    return (q.float().reshape(N, K // group_size, group_size) * s + m).reshape(N, K)


def int4_linear_ref(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor | None, group_size: int) -> Tensor:
    """x @ W.T with W the 4-bit weights in the int4 op layout (tinychat/int4_layout.py), dequantized to fp32.

    x [..., K] (fp32/bf16/fp16, K % 32 == 0); qweight uint8 [N, K/2] (byte j of each 32-channel block b: low nibble
    = channel 32b + j, high nibble = 32b + 16 + j); scales [N, K/G] fp32 or fp16, offsets of the same shape and dtype
    or None; W[n, k] = q[n, k] * s + m, s and m the group's scale and offset (m = -8 s without offsets, ggml's
    Q4_0). Or scales uint8 [N, K/256, 20], K-quant superblocks (kquant_group_params), G = 32, no offsets. fp32 math,
    the result cast once -> [..., N] in x.dtype.
    """
    w = group_weights(unpack_int4_op(qweight), scales, offsets, group_size, -8.0)  # [N, K] fp32
    return (x.float() @ w.t()).to(x.dtype)


def int8_linear_ref(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor | None, group_size: int) -> Tensor:
    """x @ W.T with 8-bit weights in groups: x [..., K]; qweight int8 [N, K]; scales [N, K/G] fp32 or fp16,
    offsets of the same shape and dtype or None (or K-quant superblocks, as int4_linear_ref); W[n, k] = q[n, k] * s
    + m (m = 0 without offsets). fp32 math, the result cast once -> [..., N] in x.dtype."""
    w = group_weights(qweight, scales, offsets, group_size, 0.0)  # [N, K] fp32
    return (x.float() @ w.t()).to(x.dtype)


# ---- the compiled extension ----


def _rms_norm_fake(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return x.new_empty(x.shape)


def _add_rms_norm_fake(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _rope_kv_write_fake(qkv: Tensor, positions: Tensor, cos_sin: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
    B, T, heads, D = qkv.shape
    return qkv.new_empty((B, T, heads - 2 * k_cache.shape[1], D))


def _attention_fake(q: Tensor, k_cache: Tensor, v_cache: Tensor, positions: Tensor, scale: float, window: int = 0
                    ) -> Tensor:
    return q.new_empty(q.shape)


def _silu_and_mul_fake(x: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def _gelu_tanh_and_mul_fake(x: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def _int4_linear_fake(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor | None, group_size: int
                      ) -> Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _int8_linear_fake(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor | None, group_size: int
                      ) -> Tensor:
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


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
    return True


# Decided once, at import: each public op below is either the compiled op or its reference, so a call pays
# no check and torch.compile sees a plain torch op.
EXTENSION_AVAILABLE = _load_extension()


def _op(name: str, reference, fake, cuda_stand_in: bool = False):
    """One op of the list below: the compiled `tinychat::{name}` with its fake (shape/dtype only, so torch.compile
    can trace it) registered, or `reference` when the extension is missing. cuda_stand_in: where the extension was
    built without a CUDA kernel for it, the reference runs on CUDA tensors, so a model still runs there (slowly)."""
    if not EXTENSION_AVAILABLE:
        return reference
    qualified = f"tinychat::{name}"
    try:
        torch.library.register_fake(qualified, fake)
    except RuntimeError as e:  # registered before, e.g. when this module was reloaded
        if "already has" not in str(e):
            raise
    if cuda_stand_in and not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA"):
        torch.library.impl(qualified, "CUDA")(reference)
    return getattr(torch.ops.tinychat, name).default


# ---- public ops (what the model calls): the op list, once ----

# x [..., H], weight [H] -> [..., H]; see rms_norm_ref
rms_norm = _op("rms_norm", rms_norm_ref, _rms_norm_fake)
# x, residual [..., H], weight [H] -> (normed [..., H], x + residual [..., H]); see add_rms_norm_ref
add_rms_norm = _op("add_rms_norm", add_rms_norm_ref, _add_rms_norm_fake)
# qkv [B, T, H + 2 Hkv, D], positions [T], cos_sin [max_pos, D], k_cache/v_cache [B, Hkv, S, D] (written in
# place at rows positions % S) -> rotated q [B, T, H, D]; see rope_kv_write_ref.
rope_kv_write = _op("rope_kv_write", rope_kv_write_ref, _rope_kv_write_fake, cuda_stand_in=True)
# q [B, T, H, D], k_cache/v_cache [B, Hkv, S, D], positions [T], scale, window=0 (0: no sliding window; a ring
# cache of S rows holds position j at row j % S) -> [B, T, H, D]; see attention_ref. CPU kernel: online softmax,
# GQA groups share each key/value read; T = 1 (decode) and T > 1 (prefill) alike.
attention = _op("attention", attention_ref, _attention_fake, cuda_stand_in=True)
# x [..., 2I] -> silu(x[..., :I]) * x[..., I:] [..., I]; see silu_and_mul_ref.
silu_and_mul = _op("silu_and_mul", silu_and_mul_ref, _silu_and_mul_fake, cuda_stand_in=True)
# x [..., 2I] -> gelu_tanh(x[..., :I]) * x[..., I:] [..., I] (Gemma's MLP); see gelu_tanh_and_mul_ref.
gelu_tanh_and_mul = _op("gelu_tanh_and_mul", gelu_tanh_and_mul_ref, _gelu_tanh_and_mul_fake, cuda_stand_in=True)
# x [..., K], qweight uint8 [N, K/2], scales/offsets [N, K/G] (offsets may be None; or K-quant superblocks),
# group_size -> [..., N]; see int4_linear_ref. CPU kernels: AVX-512 VNNI, AVX-512, AVX2 or portable, picked at run
# time (torch.ops.tinychat.cpu_isa() says which); CUDA kernels (sm_80+): a GEMV for M <= 4 and a tensor-core GEMM
# above (csrc/cuda/int4_linear.cu).
int4_linear = _op("int4_linear", int4_linear_ref, _int4_linear_fake)
# x [..., K], qweight int8 [N, K], scales/offsets [N, K/G] (offsets may be None), group_size -> [..., N]; see
# int8_linear_ref. CPU kernels per
# instruction set as int4_linear; on CUDA the reference stands in (the CUDA backend keeps the output projection in
# half precision). int4_linear has no stand-in: a 4-bit model on CUDA needs the real kernel.
int8_linear = _op("int8_linear", int8_linear_ref, _int8_linear_fake, cuda_stand_in=True)


def cpu_decoder(tensors: list[Tensor], spec: list[int], eps: float, scale: float):
    """The whole decoder in one C++ call on the CPU (csrc/cpu/decode_step.h: the flat lists `tensors` and `spec`
    it is built from): a torch.classes.tinychat.CpuDecoder, whose forward(x, positions, cos_sin, last_only) runs the
    kernels above in Transformer.forward's order; None without the compiled extension."""
    return torch.classes.tinychat.CpuDecoder(tensors, spec, eps, scale) if EXTENSION_AVAILABLE else None
