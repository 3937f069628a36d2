"""The 4-bit layouts of tinychat/io/awq_format.py and tinychat/int4_layout.py against packers and unpackers written
here, from the format descriptions alone (plain bit shifts in numpy and Python), not from those modules."""

import numpy as np
import pytest
import torch

from tinychat import int4_layout
from tinychat.errors import TinychatError
from tinychat.io import awq_format
from tinychat.quant.quantize import QuantConfig, quantize

GEMM_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ GEMM: nibble i of an int32 holds column 8j + GEMM_ORDER[i]


def plain_quant(N, K, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    scales = torch.rand(N, K // G, generator=g) * 0.1 + 1e-3
    zeros = torch.randint(0, 16, (N, K // G), generator=g).float()
    return q, scales, zeros


# ---- independent decoders and encoders ----


def nibbles_of(words: torch.Tensor, order) -> np.ndarray:
    """int32 [R, W] -> [R, 8 W]: column 8j + order[i] = bits 4i..4i+3 of word j."""
    w = words.numpy().view(np.uint32)
    out = np.zeros((w.shape[0], w.shape[1] * 8), dtype=np.int64)
    for i in range(8):
        out[:, order[i]::8] = (w >> np.uint32(4 * i)) & np.uint32(0xF)
    return out


def gemv_pack_like_autoawq(q, scales, zeros, G):
    """AutoAWQ's WQLinear_GEMV.from_linear packing, restated with Python ints: qweight [N, K/8] nibble i = k 8j+i;
    qzeros [N, Z] nibble i = group 8j+i; scales padded to [N, 8 Z]; Z = ceil(ceil(K/G / 8) / m) * m,
    m = 1 (G >= 128), 2 (G = 64), 4 (G = 32)."""
    N, K = q.shape
    n_groups = K // G
    m = 1 if G >= 128 else {64: 2, 32: 4}[G]
    words = (n_groups + 7) // 8
    Z = (words + m - 1) // m * m
    qweight = np.zeros((N, K // 8), dtype=np.uint32)
    qzeros = np.zeros((N, Z), dtype=np.uint32)
    for n in range(N):
        for k in range(K):
            qweight[n, k // 8] |= int(q[n, k]) << (4 * (k % 8))
        for g in range(n_groups):
            qzeros[n, g // 8] |= int(zeros[n, g]) << (4 * (g % 8))
    padded = torch.zeros(N, Z * 8, dtype=torch.float16)
    padded[:, :n_groups] = scales.half()
    return torch.from_numpy(qweight.view(np.int32)), torch.from_numpy(qzeros.view(np.int32)), padded


# ---- AutoAWQ GEMM ----


def test_gemm_known_words():
    # one input channel, 8 output channels with q[n] = n: nibble i holds channel GEMM_ORDER[i]
    q = torch.arange(8, dtype=torch.uint8)[:, None]  # [8, 1]
    qweight, qzeros, scales = awq_format.pack_awq_gemm(q, torch.ones(8, 1), torch.full((8, 1), 15.0))
    assert qweight.dtype == torch.int32 and qweight.shape == (1, 1)
    assert qweight.item() == 0x75316420
    assert qzeros.numpy().view(np.uint32).item() == 0xFFFFFFFF  # the sign bit set: a negative int32
    assert scales.dtype == torch.float16 and scales.shape == (1, 8)
    q = 15 - q  # channel 7 (nibble 7) = 8: sign bit set
    packed = awq_format.pack_awq_gemm(q, torch.ones(8, 1), torch.zeros(8, 1))[0]
    assert packed.numpy().view(np.uint32).item() == 0x8ACE9BDF


@pytest.mark.parametrize("N,K,G", [(8, 32, 32), (24, 192, 64), (200, 576, 64), (64, 256, 128)])
def test_gemm_round_trip(N, K, G):
    q, scales, zeros = plain_quant(N, K, G)
    qweight, qzeros, scales16 = awq_format.pack_awq_gemm(q, scales, zeros)
    assert qweight.shape == (K, N // 8) and qzeros.shape == (K // G, N // 8) and scales16.shape == (K // G, N)
    assert (qweight.dtype, qzeros.dtype, scales16.dtype) == (torch.int32, torch.int32, torch.float16)
    assert awq_format.awq_gemm_shapes(N, K, G) == {"qweight": (K, N // 8), "qzeros": (K // G, N // 8),
                                             "scales": (K // G, N)}
    # the bits, decoded independently
    assert np.array_equal(nibbles_of(qweight, GEMM_ORDER), q.t().numpy())
    assert np.array_equal(nibbles_of(qzeros, GEMM_ORDER), zeros.t().numpy())
    assert torch.equal(scales16, scales.t().half())
    # and awq_format.py's own unpacker
    q2, s2, z2 = awq_format.unpack_awq_gemm(qweight, qzeros, scales16, G)
    assert torch.equal(q2, q) and torch.equal(z2, zeros) and torch.equal(s2, scales.half().float())
    assert (q2.dtype, s2.dtype, z2.dtype) == (torch.uint8, torch.float32, torch.float32)


def test_gemm_from_quantize():
    w = torch.randn(16, 128)
    q, scales, zeros = quantize(w, QuantConfig(4, 64))
    q2, s2, z2 = awq_format.unpack_awq_gemm(*awq_format.pack_awq_gemm(q, scales, zeros), 64)
    assert torch.equal(q2, q) and torch.equal(z2, zeros)


def test_gemm_rejects_n_not_multiple_of_8():
    q, scales, zeros = plain_quant(12, 64, 32)
    with pytest.raises(TinychatError, match=r"N = 12 must be a multiple of 8"):
        awq_format.pack_awq_gemm(q, scales, zeros)


def test_gemm_unpack_shape_mismatch():
    qweight, qzeros, scales = awq_format.pack_awq_gemm(*plain_quant(16, 64, 32))
    with pytest.raises(TinychatError, match=r"qzeros has shape \(2, 2\), expected \(1, 2\)"):
        awq_format.unpack_awq_gemm(qweight, qzeros, scales, 64)


# ---- AutoAWQ GEMV ----


@pytest.mark.parametrize("K,G,width", [(4096, 128, 4), (4096, 64, 8), (4096, 32, 16), (576, 64, 2), (192, 32, 4),
                                       (256, 256, 1)])
def test_gemv_zeros_width(K, G, width):
    assert awq_format.gemv_zeros_width(K, G) == width
    assert awq_format.awq_gemv_shapes(8, K, G) == {"qweight": (8, K // 8), "qzeros": (8, width),
                                                   "scales": (8, 8 * width)}


def test_gemv_unsupported_group_size():
    with pytest.raises(TinychatError, match=r"group sizes 32, 64 and >= 128, not 16"):
        awq_format.gemv_zeros_width(64, 16)


@pytest.mark.parametrize("N,K,G", [(8, 64, 32), (24, 192, 64), (16, 576, 64), (8, 1024, 128)])
def test_gemv_unpack_against_autoawq_packing(N, K, G):
    q, scales, zeros = plain_quant(N, K, G)
    qweight, qzeros, scales16 = gemv_pack_like_autoawq(q, scales, zeros, G)
    q2, s2, z2 = awq_format.unpack_awq_gemv(qweight, qzeros, scales16, G)
    assert torch.equal(q2, q) and torch.equal(z2, zeros) and torch.equal(s2, scales.half().float())
    # awq_format.py's GEMV packer writes the same bits
    ours = awq_format.pack_awq_gemv(q, scales, zeros)
    assert all(torch.equal(a, b) for a, b in zip(ours, (qweight, qzeros, scales16)))


# ---- the int4 op layout ----


@pytest.mark.parametrize("N,K", [(1, 32), (8, 64), (200, 576)])
def test_int4_op_layout(N, K):
    q = plain_quant(N, K, 32)[0]
    packed = int4_layout.pack_int4_op(q)
    assert packed.dtype == torch.uint8 and packed.shape == (N, K // 2)
    b = packed.numpy().astype(np.int64)
    decoded = np.zeros((N, K), dtype=np.int64)
    for n in range(N):  # byte 16 blk + j: low nibble = channel 32 blk + j, high nibble = channel 32 blk + 16 + j
        for i in range(K // 2):
            blk, j = divmod(i, 16)
            decoded[n, 32 * blk + j] = b[n, i] & 0xF
            decoded[n, 32 * blk + 16 + j] = b[n, i] >> 4
    assert np.array_equal(decoded, q.numpy())
    assert torch.equal(int4_layout.unpack_int4_op(packed), q)


@pytest.mark.parametrize("K", [2, 48, 100])
def test_int4_op_layout_needs_whole_blocks(K):
    with pytest.raises(TinychatError, match=r"multiple of 32"):
        int4_layout.pack_int4_op(torch.zeros(4, K, dtype=torch.uint8))


def test_to_int4_op_from_gemm():
    q, scales, zeros = plain_quant(16, 128, 32)
    qweight, s, m = int4_layout.to_int4_op(*awq_format.unpack_awq_gemm(*awq_format.pack_awq_gemm(q, scales, zeros), 32))
    assert torch.equal(int4_layout.unpack_int4_op(qweight), q)
    assert s.dtype == m.dtype == torch.float32 and torch.equal(m, -(s * zeros.float()))
