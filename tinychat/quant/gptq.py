"""GPTQ: error-compensated rounding of a weight matrix (Frantar et al., ICLR 2023, Algorithm 1).

The columns (input channels) of W [N, K] are rounded one at a time, in channel order; the rounding error of column
j, weighted by the inputs' second moments H = X^T X, is pushed onto the columns not yet rounded, so that the
output error ||X (W - Wq)^T||^2 stays small. With U the upper Cholesky factor of H^-1 (U^T U = H^-1):

    err_j = (w_j - dq_j) / U[j, j];   w_k -= err_j * U[j, k]  for every k > j

As in the reference implementations (IST-DASLab/gptq, AutoGPTQ) the updates are applied eagerly inside a block of
`block_size` columns and lazily, as one matrix product, to the columns after the block.

The result has quantize()'s format (tinychat/quant/quantize.py, the AutoAWQ GEMM checkpoint's): static groups of G
input channels in channel order (no activation-order permutation), each with its scale and integer zero point.
A group's scale and zero are computed by quantize()'s own rule from the group's current weights (with the updates
of every column rounded before it) when the sweep reaches the group's first column; its columns are then rounded
on that grid, so that dequantize(q, scales, zeros, G) gives exactly the weights each column was rounded to.
(The reference takes a group's grid from its weights without the pending updates of the current block's earlier
columns when the group starts inside a block; its static_groups option takes every grid from the original weights.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from tinychat.errors import TinychatError
from tinychat.quant.quantize import CHUNK_TOKENS, QuantConfig, quantize

__all__ = ["gptq_quantize", "hessian"]


def hessian(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """H = X^T X [K, K] (fp64) over every token of x [..., K]: each chunk of CHUNK_TOKENS tokens multiplied in
    `dtype` (bfloat16: about twice as fast on CPUs with AVX-512 BF16, each chunk's sums rounded to 8 bits), the chunks
    summed in fp64. The reference's 2 / n factor is left out: GPTQ's result does not depend on H's scale (the damping
    is relative to mean(diag(H))); AWQ's loss of a single linear divides by the tokens itself."""
    K = x.shape[-1]
    h = torch.zeros(K, K, dtype=torch.float64, device=x.device)
    for chunk in x.reshape(-1, K).split(CHUNK_TOKENS):  # [<= CHUNK_TOKENS, K]
        c = chunk.to(dtype)
        h += (c.t() @ c).double()
    return h


