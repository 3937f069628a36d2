"""Bit layouts of 4-bit weights: the AutoAWQ checkpoint formats, and the layout tinychat's int4 op consumes.

Every function takes or returns the plain quantization of a linear layer with weight [N, K] (N output channels,
K input channels) and group size G, as `tinychat.quant.quantize.quantize` makes it:

    q       uint8 [N, K]    integers 0..15
    scales  fp32  [N, K/G]
    zeros   fp32  [N, K/G]  integers 0..15;  w[n, k] ~= (q[n, k] - zeros[n, k // G]) * scales[n, k // G]

The functions below are the documentation of each layout: short, vectorized, no cleverness.

AutoAWQ "GEMM" (`version: "gemm"`, what tinychat writes; Hugging Face transformers and vLLM read it)
    qweight  int32 [K, N/8]    q transposed to [K, N]; int32 j of a row packs output channels 8j..8j+7, nibble i
                               (bits 4i..4i+3) holding channel 8j + AWQ_ORDER[i], AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
    qzeros   int32 [K/G, N/8]  the integer zeros transposed to [K/G, N], packed the same way
    scales   fp16  [K/G, N]

AutoAWQ "GEMV" (`version: "gemv"`, read only: repacked at load)
    qweight  int32 [N, K/8]    int32 j of a row packs input channels 8j..8j+7, nibble i holding channel 8j + i
    qzeros   int32 [N, Z]      int32 j packs the zeros of groups 8j..8j+7 (nibble i: group 8j + i); unused nibbles 0
    scales   fp16  [N, 8 Z]    columns past K/G are padding (zero)
    where Z = gemv_zeros_width(K, G) rounds ceil(K/G / 8) up to a multiple of 4 (G = 32), 2 (G = 64), 1 (G >= 128).

The int4 op layout (what `tinychat::int4_linear` consumes; checkpoints are repacked into it at load)
    qweight  uint8 [N, K/2]    each row in blocks of 32 input channels (16 bytes); byte j (0..15) of block b holds
                               channel 32b + j in its low nibble and channel 32b + 16 + j in its high nibble
    scales   fp32  [N, K/G]
    zeros    fp32  [N, K/G]    integer-valued
    K and G are multiples of 32. One 16-byte load gives a kernel 32 weights as two runs of 16 consecutive channels
    (a mask and a shift), which widen to SIMD lanes in order, with no shuffle (csrc/cpu/int4_linear.cpp).
    Scales and zeros stay fp32 whatever the activation dtype: the op does its math in fp32, and the fp16 scales of
    a checkpoint convert to fp32 exactly.
"""

from __future__ import annotations

import torch

from tinychat.errors import TinychatError

PACK = 8  # 4-bit values per int32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # GEMM: nibble i holds column 8j + AWQ_ORDER[i]
PLAIN_ORDER = tuple(range(PACK))  # GEMV: nibble i holds column 8j + i
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # [8] bit offset of nibble i


# ---- int32 nibble packing along the last dimension ----


