"""AutoAWQ's checkpoint formats of 4-bit linears: their bit layouts, and what a config.json must say to use them.

Every function takes or returns the plain quantization of a linear layer with weight [N, K] (N output channels,
K input channels) and group size G (tinychat/int4_layout.py), as `tinychat.quant.quantize.quantize` makes it:

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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tinychat.config import ModelConfig
from tinychat.errors import ModelLoadError, TinychatError
from tinychat.int4_layout import check_plain
from tinychat.io.names import hf_linear_modules

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
    N, _, _ = check_plain(q, scales, zeros)
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
    N, K, n_groups = check_plain(q, scales, zeros)
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


# ---- config.json's quantization_config ----

AWQ_VERSIONS = ("gemm", "gemv")


@dataclass(frozen=True)
class AwqFormat:
    """The AutoAWQ layout of a quantized checkpoint's linears: 4-bit, zero point, GEMM or GEMV packing."""

    version: str  # "gemm" or "gemv"
    group_size: int

    def shapes(self, N: int, K: int) -> dict[str, tuple[int, ...]]:
        """Tensor suffix (qweight, qzeros, scales) -> shape, for a linear with weight [N, K]."""
        return (awq_gemm_shapes if self.version == "gemm" else awq_gemv_shapes)(N, K, self.group_size)

    def unpack(self, qweight, qzeros, scales) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> the plain quantization (q uint8 [N, K], scales fp32 [N, K/G], zeros fp32 [N, K/G])."""
        return (unpack_awq_gemm if self.version == "gemm" else unpack_awq_gemv)(qweight, qzeros, scales,
                                                                                self.group_size)


def awq_quantization_config(group_size: int) -> dict:
    """config.json's `quantization_config` for an AutoAWQ GEMM checkpoint (zeros are always stored explicitly, so
    symmetric quantization is written as zero_point true too)."""
    return {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group_size,
            "zero_point": True, "modules_to_not_convert": None}


def awq_format_from_hf(quant: object, cfg: ModelConfig, source: str) -> AwqFormat:
    """config.json's `quantization_config` -> AwqFormat; ModelLoadError naming `source` for anything tinychat cannot
    run. Reads what Hugging Face transformers (AwqConfig) and AutoAWQ write: quant_method, bits (or w_bit),
    group_size (or q_group_size), zero_point, version (or format), modules_to_not_convert."""
    if not isinstance(quant, Mapping):
        raise ModelLoadError(f"{source}: quantization_config must be an object, found {type(quant).__name__}")
    method = str(quant.get("quant_method", "")).lower()
    if method != "awq":
        raise ModelLoadError(f"{source}: quantization method {quant.get('quant_method')!r} is not supported "
                             "(tinychat loads AWQ checkpoints: quant_method 'awq')")
    for new_name, old_name in (("bits", "w_bit"), ("group_size", "q_group_size")):  # transformers' and AutoAWQ's
        if new_name in quant and old_name in quant and quant[new_name] != quant[old_name]:
            raise ModelLoadError(f"{source}: quantization_config says {new_name}={quant[new_name]!r} and "
                                 f"{old_name}={quant[old_name]!r}; the two names of one setting must agree")
    bits = quant.get("bits", quant.get("w_bit"))
    if bits != 4:
        raise ModelLoadError(f"{source}: AWQ checkpoints with bits={bits!r} are not supported (only 4-bit)")
    if quant.get("zero_point", True) is not True:
        raise ModelLoadError(f"{source}: AWQ without zero point (zero_point={quant.get('zero_point')!r}) "
                             "is not supported")
    version = str(quant.get("version") or quant.get("format") or "gemm").lower()
    if version not in AWQ_VERSIONS:
        raise ModelLoadError(f"{source}: unknown AWQ version {version!r}; supported: {', '.join(AWQ_VERSIONS)}")
    group_size = quant.get("group_size", quant.get("q_group_size"))
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ModelLoadError(f"{source}: AWQ group_size must be a positive integer, got {group_size!r}")
    if version == "gemv" and not (group_size in (32, 64) or group_size >= 128):
        raise ModelLoadError(f"{source}: AWQ gemv checkpoints have group size 32, 64 or >= 128, not {group_size}")
    skipped = quant.get("modules_to_not_convert") or []
    linears = hf_linear_modules(cfg)
    kept_float = [m for m in skipped if any(str(m) in name for name, _ in linears)]
    if kept_float:
        raise ModelLoadError(f"{source}: modules_to_not_convert {kept_float} leaves decoder linears unquantized; "
                             "tinychat loads AWQ checkpoints whose decoder linears are all quantized")
    for name, shape in linears:
        if shape[1] % group_size or shape[0] % PACK:
            raise ModelLoadError(f"{source}: {name} with weight {shape} cannot be AWQ-packed with group size "
                                 f"{group_size} (needs in_features % group_size == 0, out_features % 8 == 0)")
    return AwqFormat(version, group_size)
