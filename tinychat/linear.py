"""The model's quantized linear layers: WQLinear (4-bit weights, `tinychat::int4_linear`), Int8Linear (8-bit
weights, `tinychat::int8_linear`), RowStack (linears side by side), and GroupEmbedding (an embedding that looks its
rows up in one of them).

WQLinear holds the int4 op layout of tinychat/int4_layout.py (qweight uint8 [N, K/2] in blocks of 32 input channels,
scales and offsets [N, K/G]: W = q * s + m per group) and an optional bias. `Transformer.swap_linears` puts them in
the decoder's place.
"""

from __future__ import annotations

import torch
from torch import nn

from tinychat import ops
from tinychat.ops import KQUANT_SUPER_BYTES
from tinychat.errors import TinychatError
from tinychat.int4_layout import OP_BLOCK, awq_group_params, check_plain, pack_int4_op, unpack_int4_op


class _GroupParamBuffers(nn.Module):
    """A module whose buffers named in PARAM_BUFFERS keep their dtype: device moves apply to every buffer, dtype casts
    (`.to(dtype)`, `.half()`) leave these alone, since they hold a format's scales and offsets exactly as stored
    (fp32 or fp16) and the ops compute in fp32 from them."""

    PARAM_BUFFERS: tuple[str, ...] = ()
    BITS = 0  # the codes' width: 4 (int4_linear) or 8 (int8_linear)

    def op_form(self) -> tuple[list[int], list[torch.Tensor]]:
        """How the one-call decoder (tinychat/model.py) runs this linear: [bits, group size, has offsets, has bias]
        and the tensors qweight, scales, then offsets and bias where present."""
        extra = [t for t in (self.offsets, self.bias) if t is not None]
        return ([self.BITS, self.group_size, int(self.offsets is not None), int(self.bias is not None)],
                [self.qweight, self.scales, *extra])

    def weight_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (int64 [R]) of W, dequantized as the op computes them -> fp32 [R, K] (4-bit codes are
        unpacked from the int4 op layout, and m = -8 s without offsets; 8-bit: m = 0)."""
        codes = self.qweight[index]
        four = self.BITS == 4
        return ops.group_weights(unpack_int4_op(codes) if four else codes, self.scales[index],
                                 None if self.offsets is None else self.offsets[index], self.group_size,
                                 -8.0 if four else 0.0)

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name) for name in self.PARAM_BUFFERS if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, t in kept.items():
            setattr(self, name, t.to(getattr(self, name).device))
        return self


def _check_group_params(cls: str, N: int, K: int, group_size: int, scales: torch.Tensor,
                        offsets: torch.Tensor | None) -> None:
    if K % group_size:
        raise TinychatError(f"{cls}: group size {group_size} does not divide in_features {K}")
    if scales.dtype == torch.uint8:  # K-quant superblocks (csrc/common/kquant.h)
        shape = (N, K // 256, KQUANT_SUPER_BYTES)
        if group_size != 32 or K % 256 or tuple(scales.shape) != shape or offsets is not None:
            raise TinychatError(f"{cls}: uint8 scales (K-quant superblocks) must be [{N}, {K // 256}, "
                                f"{KQUANT_SUPER_BYTES}] with group size 32, K a multiple of 256 and no offsets; got "
                                f"{tuple(scales.shape)}, group size {group_size}, K {K}")
        return
    if tuple(scales.shape) != (N, K // group_size):
        raise TinychatError(f"{cls}: scales have shape {tuple(scales.shape)}, expected {(N, K // group_size)} for "
                            f"[{N}, {K}] weights in groups of {group_size}")
    if scales.dtype not in (torch.float32, torch.float16):
        raise TinychatError(f"{cls}: scales must be float32 or float16, got {scales.dtype}")
    if offsets is not None and (offsets.shape != scales.shape or offsets.dtype != scales.dtype):
        raise TinychatError(f"{cls}: offsets ({offsets.dtype} {tuple(offsets.shape)}) must have the scales' dtype and "
                            f"shape ({scales.dtype} {tuple(scales.shape)})")


class WQLinear(_GroupParamBuffers):
    """y = x @ W.T (+ bias) with W [out_features, in_features] stored as 4-bit integers in groups of G input channels,
    W = q * s + m per group (`tinychat::int4_linear`).

    Buffers: qweight uint8 [N, K/2] (the int4 op layout), scales [N, K/G] fp32 or fp16, offsets of the scales' shape
    and dtype or None (then m = -8 s: ggml's Q4_0), bias [N] (or None); or K-quant superblocks (uint8 scales
    [N, K/256, 20] that carry the offsets, tinychat/ops.py kquant_group_params). An AWQ quantization's integer zero
    z is the offset -z * s (fp32); GGUF Q4_0 / Q4_1 blocks are their fp16 scale (and min) as stored.
    Moving the module (`.to(device)`) moves every buffer; casting it (`.to(dtype)`, `.half()`) casts only the bias.
    """

    PARAM_BUFFERS = ("scales", "offsets")
    BITS = 4

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 device=None, dtype: torch.dtype = torch.float32, params_dtype: torch.dtype = torch.float32,
                 offsets: bool = True):
        super().__init__()
        if in_features % group_size or group_size % OP_BLOCK:
            raise TinychatError(f"WQLinear: group size {group_size} must divide in_features {in_features} and be a "
                                f"multiple of {OP_BLOCK}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=params_dtype, device=device))
        self.register_buffer("offsets", torch.zeros(out_features, n_groups, dtype=params_dtype, device=device)
                             if offsets else None)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_groups(cls, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                    group_size: int, bias: torch.Tensor | None = None) -> WQLinear:
        """From 4-bit codes in the op layout, qweight uint8 [N, K/2] (pack_int4_op), with W = q * s + m per group:
        scales [N, K/G] fp32 or fp16, offsets of the same dtype and shape or None (m = -8 s). Stored as given:
        nothing is rounded."""
        N, K = qweight.shape[0], qweight.shape[1] * 2
        _check_group_params("WQLinear", N, K, group_size, scales, offsets)
        layer = cls(K, N, group_size, bias=bias is not None, device="meta", params_dtype=scales.dtype,
                    offsets=offsets is not None)
        layer.qweight = qweight.contiguous()
        layer.scales = scales.contiguous()
        layer.offsets = None if offsets is None else offsets.contiguous()
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                       bias: torch.Tensor | None = None) -> WQLinear:
        """From the plain (AWQ) quantization: q uint8 [N, K] of 4-bit values, scales/zeros [N, K/G] with integer
        zeros (tinychat/int4_layout.py); the offsets are -z * s in fp32 (exact as the kernels used it)."""
        check_plain(q, scales, zeros)
        return cls.from_groups(pack_int4_op(q), *awq_group_params(scales, zeros), group_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.int4_linear(x, self.qweight, self.scales, self.offsets, self.group_size)  # [..., N]
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"params={str(self.scales.dtype).removeprefix('torch.')}, offsets={self.offsets is not None}, "
                f"bias={self.bias is not None}")


class Int8Linear(_GroupParamBuffers):
    """y = x @ W.T with W [out_features, in_features] stored as int8 codes in groups of G input channels,
    W = q * s + m per group, run by the `tinychat::int8_linear` op.

    Buffers: qweight int8 [N, K], scales [N, K/G] fp32 or fp16 (or K-quant superblocks, uint8 [N, K/256, 20]),
    offsets of the scales' shape and dtype or None (m = 0), bias [N] (or None). GGUF's 8-, 6- and 5-bit blocks load
    into it as stored (tinychat/io/gguf_blocks.py); the CPU backend keeps a 4-bit model's full-precision output
    projection this way (`int8_lm_head`, one group per row), as llama.cpp keeps it in 8 bits (Q8_0) or 6 (Q6_K): a
    quarter of the bytes of fp32 for the largest matrix of a small model.
    """

    PARAM_BUFFERS = ("scales", "offsets")
    BITS = 8

    def __init__(self, in_features: int, out_features: int, group_size: int | None = None, bias: bool = False,
                 device=None, dtype: torch.dtype = torch.float32, params_dtype: torch.dtype = torch.float32,
                 offsets: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = in_features if group_size is None else group_size
        if in_features % self.group_size:
            raise TinychatError(f"Int8Linear: group size {group_size} does not divide in_features {in_features}")
        n_groups = in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=params_dtype, device=device))
        self.register_buffer("offsets", torch.zeros(out_features, n_groups, dtype=params_dtype, device=device)
                             if offsets else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_groups(cls, q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, group_size: int,
                    bias: torch.Tensor | None = None) -> Int8Linear:
        """From int8 codes q [N, K] with W = q * s + m per group: scales [N, K/G] fp32 or fp16, offsets of the same
        dtype and shape or None (m = 0). Stored as given."""
        N, K = q.shape
        _check_group_params("Int8Linear", N, K, group_size, scales, offsets)
        layer = cls(K, N, group_size, bias=bias is not None, device="meta", params_dtype=scales.dtype,
                    offsets=offsets is not None)
        layer.qweight = q.to(torch.int8).contiguous()
        layer.scales = scales.contiguous()
        layer.offsets = None if offsets is None else offsets.contiguous()
        layer.bias = None if bias is None else bias.detach().clone()
        return layer

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Linear:
        """Round weight [N, K] to int8 with per-row absmax scales (symmetric, no offset; one group per row)."""
        w = weight.detach().float()  # [N, K]
        scales = w.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127  # [N, 1]
        q = torch.round(w / scales).clamp_(-127, 127).to(torch.int8)  # [N, K]
        return cls.from_groups(q, scales, None, w.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.int8_linear(x, self.qweight, self.scales, self.offsets, self.group_size)  # [..., N]
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"params={str(self.scales.dtype).removeprefix('torch.')}, offsets={self.offsets is not None}")


class RowStack(nn.Module):
    """Linears side by side: y = [part_0(x) | part_1(x) | ...] along the last dimension. A fused linear (q|k|v,
    gate|up) whose parts a GGUF file stores in different forms (Q4_K next to Q6_K rows) runs each as stored."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)  # [..., sum of N]


