"""Group-wise asymmetric integer quantization of weight matrices, and applying it to a model.

A weight row is cut into groups of `group_size` input channels; each group gets a scale and an integer zero
point so that w ~= (q - zero) * scale with q in [0, 2^bits - 1], as in AWQ and AutoAWQ. The result of quantizing a
model is a QuantResult: each decoder linear's name ("layers.{i}.attn.wqkv", ...) -> its plain quantization
(tinychat/int4_layout.py); it is run as WQLinear layers (`quantize_model_layers`) or, for evaluation, written back
as dequantized weights (`apply_pseudo_quantized`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tinychat.config import ModelConfig
from tinychat.errors import TinychatError
from tinychat.linear import WQLinear
from tinychat.model import Transformer, layer_linears, linear_names

GROUP_SIZES = (128, 64, 32)  # the automatic group size: the largest of these that divides every linear
CHUNK_TOKENS = 8192  # calibration tokens per piece of work (a forward, a Gram matrix): bounds activation memory

# decoder linear name -> (q uint8 [N, K], scales fp32 [N, K/G], zeros fp32 [N, K/G])
QuantResult = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# the same for one decoder layer, named within it: "attn.wqkv", "attn.wo", "mlp.w13", "mlp.w2" -> (q, scales, zeros)
LayerQuant = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


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
    q = round_to_grid(wg, scales[..., None], zeros[..., None], cfg.max_int)  # [N, K/G, G]
    return q.reshape(N, K).to(torch.uint8), scales, zeros


def round_to_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, max_int: int) -> torch.Tensor:
    """The codes of w on a given grid, the quantizer's rounding rule: round(w / scale) + zero, clamped to
    [0, max_int], as floats; scales and zeros broadcast against w."""
    return (torch.round(w / scales) + zeros).clamp_(0, max_int)


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """q [N, K], scales/zeros [N, K/G] -> fp32 weights [N, K] = (q - zero) * scale."""
    N, K = q.shape
    qg = q.float().reshape(N, K // group_size, group_size)
    return ((qg - zeros[..., None]) * scales[..., None]).reshape(N, K)


def pseudo_quantize(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Round-trip w [N, K] through the quantizer: what the int4 kernels will compute with, in w's dtype."""
    q, scales, zeros = quantize(w, cfg)
    return dequantize(q, scales, zeros, cfg.group_size).to(w.dtype)


def auto_group_size(cfg: ModelConfig) -> int:
    """The largest of GROUP_SIZES that divides the in_features of every decoder linear."""
    features = {spec.in_features for spec in layer_linears(cfg)}
    for g in GROUP_SIZES:
        if all(k % g == 0 for k in features):
            return g
    raise TinychatError(f"no group size among {GROUP_SIZES} divides the linears' in_features {sorted(features)}")


def quantize_model_layers(model: Transformer, qdict: QuantResult, qcfg: QuantConfig) -> Transformer:
    """Replace every decoder linear by a WQLinear of its quantization in qdict (one entry per linear), on the same
    device, keeping its bias. Returns the model (changed in place)."""
    if qcfg.w_bit != 4:
        raise TinychatError(f"WQLinear runs 4-bit weights only, not w_bit={qcfg.w_bit} (other widths are "
                            "evaluation-only fake quantization: use apply_pseudo_quantized)")
    names = linear_names(model.config)
    missing, extra = [n for n in names if n not in qdict], [n for n in qdict if n not in names]
    if missing or extra:
        raise TinychatError(f"quantize_model_layers: qdict must hold every decoder linear; missing {missing[:3]}, "
                            f"unknown {extra[:3]}")

    def make(name: str, linear: nn.Module) -> WQLinear:
        q, scales, zeros = qdict[name]
        if not isinstance(linear, nn.Linear):
            raise TinychatError(f"quantize_model_layers: {name!r} is a {type(linear).__name__}, not an nn.Linear")
        if tuple(q.shape) != tuple(linear.weight.shape):
            raise TinychatError(f"quantize_model_layers: {name!r}: q has shape {tuple(q.shape)}, but the weight is "
                                f"{tuple(linear.weight.shape)}")
        return WQLinear.from_quantized(q, scales, zeros, qcfg.group_size, linear.bias).to(linear.weight.device)

    return model.swap_linears(make)


@torch.no_grad()
def apply_pseudo_quantized(model: Transformer, qdict: QuantResult, qcfg: QuantConfig) -> None:
    """Set each quantized linear's weight to dequantize(q, scales, zeros): the model then computes what the int4
    kernels would. For AWQ, apply it to the model quantize_model folded the scales into."""
    for name, (q, scales, zeros) in qdict.items():
        weight = model.get_submodule(name).weight
        weight.copy_(dequantize(q, scales, zeros, qcfg.group_size).to(weight.device, weight.dtype))
