"""Activation-aware weight quantization (AWQ, Lin et al., MLSys 2024), and plain round-to-nearest (RTN).

AWQ protects the weights that meet large activations. For a linear y = W x, scaling input channel j of W by s_j
and dividing the op that produces x_j by s_j leaves y unchanged, but the quantizer now sees W * s: channels with
large |x| get a finer grid. The search, layer by layer as in llm-awq and AutoAWQ:

1. run the calibration blocks through the layers; for one decoder layer at a time, capture the inputs of its
   linears from its full-precision forward;
2. for each scale group (a linear and the op before it), grid-search alpha in [0, 1): s = mean|x|^alpha, normalized;
   the candidate weights are pseudo_quantize(W * s) / s and the loss is the error of the inspected module's output;
   keep the best s and fold it into the weights (`fold_scales`);
3. clip: per output channel and weight group, shrink the [min, max] range the quantizer sees and keep the ratio
   with the smallest output error (not for the q and k rows, as AutoAWQ);
4. quantize the final weights: round to nearest (method "awq", the paper's), or (method "awq-gptq", the default)
   GPTQ's error-compensated rounding within the clipping ranges and a least-squares refit of the group scales, on
   each linear's input Hessian X^T X with its correlations halved (tinychat/quant/gptq.py); the next layer's inputs
   are this layer's full-precision outputs (or, with `quantized_inputs`, its outputs with pseudo-quantized weights).

The groups of a Llama decoder layer (AutoAWQ's table):

=========  ======================  =================================
linear     op before it (/ s)      module whose output is the loss
=========  ======================  =================================
attn.wqkv  attn_norm               attn (the attention block)
attn.wo    v rows of attn.wqkv     attn.wo (only when not GQA)
mlp.w13    mlp_norm                mlp (the MLP block)
mlp.w2     up rows of mlp.w13      mlp.w2
=========  ======================  =================================

Scales, clipping and rounding are computed on an fp32 working copy of the layer; the forwards that capture the
linears' inputs and judge the candidates run on a copy in FORWARD_DTYPE (bfloat16: twice fp32's speed on a CPU;
AutoAWQ runs them in fp16 on a GPU). The model may be fp32 or bf16. `quantize_layers` is the algorithm in streaming
form (each layer read through a function, handed finished to a sink: how `tinychat quantize` holds one layer at a
time); `quantize_model` runs it over a model held in memory.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tinychat.errors import TinychatError
from tinychat.model import DecoderLayer, Transformer, layer_linears, linear_spec
from tinychat.quant.gptq import gptq_quantize, hessian, refit_scales, shrink_hessian
from tinychat.quant.quantize import (
    CHUNK_TOKENS,
    LayerQuant,
    QuantConfig,
    QuantResult,
    check_group_size,
    dequantize,
    pseudo_quantize,
    quantize,
)

__all__ = ["DEFAULT_METHOD", "FORWARD_DTYPE", "METHODS", "LayerSink", "ScaleGroup", "awq_scales", "clip_weight",
           "fold_scales", "quantize_layers", "quantize_model", "scale_groups", "search_clip", "search_scale"]

CLIP_TOKENS = 512  # tokens the clip search samples (AutoAWQ's n_sample_token)
SEARCH_TOKENS = 2048  # tokens (whole blocks) on which a grid point's module output error is measured
# the dtype of the search's forwards and products (the candidates are quantized from fp32 weights): bfloat16 runs
# them about twice as fast as fp32 on CPUs with AVX-512 BF16 (and on GPUs)
FORWARD_DTYPE = torch.bfloat16
CLIP_ROW_BATCH = 64  # output channels per clip-search batch (AutoAWQ's oc_batch_size)
# rtn: round to nearest; awq: the paper's scale search, fold and clip, then round to nearest; awq-gptq: the same
# search, fold and clip ranges, then GPTQ's error-compensated rounding within them and a least-squares refit of the
# group scales, both on each linear's shrunk input Hessian (tinychat/quant/gptq.py)
METHODS = ("rtn", "awq", "awq-gptq")
DEFAULT_METHOD = "awq-gptq"

# ---- scale groups and folding ----


@dataclass(frozen=True)
class ScaleGroup:
    """The input channels of `linear` are multiplied by s, the outputs of `prev` (rows `prev_rows` of a linear, or
    a norm weight) divided by s; a candidate s is judged by the output of `inspect`."""

    linear: str
    prev: str
    prev_rows: str | None  # "v" (of attn.wqkv) or "up" (of mlp.w13); None: prev is a norm weight
    inspect: str


def scale_groups(cfg) -> list[ScaleGroup]:
    groups = [ScaleGroup("attn.wqkv", "attn_norm", None, "attn")]
    if cfg.num_kv_heads == cfg.num_heads:  # under GQA a v channel feeds several wo inputs: no 1:1 fold
        groups.append(ScaleGroup("attn.wo", "attn.wqkv", "v", "attn.wo"))
    groups.append(ScaleGroup("mlp.w13", "mlp_norm", None, "mlp"))
    groups.append(ScaleGroup("mlp.w2", "mlp.w13", "up", "mlp.w2"))
    return groups


@torch.no_grad()
def fold_scales(layer: DecoderLayer, group: ScaleGroup, s: Tensor, cfg) -> None:
    """Multiply the input channels of group.linear by s [K] and divide what produces them by s, in place.

    The layer computes the same function afterwards (up to rounding): norm(x) * g / s feeds W * s.
    """
    linear: nn.Linear = layer.get_submodule(group.linear)
    s = s.float().to(linear.weight.device)
    _set(linear.weight, linear.weight.float() * s[None, :])  # [N, K] * [1, K]
    prev = layer.get_submodule(group.prev) if group.prev_rows else getattr(layer, group.prev)
    if group.prev_rows is None:  # a norm weight [K]
        _set(prev, prev.float() / s)
    else:  # rows of a linear: weight [K, C] and bias [K]
        rows = linear_spec(cfg, group.prev).rows(group.prev_rows)
        prev.weight[rows] = (prev.weight[rows].float() / s[:, None]).to(prev.weight.dtype)
        if prev.bias is not None:
            prev.bias[rows] = (prev.bias[rows].float() / s).to(prev.bias.dtype)


def _set(param: Tensor, value: Tensor) -> None:
    param.copy_(value.to(param.dtype))


# ---- activations: chunked forwards over the calibration blocks ----


@dataclass
class _Rope:
    positions: Tensor  # [T] int64
    cos_sin: Tensor  # [max_pos, D] fp32


def _chunks(x: Tensor) -> list[Tensor]:
    """Split [n, T, ...] along the blocks into pieces of about CHUNK_TOKENS tokens."""
    per = max(1, CHUNK_TOKENS // x.shape[1])
    return list(x.split(per))


def _dtype(layer: DecoderLayer) -> torch.dtype:
    return layer.attn_norm.dtype


def _module_forward(layer: DecoderLayer, name: str, x: Tensor, rope: _Rope) -> Tensor:
    """Output of one inspected module of the layer for inputs x [b, T, K], computed in the layer's dtype, as fp32."""
    x = x.to(_dtype(layer))
    if name == "attn":
        return layer.attn(x, rope.positions, rope.cos_sin).float()
    return layer.get_submodule(name)(x).float()