def _pack_int32(values: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """values [R, C] (integers 0..15, C % 8 == 0) -> int32 [R, C/8]; nibble i of int32 j = values[:, 8j + order[i]]."""
    R, C = values.shape
    v = values.to(torch.int64).reshape(R, C // PACK, PACK)[..., list(order)]  # [R, C/8, 8] in nibble order
    packed = (v << _SHIFTS.to(v.device, torch.int64)).sum(-1)  # [R, C/8], 0 .. 2^32-1 (the nibbles never overlap)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # the same 32 bits as a signed int32
    return packed.to(torch.int32)


def _unpack_int32(packed: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """The inverse of _pack_int32: int32 [R, C/8] -> uint8 [R, C]."""
    R, W = packed.shape
    nibbles = (packed.to(torch.int32)[..., None] >> _SHIFTS.to(packed.device)) & 0xF  # [R, W, 8] in nibble order
    inverse = [order.index(c) for c in range(PACK)]  # column c of a block lives in nibble inverse[c]
    return nibbles[..., inverse].reshape(R, W * PACK).to(torch.uint8)


def _check_plain(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[int, int, int]:
    """Shapes of the plain quantization -> (N, K, K/G), with errors naming the mismatch."""
    if q.dim() != 2:
        raise TinychatError(f"q must be a 2-D [N, K] tensor, got shape {tuple(q.shape)}")
    N, K = q.shape
    if scales.dim() != 2 or scales.shape[0] != N or scales.shape != zeros.shape:
        raise TinychatError(
            f"scales and zeros must both be [N, K/G] = [{N}, K/G], got {tuple(scales.shape)} and {tuple(zeros.shape)}"
        )
    n_groups = scales.shape[1]
    if n_groups == 0 or K % n_groups:
        raise TinychatError(f"{n_groups} groups per row do not divide the K = {K} input channels")
    return N, K, n_groups


def _check_n(N: int, what: str) -> None:
    if N % PACK:
        raise TinychatError(
            f"{what}: the number of output channels N = {N} must be a multiple of 8 "
            f"(AutoAWQ packs 8 output channels into each int32)"
        )


# ---- AutoAWQ GEMM ----


def awq_gemm_shapes(N: int, K: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """Tensor suffix -> shape of one AutoAWQ GEMM linear with weight [N, K]."""
    return {"qweight": (K, N // PACK), "qzeros": (K // group_size, N // PACK), "scales": (K // group_size, N)}


def pack_awq_gemm(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain quantization -> AutoAWQ GEMM (qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales fp16 [K/G, N])."""
    N, _, _ = _check_plain(q, scales, zeros)
    _check_n(N, "pack_awq_gemm")
    qweight = _pack_int32(q.t(), AWQ_ORDER)  # [K, N/8]
    qzeros = _pack_int32(zeros.round().t(), AWQ_ORDER)  # [K/G, N/8]
    return qweight, qzeros, scales.t().to(torch.float16).contiguous()


def _check_packed_shapes(fn: str, expected: dict, qweight, qzeros, scales, group_size: int) -> None:
    for name, t in (("qzeros", qzeros), ("scales", scales)):
        if tuple(t.shape) != expected[name]:
            raise TinychatError(f"{fn}: {name} has shape {tuple(t.shape)}, expected {expected[name]} "
                                f"for qweight {tuple(qweight.shape)} and group size {group_size}")


def unpack_awq_gemm(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ GEMM -> plain quantization (q uint8 [N, K], scales fp32 [N, K/G], zeros fp32 [N, K/G])."""
    K, W = qweight.shape
    N = W * PACK
    expected = awq_gemm_shapes(N, K, group_size)
    _check_packed_shapes("unpack_awq_gemm", expected, qweight, qzeros, scales, group_size)
    q = _unpack_int32(qweight, AWQ_ORDER).t().contiguous()  # [N, K]
    zeros = _unpack_int32(qzeros, AWQ_ORDER).t().float().contiguous()  # [N, K/G]
    return q, scales.t().float().contiguous(), zeros


# ---- AutoAWQ GEMV ----


def gemv_zeros_width(K: int, group_size: int) -> int:
    """Columns of a GEMV qzeros (AutoAWQ's calculate_zeros_width): ceil(K/G / 8), rounded up to a multiple of
    4 for G = 32, 2 for G = 64, 1 for G >= 128 (AutoAWQ supports no other group size for GEMV)."""
    if group_size >= 128:
        multiple = 1
    elif group_size in (32, 64):
        multiple = 128 // group_size
    else:
        raise TinychatError(f"AutoAWQ GEMV supports group sizes 32, 64 and >= 128, not {group_size}")
    width = -(-(K // group_size) // PACK)
    return -(-width // multiple) * multiple


def awq_gemv_shapes(N: int, K: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """Tensor suffix -> shape of one AutoAWQ GEMV linear with weight [N, K]."""
    Z = gemv_zeros_width(K, group_size)
    return {"qweight": (N, K // PACK), "qzeros": (N, Z), "scales": (N, Z * PACK)}


def pack_awq_gemv(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain quantization -> AutoAWQ GEMV (qweight int32 [N, K/8], qzeros int32 [N, Z], scales fp16 [N, 8 Z])."""
    N, K, n_groups = _check_plain(q, scales, zeros)
    _check_n(N, "pack_awq_gemv")
    Z = gemv_zeros_width(K, K // n_groups)
    padded_zeros = torch.zeros(N, Z * PACK, dtype=torch.int64)
    padded_zeros[:, :n_groups] = zeros.round().to(torch.int64)
    padded_scales = torch.zeros(N, Z * PACK, dtype=torch.float16)
    padded_scales[:, :n_groups] = scales.to(torch.float16)
    return _pack_int32(q, PLAIN_ORDER), _pack_int32(padded_zeros, PLAIN_ORDER), padded_scales


def unpack_awq_gemv(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ GEMV -> plain quantization (q uint8 [N, K], scales fp32 [N, K/G], zeros fp32 [N, K/G])."""
    N, W = qweight.shape
    K = W * PACK
    expected = awq_gemv_shapes(N, K, group_size)
    _check_packed_shapes("unpack_awq_gemv", expected, qweight, qzeros, scales, group_size)
    n_groups = K // group_size
    q = _unpack_int32(qweight, PLAIN_ORDER)  # [N, K]
    zeros = _unpack_int32(qzeros, PLAIN_ORDER)[:, :n_groups].float().contiguous()
    return q, scales[:, :n_groups].float().contiguous(), zeros


# ---- the int4 op layout ----

OP_BLOCK = 32  # input channels per 16 bytes of the op layout


def pack_int4_op(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] (0..15, K % 32 == 0) -> uint8 [N, K/2] in the op layout (blocks of 32 channels: byte j of
    block b = channel 32b + j | channel 32b + 16 + j << 4)."""
    if q.dim() != 2 or q.shape[1] % OP_BLOCK:
        raise TinychatError(f"pack_int4_op: q must be [N, K] with K a multiple of {OP_BLOCK}, got shape "
                            f"{tuple(q.shape)}")
    blocks = q.to(torch.uint8).reshape(q.shape[0], -1, 2, OP_BLOCK // 2)  # [N, K/32, 2, 16]: halves of each block
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(q.shape[0], -1).contiguous()


def unpack_int4_op(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] in the op layout -> q uint8 [N, K] (the inverse of pack_int4_op)."""
    blocks = qweight.reshape(qweight.shape[0], -1, OP_BLOCK // 2)  # [N, K/32, 16]
    return torch.stack((blocks & 0xF, blocks >> 4), dim=2).reshape(qweight.shape[0], -1)


def to_int4_op(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain quantization -> the three tensors of the int4_linear op (qweight uint8 [N, K/2], fp32 scales, zeros)."""
    _check_plain(q, scales, zeros)
    return pack_int4_op(q), scales.float().contiguous(), zeros.float().contiguous()
