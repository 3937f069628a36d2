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

Two additions, used by AWQ-GPTQ (tinychat/quant/awq.py) and measured in the README's quantization results:
shrink_hessian halves the correlations of H before GPTQ sees it (GPTQ on the plain X^T X of the calibration text
fitted that text and lost to round-to-nearest after AWQ on held-out code), and refit_scales, after the rounding,
solves each output row's group scales by least squares for its fixed codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tinychat.errors import TinychatError
from tinychat.quant.quantize import CHUNK_TOKENS, QuantConfig, dequantize, quantize, round_to_grid

__all__ = ["HESSIAN_SHRINK", "gptq_quantize", "hessian", "refit_scales", "shrink_hessian"]

# the Hessian GPTQ and refit_scales are given: H + HESSIAN_SHRINK * diag(H) (shrink_hessian). With the plain X^T X of
# the calibration text, GPTQ's rounding moved error into input directions that text leaves quiet and lost to AWQ on a
# held-out domain (code); halving the correlations (1.0) gains more on WikiText-2 and wins on code too
HESSIAN_SHRINK = 1.0


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


def shrink_hessian(h: Tensor, shrink: float = HESSIAN_SHRINK) -> Tensor:
    """H + shrink * diag(H) [K, K], in place (a 70B model's X^T X is 6.6 GB in fp64), returned: each channel's own
    energy kept, its correlations with the others scaled by 1 / (1 + shrink) (shrinkage of a covariance toward its
    diagonal; shrink = 0: H as it is)."""
    if shrink < 0:
        raise ValueError(f"shrink must be >= 0, got {shrink}")
    h.diagonal().mul_(1 + shrink)
    return h


