"""GGUF's quantized blocks as tinychat's group ops, exactly: no dequantization, no requantization.

Every block type below is a group form W = q * s + m (ggml-quants.c) that one of the two ops runs as stored:

    type   weights/block  bytes  op    codes q                 G    scales, offsets
    Q4_0   32             18     int4  0..15                   32   fp16 d, none (m = -8 d)
    Q4_1   32             20     int4  0..15                   32   fp16 d, fp16 m
    Q4_K   256            144    int4  0..15 (nibbles repacked) 32   K-quant superblocks: s = d * sc, m = -(dmin * mn)
    Q8_0   32             34     int8  -128..127               32   fp16 d, none
    Q5_0   32             22     int8  -16..15                 32   fp16 d, none
    Q5_1   32             24     int8  0..31                   32   fp16 d, fp16 m
    Q5_K   256            176    int8  0..31                   32   K-quant superblocks, as Q4_K
    Q6_K   256            210    int8  -32..31                 16   fp32 d * sc (8-bit sc), none

K-quant superblocks keep d and dmin (fp16) and the 6-bit sc and mn of each superblock of 256 weights as uint8
[N, K/256, 20] (csrc/common/kquant.h; 148 bytes per 256 4-bit weights against Q4_K's 144); the ops form
s = d * sc and m = -(dmin * mn) per group. Those fp32 products are exact (11 + 8 significant bits), and q * s + m
rounds once, as `gguf.quants.dequantize` does: the dequantized weights equal gguf's value for value (a zero weight
may differ in sign: (q - 8) * d with a negative d gives -0, q * d + m gives +0; tests/test_gguf_blocks.py).
ggml's Q4_0 / Q4_1 nibble order within a 32-weight block (byte j: weights j and j + 16) is the int4 op layout's, so
those blocks' bytes are used as they are; Q4_K's 64-weight halves (byte j: weights j and j + 32) are repacked.
Bytes each op reads per weight, next to the block's own: `bytes_per_weight` and the README's table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from tinychat import ops
from tinychat.int4_layout import pack_int4_op, unpack_int4_op
from tinychat.linear import Int8Linear, WQLinear

T = GGMLQuantizationType

# Block types with an exact group form, and the op each runs on.
NATIVE_BITS: dict[GGMLQuantizationType, int] = {
    T.Q4_0: 4, T.Q4_1: 4, T.Q4_K: 4, T.Q8_0: 8, T.Q5_0: 8, T.Q5_1: 8, T.Q5_K: 8, T.Q6_K: 8,
}


@dataclass(frozen=True)
class GroupWeights:
    """A weight matrix [N, K] as W = q * s + m per group of G input channels along K.

    bits 4: codes uint8 [N, K/2] in the int4 op layout (tinychat/int4_layout.py); bits 8: codes int8 [N, K].
    scales [N, K/G] fp16 or fp32; offsets of the same shape and dtype, or None (m = -8 s for bits 4, 0 for bits 8).
    """

    bits: int
    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * (2 if self.bits == 4 else 1)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.offsets) if t is not None)

    def form(self) -> tuple:
        """What must agree for two matrices to be stacked into one op: bits, G, the parameters' dtype, offsets."""
        return self.bits, self.group_size, self.scales.dtype, self.offsets is None

    def rows(self, index: torch.Tensor) -> GroupWeights:
        """The rows `index` (int64 [N']) in that order: a row permutation touches no value."""
        return GroupWeights(self.bits, self.codes[index], self.scales[index],
                            None if self.offsets is None else self.offsets[index], self.group_size)

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K], as the ops compute W (ops.group_weights)."""
        q = unpack_int4_op(self.codes) if self.bits == 4 else self.codes
        return ops.group_weights(q, self.scales, self.offsets, self.group_size, -8.0 if self.bits == 4 else 0.0)


def stack_rows(parts: list[GroupWeights]) -> GroupWeights:
    """Matrices of one form (GroupWeights.form) stacked along N (a fused q|k|v or gate|up projection)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    assert all(p.form() == first.form() for p in parts), [p.form() for p in parts]
    return GroupWeights(first.bits, torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                        None if first.offsets is None else torch.cat([p.offsets for p in parts]), first.group_size)


def group_linear(gw: GroupWeights, bias: torch.Tensor | None) -> nn.Module:
    """The linear that runs `gw` as it is: a WQLinear (bits 4) or an Int8Linear (bits 8)."""
    cls = WQLinear if gw.bits == 4 else Int8Linear
    return cls.from_groups(gw.codes, gw.scales, gw.offsets, gw.group_size, bias)


def block_weights(qtype: GGMLQuantizationType) -> int:
    """Weights per block of `qtype`."""
    return GGML_QUANT_SIZES[qtype][0]