def _layer_outputs(layer: DecoderLayer, h: Tensor, rope: _Rope, capture: dict[str, Tensor] | None = None) -> Tensor:
    """Residual stream after `layer` (computed in the layer's dtype) for the stream h [n, T, C] (stored in h's
    dtype); optionally capture the input of each linear named in `capture` (name -> a tensor [n, T, K] that receives
    it, written a chunk at a time: no second copy of the activations)."""
    hooks, start = [], 0  # start: the first block of the running chunk
    if capture is not None:
        for name in capture:
            def hook(mod, args, out, name=name):
                x = args[0].detach()  # [b, T, K]
                capture[name][start : start + x.shape[0]].copy_(x)
            hooks.append(layer.get_submodule(name).register_forward_hook(hook))
    try:
        out = torch.empty_like(h)  # [n, T, C]
        for chunk in _chunks(h):
            x, residual = layer(chunk.to(_dtype(layer)), None, rope.positions, rope.cos_sin)
            out[start : start + chunk.shape[0]] = x + residual
            start += chunk.shape[0]
    finally:
        for handle in hooks:
            handle.remove()
    return out


def _channel_abs_mean(x: Tensor) -> Tensor:
    """mean |x| per input channel over all tokens: x [n, T, K] -> [K] fp32."""
    total = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
    for chunk in _chunks(x):
        total += chunk.float().abs().sum(dim=(0, 1)).double()
    return (total / (x.shape[0] * x.shape[1])).float()


# ---- the scale search ----