def _inverse_cholesky(hessian: Tensor, dead: Tensor, damp: float, device: torch.device) -> Tensor:
    """U [K, K] fp32, upper triangular with U^T U = (H + damp * mean(diag(H)) * I)^-1, for hessian [K, K] with
    H[i, i] = 1 for the dead channels (dead [K] bool) before the damping, as the reference.

    The damping, the Cholesky factorizations and the inverse run in fp64: on ill-conditioned Hessians (outlier
    channels, few tokens) fp32 factorizations fail or lose the small pivots that the error updates divide by. Each
    [K, K] intermediate is dropped once the next exists: at most two fp64 copies beside the caller's."""
    h = hessian.to(device, torch.float64, copy=True)  # [K, K]
    h.diagonal()[dead] = 1
    h.diagonal().add_(damp * h.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(h)
    del h
    if info.item():
        raise TinychatError(f"GPTQ: the damped Hessian is not positive definite (damp={damp}); raise damp")
    inverse = torch.cholesky_inverse(lower)
    del lower
    u, info = torch.linalg.cholesky_ex(inverse, upper=True)
    del inverse
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

    wt = w.float().t().contiguous()  # [K, N]: column j of w as a contiguous row, error-updated as the sweep goes
    dead = (hessian.diagonal() == 0).to(w.device)  # [K]
    wt[dead] = 0
    u = _inverse_cholesky(hessian, dead, damp, w.device)  # [K, K] upper, fp32
    pivots = u.diagonal().tolist()  # U[j, j]

    qt = torch.empty(K, N, dtype=torch.uint8, device=w.device)  # q transposed
    scales = torch.empty(N, K // G, device=w.device)
    zeros = torch.empty(N, K // G, device=w.device)
    for b0 in range(0, K, block_size):
        b1 = min(b0 + block_size, K)
        err = torch.zeros(b1 - b0, N, device=w.device)  # [B, N] (w_j - dq_j) / U[j, j] of the block's columns
        for j in range(b0, b1):
            if j % G == 0:  # a group starts: its grid from its current weights
                g1 = j + G
                # columns inside the block are up to date; those after it still lack this block's lazy update
                group = torch.cat([wt[j : min(g1, b1)], wt[b1:g1] - u[b0:j, b1:g1].t() @ err[: j - b0]])  # [G, N]
                bounds = (None, None) if lo is None else (lo[:, j // G], hi[:, j // G])
                s, z = _group_grid(group.t(), qcfg, *bounds)  # [N] each
                scales[:, j // G], zeros[:, j // G] = s, z
            col = wt[j]  # [N]
            qj = round_to_grid(col, s, z, qcfg.max_int)  # [N]
            qt[j] = qj
            e = err[j - b0]
            torch.sub(col, (qj - z) * s, out=e).div_(pivots[j])  # [N]; (qj - z) * s is dequantize()'s value
            wt[j + 1 : b1].addr_(u[j, j + 1 : b1], e, alpha=-1)  # eager update inside the block
        wt[b1:] -= u[b0:b1, b1:].t() @ err  # lazy update of the columns after the block: [K - b1, B] @ [B, N]
    q = qt.t().contiguous()  # [N, K]
    return q, scales, zeros


def _output_error(w: Tensor, wq: Tensor, h: Tensor) -> Tensor:
    """(w - wq) H (w - wq)^T per output row: w, wq [N, K], h [K, K] fp32 -> [N]."""
    d = w - wq  # [N, K]
    return ((d @ h) * d).sum(1)


REFIT_FLOATS = 1 << 26  # bounds refit_scales' [rows, K/G, K] fp32 products (256 MB): rows per batch follow from it


@torch.no_grad()
def refit_scales(w: Tensor, hessian: Tensor, q: Tensor, scales: Tensor, zeros: Tensor,
                 qcfg: QuantConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Least-squares group scales for fixed codes, then a re-rounding on them; each row keeps the best of the three.

    For row n with codes q and integer zeros z fixed, the weights (q - z) * s are linear in the row's K/G group
    scales s, and the output error (w - wq) H (w - wq)^T is a quadratic in s: the normal equations
    (E^T H E) s = E^T H w, with E [K, K/G] holding (q - z) of group g in its rows, give the best s. (A ridge of 1e-6
    of the diagonal's mean pulls toward the old scales: a group whose codes all equal its zero keeps its scale.) Then
    the row is rounded again to nearest on the new scales (same zeros). A row keeps the new scales, or the new scales
    with the new codes, only where that lowers its error and every new scale is positive; the format stays
    quantize()'s: w [N, K], hessian [K, K], q uint8 [N, K], scales and zeros fp32 [N, K/G] -> (q, scales, zeros).
    """
    N, K = w.shape
    G = qcfg.group_size
    if K % G or tuple(q.shape) != (N, K) or not tuple(scales.shape) == tuple(zeros.shape) == (N, K // G):
        raise TinychatError(f"refit_scales: w {tuple(w.shape)}, q {tuple(q.shape)}, scales {tuple(scales.shape)} and "
                            f"zeros {tuple(zeros.shape)} do not match group size {G}")
    ng = K // G
    w = w.float()
    h = hessian.to(w.device, torch.float32)  # [K, K]
    e = q.float().view(N, ng, G) - zeros[..., None]  # [N, K/G, G]: (q - z)
    rhs = (e * (w @ h).view(N, ng, G)).sum(-1).double()  # [N, K/G]: E^T H w per row
    fitted = torch.empty_like(scales)  # [N, K/G]
    rows = max(1, REFIT_FLOATS // (ng * K))
    for r0 in range(0, N, rows):
        eb = e[r0 : r0 + rows]  # [b, K/G, G]
        he = torch.bmm(eb.transpose(0, 1), h.view(ng, G, K)).transpose(0, 1)  # [b, K/G, K]: rows of E^T H
        m = (he.reshape(-1, ng, ng, G) * eb[:, None]).sum(-1).double()  # [b, K/G, K/G]: E^T H E
        ridge = 1e-6 * m.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-30)  # [b]
        m.diagonal(dim1=1, dim2=2).add_(ridge[:, None])
        rb = rhs[r0 : r0 + rows] + ridge[:, None] * scales[r0 : r0 + rows].double()
        fitted[r0 : r0 + rows] = torch.linalg.solve(m, rb).float()
    valid = (fitted > 0).all(1)  # [N]
    rounded = round_to_grid(w.view(N, ng, G), fitted.clamp(min=1e-10)[..., None], zeros[..., None], qcfg.max_int)
    rounded = rounded.view(N, K).to(torch.uint8)  # [N, K] on the fitted scales
    best_q, best_s = q, scales
    best_err = _output_error(w, dequantize(q, scales, zeros, G), h)  # [N]
    for cand in (q, rounded):
        err = _output_error(w, dequantize(cand, fitted, zeros, G), h)
        better = valid & (err < best_err)  # [N]
        best_q = torch.where(better[:, None], cand, best_q)
        best_s = torch.where(better[:, None], fitted, best_s)
        best_err = torch.where(better, err, best_err)
    return best_q, best_s, zeros