def _inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """U [K, K] fp32, upper triangular with U^T U = (H + damp * mean(diag(H)) * I)^-1, for h [K, K].

    The damping, the Cholesky factorizations and the inverse run in fp64: on ill-conditioned Hessians (outlier
    channels, few tokens) fp32 factorizations fail or lose the small pivots that the error updates divide by."""
    h = h.double().clone()  # [K, K]
    h.diagonal().add_(damp * h.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(h)
    if info.item():
        raise TinychatError(f"GPTQ: the damped Hessian is not positive definite (damp={damp}); raise damp")
    u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info.item():
        raise TinychatError(f"GPTQ: the inverse Hessian is not positive definite (damp={damp}); raise damp")
    return u.float()


def _group_grid(group: Tensor, qcfg: QuantConfig, lo: Tensor | None, hi: Tensor | None) -> tuple[Tensor, Tensor]:
    """Scale and zero [N] of one group's weights [N, G] by quantize()'s rule, after clamping them to [lo, hi] [N]."""
    if lo is not None:
        group = torch.clamp(group, lo[:, None], hi[:, None])
    _, scales, zeros = quantize(group, QuantConfig(qcfg.w_bit, group.shape[1], qcfg.zero_point))  # [N, 1] each
    return scales[:, 0], zeros[:, 0]


@torch.no_grad()
def gptq_quantize(w: Tensor, hessian: Tensor, qcfg: QuantConfig, block_size: int = 128, damp: float = 0.01,
                  clip: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ-round w [N, K] for inputs whose X^T X is `hessian` [K, K] -> (q uint8 [N, K], scales fp32 [N, K/G],
    zeros fp32 [N, K/G] holding integers), quantize()'s format.

    H is damped by damp * mean(diag(H)) on its diagonal; a dead channel (H[i, i] == 0: its input is always 0) gets
    H[i, i] = 1 (before the damping, as the reference) and weight 0, which rounds to 0 exactly. All weight math is
    fp32 on w's device, H's factorization fp64 (_inverse_cholesky); the result is deterministic.

    clip: optional AWQ clip ranges (lo, hi) [N, K/G] (awq.search_clip). When the sweep reaches a group, the group's
    current weights are clamped to [lo, hi] before its scale and zero are computed, so that its grid spans at most
    [lo, hi] as with awq.clip_weight then quantize(). The weights themselves are not clamped: a weight beyond the
    grid rounds to its edge (q = 0 or max_int) and that clipping error is compensated by the later columns like any
    rounding error. Clamping w before GPTQ instead would make GPTQ fit the clipped weights and leave the clipping
    error uncompensated.
    """
    N, K = w.shape
    G = qcfg.group_size
    if K % G:
        raise TinychatError(f"GPTQ: group size {G} does not divide the {K} input features")
    if tuple(hessian.shape) != (K, K):
        raise TinychatError(f"GPTQ: the Hessian must be [{K}, {K}] for a [{N}, {K}] weight, got {tuple(hessian.shape)}")
    if block_size <= 0 or damp < 0:
        raise ValueError(f"block_size must be > 0 and damp >= 0, got {block_size} and {damp}")
    lo = hi = None
    if clip is not None:
        lo, hi = (t.float().to(w.device) for t in clip)  # [N, K/G] each
        if tuple(lo.shape) != (N, K // G) or tuple(hi.shape) != (N, K // G):
            raise TinychatError(f"GPTQ: clip ranges must be [{N}, {K // G}], got {tuple(lo.shape)}, {tuple(hi.shape)}")

    w = w.float().clone()  # [N, K], error-updated in place as the sweep goes
    h = hessian.to(w.device, torch.float64).clone()  # [K, K]
    dead = h.diagonal() == 0  # [K]
    h.diagonal()[dead] = 1
    w[:, dead] = 0
    u = _inverse_cholesky(h, damp)  # [K, K] upper, fp32

    q = torch.empty(N, K, dtype=torch.uint8, device=w.device)
    scales = torch.empty(N, K // G, device=w.device)
    zeros = torch.empty(N, K // G, device=w.device)
    for b0 in range(0, K, block_size):
        b1 = min(b0 + block_size, K)
        err = torch.zeros(N, b1 - b0, device=w.device)  # [N, B] (w_j - dq_j) / U[j, j] of the block's columns
        for j in range(b0, b1):
            if j % G == 0:  # a group starts: its grid from its current weights
                g1 = j + G
                # columns inside the block are up to date; those after it still lack this block's lazy update
                group = torch.cat([w[:, j : min(g1, b1)], w[:, b1:g1] - err[:, : j - b0] @ u[b0:j, b1:g1]], dim=1)
                bounds = (None, None) if lo is None else (lo[:, j // G], hi[:, j // G])
                s, z = _group_grid(group, qcfg, *bounds)  # [N] each
                scales[:, j // G], zeros[:, j // G] = s, z
            col = w[:, j]  # [N]
            qj = (torch.round(col / s) + z).clamp(0, qcfg.max_int)  # [N], quantize()'s rounding
            q[:, j] = qj.to(torch.uint8)
            e = (col - (qj - z) * s) / u[j, j]  # [N]; (qj - z) * s is dequantize()'s value
            w[:, j + 1 : b1] -= e[:, None] * u[j, j + 1 : b1][None, :]  # eager update inside the block
            err[:, j - b0] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]  # lazy update of the columns after the block: [N, B] @ [B, K - b1]
    return q, scales, zeros