def awq_scales(x_mean: Tensor, alpha: float, w_mean: Tensor | None = None) -> Tensor:
    """AWQ's candidate scales [K] for one alpha: x_mean^alpha (duo: / w_mean^(1-alpha)), normalized so that
    sqrt(max * min) = 1; alpha = 0 gives all ones (plain RTN)."""
    if w_mean is None:
        s = x_mean.pow(alpha).clamp(min=1e-4)
    else:
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def _weight_magnitude(w: Tensor, group_size: int) -> Tensor:
    """AutoAWQ's w_mean: |w| normalized by its weight group's max, averaged over output rows: [N, K] -> [K]."""
    N, K = w.shape
    wg = w.float().abs().view(-1, group_size)  # [N*K/G, G]
    return (wg / (wg.amax(dim=1, keepdim=True) + 1e-6)).view(N, K).mean(0)


def _linear_loss(dw: Tensor, gram: Tensor, n_tokens: int) -> float:
    """MSE of a linear's output for a weight error dw [N, K]: ||X dw^T||^2 / (T * N) = sum((dw G) * dw) / (T * N),
    the same number as running the linear on every token, for a fraction of the work (fp32 products: the grid's
    losses differ far more than fp32 rounding; the Gram matrix itself is accumulated in fp64)."""
    return ((dw @ gram) * dw).double().sum().item() / (n_tokens * dw.shape[0])


@dataclass
class ScaleSearch:
    scales: Tensor  # [K] fp32, the best s
    alpha: float
    losses: list[float]  # output MSE per grid point (losses[0] is alpha=0: plain RTN)


@torch.no_grad()
def search_scale(layer: DecoderLayer, group: ScaleGroup, x: Tensor, qcfg: QuantConfig, rope: _Rope | None = None,
                 n_grid: int = 20, duo_scaling: bool = False, search_tokens: int | None = SEARCH_TOKENS,
                 fwd: DecoderLayer | None = None) -> ScaleSearch:
    """Grid-search the scale of one group of the fp32 layer for its inputs x [n, T, K]; the layer is unchanged.

    mean|x| comes from every token. The loss of a single-linear group is over every token too (X^T X, its products
    in fwd's dtype); the loss of a block (attention, MLP) runs the block once per grid point, so it is
    measured on about `search_tokens` tokens: whole blocks, evenly spaced among the n (None: all of them). The
    candidates are quantized from the layer's fp32 weights; the blocks run in `fwd`, a copy of the layer in a faster
    dtype (None: the layer itself), each candidate's weights rounded to its dtype.
    """
    fwd = layer if fwd is None else fwd
    w = layer.get_submodule(group.linear).weight.detach().clone()  # [N, K] fp32
    runs = fwd.get_submodule(group.linear).weight  # where each candidate runs (w, in fwd's dtype, between them)
    x_mean = _channel_abs_mean(x)  # [K]
    w_mean = _weight_magnitude(w, qcfg.group_size) if duo_scaling else None
    if group.inspect == group.linear:  # the loss is the linear's own output error: a quadratic form in dW
        gram, n_tok = hessian(x, runs.dtype).float(), x.shape[0] * x.shape[1]  # [K, K] = X^T X

        def output_loss(candidate: Tensor) -> float:
            return _linear_loss(candidate - w, gram, n_tok)
    else:
        chunks = _chunks(_spaced_blocks(x, search_tokens))
        targets = [_module_forward(fwd, group.inspect, c, rope) for c in chunks]  # full-precision weights' outputs
        n_out = sum(t.numel() for t in targets)

        def output_loss(candidate: Tensor) -> float:
            runs.copy_(candidate)
            sq_err = sum((_module_forward(fwd, group.inspect, c, rope) - t).pow(2).sum().item()
                         for c, t in zip(chunks, targets))
            return sq_err / n_out

    losses: list[float] = []
    best_s, best_alpha, best_loss = None, 0.0, math.inf
    try:
        for i in range(n_grid):
            alpha = i / n_grid
            s = awq_scales(x_mean, alpha, w_mean)  # [K]
            losses.append(output_loss(pseudo_quantize(w * s, qcfg) / s))  # = Q(W * s) applied to x / s
            if losses[-1] < best_loss:
                best_s, best_alpha, best_loss = s, alpha, losses[-1]
    finally:
        runs.copy_(w)  # fwd's weight as it was: w rounded to its dtype, as fwd was made
    return ScaleSearch(best_s, best_alpha, losses)


