"""The layout of 4-bit weights that tinychat's int4 op consumes: the Python twin of csrc/common/int4_layout.h.

Quantizers make, and checkpoint formats unpack to, the plain quantization of a linear layer with weight [N, K]
(N output channels, K input channels) and group size G:

    q       uint8 [N, K]    integers 0..15
    scales  fp32  [N, K/G]
    zeros   fp32  [N, K/G]  integers 0..15;  w[n, k] ~= (q[n, k] - zeros[n, k // G]) * scales[n, k // G]

The op layout (what `tinychat::int4_linear` consumes; checkpoints are repacked into it at load)
    qweight  uint8 [N, K/2]      each row in blocks of 32 input channels (16 bytes); byte j (0..15) of block b holds
                                 channel 32b + j in its low nibble and channel 32b + 16 + j in its high nibble
    scales   fp32/fp16 [N, K/G]
    offsets  like scales, or None;  W[n, k] = q[n, k] * s + m (s, m of group (n, k // G); m = -8 s without offsets)
    K and G are multiples of 32. One 16-byte load gives a kernel 32 weights as two runs of 16 consecutive channels
    (a mask and a shift), which widen to SIMD lanes in order, with no shuffle (csrc/cpu/int4_linear.cpp).
    Scales and offsets keep the dtype they are stored in whatever the activation dtype: the op widens them to fp32
    (exactly) and does its math in fp32. The plain quantization maps to it with awq_group_params (m = -z * s);
    GGUF's Q4_0 is its fp16 scales without offsets, Q4_1 its fp16 scales and mins, bit for bit: ggml's nibble order
    within a 32-weight block is this layout's.
"""

from __future__ import annotations

import torch

from tinychat.errors import TinychatError


def check_plain(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[int, int, int]:
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


def awq_group_params(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain quantization's scales and integer zeros [N, K/G] -> the op's fp32 scales and offsets m = -(s * z):
    W = (q - z) * s = q * s + m, the product s * z rounded once in fp32, as the kernels have always formed it."""
    s = scales.float().contiguous()
    return s, -(s * zeros.float())


def to_int4_op(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain quantization -> the tensors of the int4_linear op: qweight uint8 [N, K/2], fp32 scales and offsets."""
    check_plain(q, scales, zeros)
    return (pack_int4_op(q), *awq_group_params(scales, zeros))