def _f16(raw: np.ndarray) -> torch.Tensor:
    """[..., 2] uint8 -> fp16 [...] (a copy: never a view of the file's mapping)."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].copy())


def _nibbles(raw: np.ndarray) -> np.ndarray:
    """uint8 [..., n] bytes whose low nibbles are weights 0..n-1 and high nibbles n..2n-1 -> [..., 2 n]."""
    return np.concatenate([raw & 0x0F, raw >> 4], axis=-1)


def _k_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 bytes of 6-bit sub-block scales and mins of Q4_K / Q5_K [..., 12] -> (sc, mn) uint8 [..., 8]."""
    d, m, md = raw[..., 0:4], raw[..., 4:8], raw[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_params(blocks: np.ndarray) -> torch.Tensor:
    """Q4_K / Q5_K superblocks [N, B, bytes] -> their K-quant group parameters uint8 [N, B, 20]: d and dmin as
    stored, then the 8 scales and 8 mins unpacked from 6 bits (csrc/common/kquant.h)."""
    sc, mn = _k_scales(blocks[..., 4:16])  # [N, B, 8]
    return torch.from_numpy(np.concatenate([blocks[..., 0:4], sc, mn], axis=-1))


def decode(raw: np.ndarray, qtype: GGMLQuantizationType, N: int, K: int) -> GroupWeights:
    """The bytes of an [N, K] tensor of block type `qtype` (uint8, N * K / block weights * block bytes) -> its group
    form. The caller has checked that K is a whole number of blocks and that the bytes are all there."""
    per_block, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = np.asarray(raw, dtype=np.uint8).reshape(N, K // per_block, block_bytes)  # [N, B, bytes]
    if qtype in (T.Q4_0, T.Q4_1):
        head = 2 if qtype == T.Q4_0 else 4
        codes = torch.from_numpy(blocks[..., head:].reshape(N, K // 2).copy())  # ggml's order is the op layout's
        scales = _f16(blocks[..., 0:2])
        offsets = _f16(blocks[..., 2:4]) if qtype == T.Q4_1 else None
        return GroupWeights(4, codes, scales, offsets, 32)
    if qtype == T.Q8_0:
        codes = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(N, K))
        return GroupWeights(8, codes, _f16(blocks[..., 0:2]), None, 32)
    if qtype in (T.Q5_0, T.Q5_1):
        head = 2 if qtype == T.Q5_0 else 4
        qh = blocks[..., head:head + 4].copy().view(np.uint32)  # [N, B, 1]: bit j is the 5th bit of weight j
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # [N, B, 32]
        q = (_nibbles(blocks[..., head + 4:]) | (high << 4)).astype(np.int16)  # [N, B, 32] 0..31
        if qtype == T.Q5_0:
            q -= 16
        codes = torch.from_numpy(q.astype(np.int8).reshape(N, K))
        offsets = _f16(blocks[..., 2:4]) if qtype == T.Q5_1 else None
        return GroupWeights(8, codes, _f16(blocks[..., 0:2]), offsets, 32)
    if qtype in (T.Q4_K, T.Q5_K):
        scales, offsets = _k_params(blocks), None
        qs = blocks[..., -128:].reshape(N, -1, 4, 32)  # [N, B, 4, 32]: quarter j holds weights 64j .. 64j + 63
        q = _nibbles(qs).reshape(N, -1, 8, 32)  # [N, B, 8, 32]: sub-block i = weights 32i .. 32i + 31
        if qtype == T.Q4_K:
            codes = pack_int4_op(torch.from_numpy(q.reshape(N, K)))
            return GroupWeights(4, codes, scales, offsets, 32)
        qh = blocks[..., 16:48][:, :, None, :]  # [N, B, 1, 32]: bit i of byte j is the 5th bit of weight 32i + j
        high = (qh >> np.arange(8, dtype=np.uint8)[None, None, :, None]) & 1  # [N, B, 8, 32]
        codes = torch.from_numpy((q | (high << 4)).astype(np.int8).reshape(N, K))
        return GroupWeights(8, codes, scales, offsets, 32)
    if qtype == T.Q6_K:
        ql = blocks[..., 0:128].reshape(N, -1, 2, 64)  # [N, B, 2, 64]: half h holds weights 128h .. 128h + 127
        low = _nibbles(ql).reshape(N, -1, 2, 4, 32)  # [N, B, 2, 4, 32]: quarter r = weights 128h + 32r + j
        qh = blocks[..., 128:192].reshape(N, -1, 2, 1, 32)  # bits 2r, 2r + 1 of byte j: weight 128h + 32r + j
        high = (qh >> (2 * np.arange(4, dtype=np.uint8))[None, None, None, :, None]) & 3
        q = (low | (high << 4)).astype(np.int16) - 32  # [N, B, 2, 4, 32] -32..31
        sc = blocks[..., 192:208].copy().view(np.int8).astype(np.float32)  # [N, B, 16]
        d = _f16(blocks[..., 208:210].reshape(N, -1, 1, 2)).float()  # [N, B, 1]
        scales = (d * torch.from_numpy(sc)).reshape(N, -1)  # [N, K/16]
        return GroupWeights(8, torch.from_numpy(q.astype(np.int8).reshape(N, K)), scales, None, 16)
    raise ValueError(f"no group form for {qtype!r}")


def bytes_per_weight(qtype: GGMLQuantizationType) -> tuple[float, float]:
    """(bytes per weight of the GGUF block, bytes per weight the op reads: codes, scales and offsets) of a native
    type."""
    per_block, block_bytes = GGML_QUANT_SIZES[qtype]
    return block_bytes / per_block, decode(np.zeros(block_bytes, np.uint8), qtype, 1, per_block).nbytes / per_block
