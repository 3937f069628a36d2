"""The model's quantized linear layers: WQLinear (4-bit weights, `tinychat::int4_linear`) and Int8Linear (8-bit
weights, `tinychat::int8_linear`).

WQLinear holds the int4 op layout of tinychat/int4_layout.py (qweight uint8 [N, K/2] in blocks of 32 input channels,
fp32 scales and zeros [N, K/G]) and an optional bias. `Transformer.swap_linears` puts them in the decoder's place.
"""

from __future__ import annotations

import torch
from torch import nn

from tinychat import ops
from tinychat.errors import TinychatError
from tinychat.int4_layout import OP_BLOCK, to_int4_op


class _Fp32Buffers(nn.Module):
    """A module whose buffers named in FP32_BUFFERS stay fp32: device moves apply to every buffer, dtype casts
    (`.to(dtype)`, `.half()`) leave these alone, since the ops compute in fp32 from them."""

    FP32_BUFFERS: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name) for name in self.FP32_BUFFERS}
        super()._apply(fn, recurse)
        for name, t in kept.items():
            setattr(self, name, t.to(getattr(self, name).device))
        return self


class WQLinear(_Fp32Buffers):
    """y = x @ W.T (+ bias) with W [out_features, in_features] stored as 4-bit integers, group-wise scales and zeros.

    Buffers: qweight uint8 [N, K/2], scales fp32 [N, K/G], zeros fp32 [N, K/G], bias [N] (or None).
    Moving the module (`.to(device)`) moves every buffer; casting it (`.to(dtype)`, `.half()`) casts only the bias:
    scales and zeros stay fp32, the precision the op computes in.
    """

    FP32_BUFFERS = ("scales", "zeros")

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if in_features % group_size or group_size % OP_BLOCK:
            raise TinychatError(f"WQLinear: group size {group_size} must divide in_features {in_features} and be a "
                                f"multiple of {OP_BLOCK}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                       bias: torch.Tensor | None = None) -> WQLinear:
        """From the plain quantization (q uint8 [N, K] of 4-bit values, scales/zeros fp32 [N, K/G];
        tinychat/int4_layout.py)."""
        N, K = q.shape
        if tuple(scales.shape) != (N, K // group_size):
            raise TinychatError(f"WQLinear: scales have shape {tuple(scales.shape)}, expected "
                                f"{(N, K // group_size)} for q {tuple(q.shape)} and group size {group_size}")
        qweight, scales32, zeros32 = to_int4_op(q, scales, zeros)
        layer = cls(K, N, group_size, bias=bias is not None, device="meta")
        layer.qweight, layer.scales, layer.zeros = qweight, scales32, zeros32
        if bias is not None:
            layer.bias = bias.detach().clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size)  # [..., N]
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}")


class Int8Linear(_Fp32Buffers):
    """y = x @ W.T with W [out_features, in_features] stored as int8 with one fp32 scale per row (absmax / 127),
    run by the `tinychat::int8_linear` op. Buffers: qweight int8 [N, K], scales fp32 [N]. No bias.

    The CPU backend keeps a 4-bit model's output projection this way (`int8_lm_head`), as llama.cpp keeps it in 8
    bits (Q8_0) or 6 (Q6_K): a quarter of the bytes of fp32 for the largest matrix of a small model.
    """

    FP32_BUFFERS = ("scales",)

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Linear:
        """Round weight [N, K] to int8 with per-row absmax scales (symmetric, no zero point)."""
        w = weight.detach().float()  # [N, K]
        scales = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127  # [N]
        layer = cls(w.shape[1], w.shape[0], device="meta")
        layer.qweight = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
        layer.scales = scales
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int8_linear(x, self.qweight, self.scales)  # [..., N]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def int8_lm_head(model: nn.Module) -> nn.Module:
    """Replace the model's lm_head (an nn.Linear without bias; tied or not) by an Int8Linear of its weight.
    Returns the model (changed in place); an embedding tied to the old weight keeps its full-precision copy."""
    head = model.lm_head
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise TinychatError(f"int8_lm_head: the lm_head is a {type(head).__name__}, not an nn.Linear without bias")
    model.lm_head = Int8Linear.from_float(head.weight).to(head.weight.device)
    return model