def _spaced_blocks(x: Tensor, n_tokens: int | None) -> Tensor:
    """About n_tokens tokens of x [n, T, K] as whole blocks, evenly spaced: [m, T, K] with m = n_tokens // T."""
    n, T = x.shape[:2]
    if n_tokens is None or n * T <= n_tokens:
        return x
    m = max(1, n_tokens // T)
    return x[torch.linspace(0, n - 1, m).round().long()]


# ---- the clip search ----


@torch.no_grad()
def search_clip(w: Tensor, x: Tensor, qcfg: QuantConfig, n_grid: int = 20, max_shrink: float = 0.5,
                n_tokens: int = CLIP_TOKENS) -> tuple[Tensor, Tensor]:
    """Best clipping range per output channel and weight group: w [N, K], inputs x [..., K] -> (lo, hi) [N, K/G].

    For each group the range [min, max] shrinks by ratios 1, 1 - 1/n_grid, ... down to 1 - max_shrink; the ratio
    whose quantized weights give the smallest error of the group's share of the output (x_g . w_g, on n_tokens
    evenly strided tokens) wins. Ratio 1 (no clipping) is a candidate, so that error never grows.
    """
    N, K = w.shape
    G = qcfg.group_size
    x = x.reshape(-1, K)
    x = x[:: max(1, x.shape[0] // n_tokens)].float()  # [T, K] sampled tokens
    xg = x.view(-1, K // G, G).transpose(0, 1)  # [K/G, T, G]
    lo_all, hi_all = [], []
    for start in range(0, N, CLIP_ROW_BATCH):
        wb = w[start : start + CLIP_ROW_BATCH].float()  # [b, K]
        wg = wb.view(-1, K // G, G).transpose(0, 1)  # [K/G, b, G]
        w_max, w_min = wg.amax(-1), wg.amin(-1)  # [K/G, b]
        ref = torch.bmm(xg, wg.transpose(1, 2))  # [K/G, T, b]: each group's share of the output
        best_err = torch.full_like(w_max, math.inf)
        lo, hi = w_min.clone(), w_max.clone()
        for i in range(max(1, int(max_shrink * n_grid))):
            ratio = 1 - i / n_grid
            cand_lo, cand_hi = w_min * ratio, w_max * ratio  # [K/G, b]
            clipped = torch.clamp(wg, cand_lo[..., None], cand_hi[..., None])  # [K/G, b, G]
            q = pseudo_quantize(clipped.transpose(0, 1).reshape(-1, K), qcfg)  # [b, K]
            out = torch.bmm(xg, q.view(-1, K // G, G).permute(1, 2, 0))  # [K/G, T, b]
            err = (out - ref).pow(2).mean(1)  # [K/G, b]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            lo, hi = torch.where(better, cand_lo, lo), torch.where(better, cand_hi, hi)
        lo_all.append(lo.t())
        hi_all.append(hi.t())
    return torch.cat(lo_all), torch.cat(hi_all)  # [N, K/G] each


def clip_weight(w: Tensor, lo: Tensor, hi: Tensor, group_size: int) -> Tensor:
    """w [N, K] clamped per weight group to [lo, hi] ([N, K/G] each)."""
    N, K = w.shape
    wg = w.view(N, K // group_size, group_size)
    return torch.clamp(wg, lo[..., None].to(w.dtype), hi[..., None].to(w.dtype)).view(N, K)


@torch.no_grad()
def _clip_ranges(layer: DecoderLayer, inputs: dict[str, Tensor], qcfg: QuantConfig, cfg, n_grid: int,
                 max_shrink: float) -> dict[str, tuple[Tensor, Tensor]]:
    """The searched clipping range of every linear of the fp32 layer: name -> (lo, hi) [N, K/G]; the q and k rows
    of wqkv are not clipped (AutoAWQ skips q/k): their range is (-inf, inf)."""
    ranges = {}
    for spec in layer_linears(cfg):
        weight = layer.get_submodule(spec.name).weight  # [N, K]
        rows = spec.rows("v") if spec.name == "attn.wqkv" else slice(None)
        lo_rows, hi_rows = search_clip(weight[rows], inputs[spec.name], qcfg, n_grid, max_shrink)
        shape = (weight.shape[0], weight.shape[1] // qcfg.group_size)
        lo = torch.full(shape, -math.inf, device=weight.device)
        hi = torch.full(shape, math.inf, device=weight.device)
        lo[rows], hi[rows] = lo_rows, hi_rows
        ranges[spec.name] = (lo, hi)
    return ranges


# ---- the whole model ----

# sink(i, layer, quantized): where quantize_layers hands each finished layer
LayerSink = Callable[[int, DecoderLayer, LayerQuant], None]


def quantize_model(model: Transformer, calib: Tensor | None, qcfg: QuantConfig, *,
                   device: str | torch.device = "cpu", **options) -> QuantResult:
    """Quantize every linear of every decoder layer of a model held in memory; returns name -> (q uint8 [N, K],
    scales, zeros fp32 [N, K/G]) ("layers.{i}.attn.wqkv", ...).

    `quantize_layers` on fp32 working copies of the model's layers, each written back once done: AWQ's folded scales
    (which alone keep the model's function) and clipped weights land in the model, in its dtype, so the model keeps
    full-precision weights: apply the result with `apply_pseudo_quantized` (or pack it). `device` and `options`
    (method, clip, ...) are quantize_layers'.
    """
    result: QuantResult = {}

    def keep(i: int, work: DecoderLayer, quantized: LayerQuant) -> None:
        result.update({f"layers.{i}.{name}": found for name, found in quantized.items()})
        _copy_back(work, model.layers[i])

    quantize_layers(model, lambda i: _working_copy(model.layers[i], torch.device(device)), keep, calib, qcfg,
                    device=device, **options)
    return result


@torch.no_grad()
def quantize_layers(
    model: Transformer,
    load_layer: Callable[[int], DecoderLayer],
    sink: LayerSink,
    calib: Tensor | None,
    qcfg: QuantConfig,
    method: str = DEFAULT_METHOD,
    clip: bool = True,
    duo_scaling: bool = False,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    device: str | torch.device = "cpu",
    progress: bool = True,
    quantized_inputs: bool = False,
    search_tokens: int | None = SEARCH_TOKENS,
    forward_dtype: torch.dtype = FORWARD_DTYPE,
) -> None:
    """Quantize a model one decoder layer at a time, holding one layer and the calibration activations at once.

    model: its config, embedding and rotary tables are used, never its decoder layers' weights (a skeleton whose
    layers are on the meta device will do). load_layer(i): layer i as an fp32 DecoderLayer on `device` that the
    search may change, called once per layer, in order. sink(i, layer, quantized): the finished layer (AWQ's scales
    folded into its norms and weights, weights clipped when `clip`; float) and its linears' quantization, on the CPU;
    nothing of the layer is kept once sink returns. A progress bar counts the layers.

    method "rtn" quantizes the weights as they are (calib may be None). method "awq" runs the search on the
    calibration blocks calib [n, seqlen] int64: it folds the AWQ scales into the layer's norms and weights (which
    alone keeps its function), clips the weights when `clip`, and quantizes the final weights. method "awq-gptq"
    searches and folds the same way, then rounds each linear with GPTQ, each weight group's grid within its searched
    clipping range when `clip`, and refits its group scales by least squares (gptq.refit_scales), both on its
    inputs' X^T X from the same calibration pass with the correlations halved (gptq.shrink_hessian); it is the
    default (DEFAULT_METHOD). The search runs on `device`;
    `quantized_inputs` feeds each layer the outputs of the previous one with pseudo-quantized weights instead
    of its full-precision outputs. `search_tokens` bounds the tokens on which each grid point runs the attention and
    MLP blocks (search_scale; None: every calibration token). The layer's forward (its outputs, its linears' inputs)
    and the search's block forwards and X^T X run in `forward_dtype` (a copy of the layer); scales, clipping and
    rounding are computed on the fp32 weights.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    cfg = model.config
    names = [spec.name for spec in layer_linears(cfg)]
    for spec in layer_linears(cfg):  # fail before any work: every layer has the same shapes
        check_group_size(spec.in_features, qcfg, f"layers.0.{spec.name}")
    h = positions = None
    if method != "rtn":
        if calib is None or calib.dim() != 2 or calib.dtype != torch.int64 or calib.numel() == 0:
            got = "None" if calib is None else f"{tuple(calib.shape)} {calib.dtype}"
            raise TinychatError(f"AWQ needs calibration tokens: a non-empty int64 [n, seqlen] tensor, got {got}")
        if calib.shape[1] > cfg.context_length:
            raise TinychatError(f"calibration seqlen {calib.shape[1]} exceeds the model's context "
                                f"{cfg.context_length}")
        positions = torch.arange(calib.shape[1], device=device)  # [T]
        h = _embed(model, calib, torch.device(device))  # [n, T, C] residual stream, model dtype
    bar = tqdm(range(cfg.num_layers), desc=f"{method.upper()} w{qcfg.w_bit} g{qcfg.group_size}", unit="layer",
               disable=not progress)
    for i in bar:
        work = load_layer(i)
        if method == "rtn":
            sink(i, work, {name: tuple(t.cpu() for t in quantize(work.get_submodule(name).weight, qcfg))
                           for name in names})
            del work  # before the next layer is read
            continue
        rope = _Rope(positions, model.rope_table(model.layers[i]).to(device))
        quantized, h_next, alphas = _search_layer(work, h, rope, qcfg, cfg, method, clip, duo_scaling, n_grid,
                                                  max_shrink, search_tokens, forward_dtype)
        sink(i, work, quantized)
        if quantized_inputs:
            for name in names:
                work.get_submodule(name).weight.copy_(dequantize(*quantized[name], qcfg.group_size))
            h_next = _layer_outputs(work, h, rope)
        h = h_next
        del work, quantized, h_next  # before the next layer is read
        bar.set_postfix(alpha=alphas)


@torch.no_grad()
def _search_layer(work: DecoderLayer, h: Tensor, rope: _Rope, qcfg: QuantConfig, cfg, method: str, clip: bool,
                  duo_scaling: bool, n_grid: int, max_shrink: float, search_tokens: int | None,
                  forward_dtype: torch.dtype) -> tuple[LayerQuant, Tensor, str]:
    """AWQ (or AWQ-GPTQ) on one fp32 working layer for its inputs h [n, T, C], in place (scales folded, weights
    clipped): (its linears' quantization, its full-precision outputs [n, T, C] in h's dtype, the alphas found)."""
    names = [spec.name for spec in layer_linears(cfg)]
    fwd = work if forward_dtype == torch.float32 else copy.deepcopy(work).to(forward_dtype)  # runs the forwards
    n, T = h.shape[:2]
    inputs = {spec.name: h.new_empty(n, T, spec.in_features) for spec in layer_linears(cfg)}  # name -> [n, T, K]
    h_next = _layer_outputs(fwd, h, rope, inputs)  # full-precision outputs: the next layer's inputs

    searches = [(g, search_scale(work, g, inputs[g.linear], qcfg, rope, n_grid, duo_scaling, search_tokens, fwd))
                for g in scale_groups(cfg)]  # every group searched against the unmodified layer, as AutoAWQ
    del fwd
    for group, found in searches:
        fold_scales(work, group, found.scales, cfg)
        for c in _chunks(inputs[group.linear]):  # the linear now sees x / s
            c.div_(found.scales.to(c.dtype))
    ranges = _clip_ranges(work, inputs, qcfg, cfg, n_grid, max_shrink) if clip else {}
    quantized: LayerQuant = {}
    for name in names:
        w = work.get_submodule(name).weight  # [N, K], scales folded
        if method == "awq-gptq":  # error-compensated rounding, each group's grid within its clipping range
            hess = shrink_hessian(hessian(inputs[name], forward_dtype))  # [K, K]
            found = refit_scales(w, hess, *gptq_quantize(w, hess, qcfg, clip=ranges.get(name)), qcfg)
        else:
            if name in ranges:
                w.copy_(clip_weight(w, *ranges[name], qcfg.group_size))
            found = quantize(w, qcfg)
        quantized[name] = tuple(t.cpu() for t in found)
    return quantized, h_next, ",".join(f"{found.alpha:.2f}" for _, found in searches)


@torch.no_grad()
def _embed(model: Transformer, calib: Tensor, device: torch.device) -> Tensor:
    """The decoder's inputs for the calibration blocks [n, T] -> [n, T, C] on `device`, in the model's dtype."""
    return torch.cat([model.embed_tokens(c.to(model.device)).to(device) for c in _chunks(calib)])


def _working_copy(layer: DecoderLayer, device: torch.device) -> DecoderLayer:
    """An fp32 copy of the layer on `device`, without its KV cache (calibration runs whole blocks)."""
    cache, layer.attn.kv_cache = layer.attn.kv_cache, None
    try:
        work = copy.deepcopy(layer)
    finally:
        layer.attn.kv_cache = cache
    return work.to(device=device, dtype=torch.float32)


@torch.no_grad()
def _copy_back(work: DecoderLayer, layer: DecoderLayer) -> None:
    """Write the working copy's (folded, clipped) parameters into the model's layer, in its dtype and device."""
    params = dict(layer.named_parameters())
    for name, p in work.named_parameters():
        params[name].copy_(p)