class GroupEmbedding(nn.Module):
    """An embedding whose table stays in a quantized linear's group form (a WQLinear or an Int8Linear: a GGUF's
    blocks as stored, or the tied output projection itself): a lookup dequantizes only the rows it reads, exactly
    as the ops compute W, so no float copy of the table is kept (113 MB for SmolLM2 in fp32; 1 GB for a 262k
    vocabulary). The rows are cast to the model's dtype, as a float embedding of that dtype would hold them."""

    def __init__(self, table: WQLinear | Int8Linear, dtype: torch.dtype):
        super().__init__()
        self.table = table  # W [V, C]
        # [0]: no data; its dtype and device are the output's, and follow the model's casts and moves
        self.register_buffer("like", torch.empty(0, dtype=dtype, device=table.qweight.device), persistent=False)

    @property
    def num_embeddings(self) -> int:
        return self.table.out_features

    @property
    def embedding_dim(self) -> int:
        return self.table.in_features

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.table.weight_rows(tokens.reshape(-1))  # fp32 [numel, C]
        return rows.to(self.like.dtype).view(*tokens.shape, self.embedding_dim)  # [..., C]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={str(self.like.dtype).removeprefix('torch.')}"


def int8_lm_head(model: nn.Module) -> nn.Module:
    """Replace the model's lm_head (an nn.Linear without bias; tied or not) by an Int8Linear of its weight.
    Returns the model (changed in place); an embedding tied to the old weight keeps its full-precision copy."""
    head = model.lm_head
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise TinychatError(f"int8_lm_head: the lm_head is a {type(head).__name__}, not an nn.Linear without bias")
    model.lm_head = Int8Linear.from_float(head.weight).to(head.weight.device)
    return model
