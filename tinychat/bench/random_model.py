"""Random weights in a model shape, float or int4, built in place: no checkpoint, no download, no float copy."""

from __future__ import annotations

import torch
from torch import nn

from tinychat.config import ModelConfig
from tinychat.linear import WQLinear
from tinychat.model import Transformer
from tinychat.quant.quantize import auto_group_size

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RANDOM_STD = 0.02  # float weights of a random model ~ N(0, 0.02^2), the usual initializer range


@torch.no_grad()
def random_model(cfg: ModelConfig, dtype: str, device: str | torch.device = "cpu", act_dtype: str = "float32",
                 seed: int = 0) -> Transformer:
    """A Transformer of `cfg` with random weights, built in place on `device` (no float copy of a 4-bit model).

    Float dtypes: weights ~ N(0, 0.02^2) in that dtype. "int4": every decoder linear a WQLinear with random 4-bit
    values in the symmetric form (Q4_0's: W = (q - 8) s, no offsets) and scales near 0.0045 (so that weights have a
    std near 0.02), the rest in `act_dtype`.
    Norm weights are ones and biases zeros.
    """
    device = torch.device(device)
    float_dtype = FLOAT_DTYPES[act_dtype if dtype == "int4" else dtype]
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    with torch.device("meta"):  # shapes only: nothing is allocated until each tensor is filled below
        model = Transformer(cfg)
    if dtype == "int4":
        group = auto_group_size(cfg)

        def random_int4(name: str, meta: nn.Module) -> WQLinear:
            q = WQLinear(meta.in_features, meta.out_features, group, meta.bias is not None, device=device,
                         dtype=float_dtype, offsets=False)  # symmetric: W = (q - 8) * s
            q.qweight.random_(0, 256, generator=gen)  # [N, K/2]: two random 4-bit values per byte
            q.scales.uniform_(0.003, 0.006, generator=gen)  # [N, K/G]
            return q

        model.swap_linears(random_int4)
    model.tie_weights()  # before filling: a tied lm_head is the embedding, not a second random matrix
    made: dict[int, nn.Parameter] = {}  # id of a meta parameter -> its real one (shared parameters stay shared)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in made:
                t = torch.empty(p.shape, dtype=float_dtype, device=device)
                if name == "bias":
                    t.zero_()
                elif p.dim() == 1:  # RMSNorm weights
                    t.fill_(1.0)
                else:
                    t.normal_(0.0, RANDOM_STD, generator=gen)
                made[id(p)] = nn.Parameter(t, requires_grad=False)
            module._parameters[name] = made[id(p)]
    model.cos_sin = model.cos_sin.to(device)  # [context, D] fp32, built for real on the CPU by the constructor
    if model.cos_sin_local is not None:
        model.cos_sin_local = model.cos_sin_local.to(device)
    return model.eval()
