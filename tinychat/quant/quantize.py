"""Group-wise asymmetric integer quantization of weight matrices (the math; packing lives in pack.py).

A weight row is cut into groups of `group_size` input channels; each group gets a scale and an integer zero
point so that w ~= (q - zero) * scale with q in [0, 2^bits - 1], as in AWQ and AutoAWQ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinychat.errors import TinychatError


@dataclass(frozen=True)
class QuantConfig:
    w_bit: int = 4
    group_size: int = 128
    zero_point: bool = True  # asymmetric (with zero point); False: symmetric around 0

    def __post_init__(self):
        if self.w_bit not in (2, 3, 4, 8):
            raise ValueError(f"w_bit must be 2, 3, 4 or 8, got {self.w_bit}")
        if self.group_size <= 0:
            raise ValueError(f"group_size must be > 0, got {self.group_size}")

    @property
    def max_int(self) -> int:
        return 2**self.w_bit - 1


def check_group_size(in_features: int, cfg: QuantConfig, layer: str) -> None:
    if in_features % cfg.group_size:
        raise TinychatError(
            f"{layer}: group size {cfg.group_size} does not divide its {in_features} input features; "
            f"choose a group size that divides {in_features}"
        )


def quantize(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q uint8 [N, K], scales fp32 [N, K/G], zeros fp32 [N, K/G] holding integers)."""
    N, K = w.shape
    G = cfg.group_size
    wg = w.float().reshape(N, K // G, G)  # [N, K/G, G]
    if cfg.zero_point:
        w_max, w_min = wg.amax(-1), wg.amin(-1)  # [N, K/G]
        scales = ((w_max - w_min).clamp(min=1e-5) / cfg.max_int)
        zeros = (-torch.round(w_min / scales)).clamp(0, cfg.max_int)
    else:
        half = 2 ** (cfg.w_bit - 1)
        scales = wg.abs().amax(-1).clamp(min=1e-5) / (half - 1)
        zeros = torch.full_like(scales, half)
    q = (torch.round(wg / scales[..., None]) + zeros[..., None]).clamp(0, cfg.max_int)
    return q.reshape(N, K).to(torch.uint8), scales, zeros


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """q [N, K], scales/zeros [N, K/G] -> fp32 weights [N, K] = (q - zero) * scale."""
    N, K = q.shape
    qg = q.float().reshape(N, K // group_size, group_size)
    return ((qg - zeros[..., None]) * scales[..., None]).reshape(N, K)


def pseudo_quantize(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Round-trip w [N, K] through the quantizer: what the int4 kernels will compute with, in w's dtype."""
    q, scales, zeros = quantize(w, cfg)
    return dequantize(q, scales, zeros, cfg.group_size).to(w.dtype)
