"""The CUDA kernels of rope_kv_write, attention and silu_and_mul (csrc/cuda/attention.cu, rope.cu, activation.cu)
against the references in tinychat.ops, and CPU checks of their shared index math.

The CPU tests compile csrc/common/attention_plan.h with g++ (torch.utils.cpp_extension.load_inline, no CUDA, not
the tinychat._C extension) and check the decode split plan, the prefill tile schedule (causal skipping and masking)
and the mma.sync / ldmatrix fragment maps against a model of the PTX semantics. The CUDA tests skip without a GPU.

Low-precision accuracy is judged like FlashAttention's tests: the kernel's max abs error against fp32 math must be
at most 2x that of the same computation done in the low dtype by plain torch, plus a tiny atol.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
cuda = [needs_cuda, pytest.mark.cuda]
LOW = [torch.float16, torch.bfloat16]

# ---------------------------------------------------------------- CPU: index math of attention_plan.h

_PLAN_SRC = r"""
#include <vector>
#include "common/attention_plan.h"
using namespace tinychat::attn;

std::vector<int64_t> plan(int64_t rows, int64_t hkv, int64_t group, int64_t S, int64_t sms) {
  const DecodePlan p = decode_plan(rows, hkv, group, S, sms);
  return {p.heads_per_block, p.head_blocks, p.splits, p.chunk};
}
std::vector<int64_t> visible(int64_t p, int64_t window, int64_t S) {
  const KeyRange r = visible_range(p, window, S);
  return {r.first, r.count};
}
int64_t row_of(int64_t p, int64_t S) { return cache_row(p, S); }
int64_t ring(int64_t row0, int64_t i, int64_t S) { return ring_row(row0, i, S); }
bool rope_ok(int64_t p, int64_t max_pos) { return rope_position_ok(p, max_pos); }
int64_t head_kind(int64_t hh, int64_t H, int64_t Hkv) { return qkv_head_kind(hh, H, Hkv); }
int64_t active_splits(int64_t n, int64_t chunk) { return decode_active_splits(n, chunk); }
std::vector<int64_t> split_range(int64_t s, int64_t chunk, int64_t n) {
  return {split_begin(s, chunk), split_end(s, chunk, n)};
}
int64_t key_tiles(int64_t first, int64_t last) { return prefill_key_tiles(first, last); }
bool needs_mask(int64_t tile_first, int64_t first_max, int64_t last_min) {
  return prefill_tile_needs_mask(tile_first, first_max, last_min);
}
bool warp_skips(int64_t tile_first, int64_t first_min, int64_t last_max) {
  return prefill_warp_skips_tile(tile_first, first_min, last_max);
}
std::vector<int64_t> constants() {
  return {kPrefillRows, kPrefillKeys, kPrefillWarps, kSmemPad, kDecodeKeyAlign, kDecodeMaxSplits};
}
std::vector<int64_t> prefill_smem(int64_t D) {  // rows of Q, of K and V per stage, and the bytes
  return {prefill_q_row(), prefill_k_row(0), prefill_v_row(0), prefill_k_row(1), prefill_v_row(1),
          prefill_smem_bytes(D)};
}
// Per lane: a_row, a_col, k_row, k_col, v_row, v_col, then c_row(i), c_col(i) for i = 0..3.
std::vector<int64_t> lane_maps() {
  std::vector<int64_t> r;
  for (int lane = 0; lane < 32; ++lane) {
    for (int v : {ldsm_a_row(lane), ldsm_a_col(lane), ldsm_k_row(lane), ldsm_k_col(lane), ldsm_v_row(lane),
                  ldsm_v_col(lane)}) r.push_back(v);
    for (int i = 0; i < 4; ++i) { r.push_back(mma_c_row(lane, i)); r.push_back(mma_c_col(lane, i)); }
  }
  return r;
}
int64_t smem_off(int64_t row, int64_t col, int64_t D) { return smem_offset(row, col, D); }
"""
_PLAN_FUNCS = ["plan", "visible", "row_of", "ring", "rope_ok", "head_kind", "active_splits", "split_range", "key_tiles",
               "needs_mask", "warp_skips", "constants", "lane_maps", "smem_off", "prefill_smem"]


@pytest.fixture(scope="module")
def hp():
    """attention_plan.h compiled by g++ into a small Python module (cached by torch between runs)."""
    from torch.utils.cpp_extension import load_inline

    return load_inline(name="tinychat_attention_plan_test", cpp_sources=[_PLAN_SRC], functions=_PLAN_FUNCS,
                       extra_include_paths=[str(ROOT / "csrc")], extra_cflags=["-O1"], verbose=False)


def test_positions_and_heads(hp):
    S = 10
    # window 0: positions 0 .. p (a negative p counts as 0; past the cache, the latest S positions: every row once)
    assert [hp.visible(p, 0, S) for p in (-5, 0, 3, 9, 10, 99)] == [[0, 1], [0, 1], [0, 4], [0, 10], [1, 10],
                                                                   [90, 10]]
    # a window: max(0, p - window + 1) .. p, at most S positions
    assert [hp.visible(p, 3, S) for p in (-1, 0, 1, 2, 3, 57)] == [[0, 1], [0, 1], [0, 2], [0, 3], [1, 3], [55, 3]]
    assert [hp.visible(p, 1, S) for p in (0, 5, 99)] == [[0, 1], [5, 1], [99, 1]]
    assert [hp.visible(p, 25, S) for p in (4, 30)] == [[0, 5], [21, 10]]  # a ring shorter than the window
    assert [hp.row_of(p, S) for p in (0, 9, 10, 23)] == [0, 9, 0, 3]
    assert [hp.ring(7, i, S) for i in range(5)] == [7, 8, 9, 0, 1]
    for p in range(40):  # the keys of a query: its positions, in ascending order, at their rows, each row once
        for window in (0, 1, 4, 10, 13):
            first, n = hp.visible(p, window, S)
            rows = [hp.ring(hp.row_of(first, S), i, S) for i in range(n)]
            assert rows == [(first + i) % S for i in range(n)] and len(set(rows)) == n
            assert first + n - 1 == p and n == min(p + 1, window or p + 1, S)
    # rope_kv_write: any position with a cos_sin row (the cache row is p % S)
    assert [hp.rope_ok(p, 8) for p in (-1, 0, 7, 8, 9)] == [False, True, True, False, False]
    H, Hkv = 6, 2
    assert [hp.head_kind(h, H, Hkv) for h in range(H + 2 * Hkv)] == [0] * 6 + [1] * 2 + [2] * 2


@pytest.mark.parametrize("S", [1, 7, 64, 100, 257, 1023, 4097, 8192, 32768, 131072])
def test_decode_plan(hp, S):
    max_splits = hp.constants()[5]
    for rows in (1, 3, 32):
        for hkv in (1, 8, 32):
            for group in (1, 2, 3, 4, 7, 8, 12, 16):
                for sms in (1, 108, 132):
                    hpb, hb, splits, chunk = hp.plan(rows, hkv, group, S, sms)
                    assert hpb in (1, 2, 4, 8) and hb * hpb >= group and (hb - 1) * hpb < group
                    assert hpb >= min(group, 8)
                    assert chunk % 64 == 0 and chunk > 0
                    assert 1 <= splits <= max_splits
                    assert splits * chunk >= S and (splits - 1) * chunk < S  # every split holds a cache row
                    if splits > 1:  # no more splits than needed to fill the GPU
                        assert rows * hkv * hb * (splits - 1) < 4 * sms
                    if rows * hkv * hb * splits < sms:  # a grid that leaves SMs idle has one split per 64 keys
                        assert chunk == 64 or splits == max_splits
    # graph stability: nothing depends on the runtime length; a length's chunks tile [0, n) exactly
    hpb, hb, splits, chunk = hp.plan(1, 8, 4, S, 132)
    for n in sorted({1, 2, S // 2 + 1, S}):
        act = hp.active_splits(n, chunk)
        assert 1 <= act <= splits
        covered = []
        for s in range(splits):
            b, e = hp.split_range(s, chunk, n)
            if s < act:
                assert b < e
                covered += range(b, e)
            else:
                assert b >= n  # the kernel's block exits at once
        assert covered == list(range(n))


@pytest.mark.parametrize("D", [64, 128])
def test_prefill_smem_layout(hp, D):
    """The prefill block's shared memory: 4 disjoint K/V tiles (stage 0 and 1), Q inside stage 1's K slot (read into
    registers before tile 1 is loaded there), 16-byte aligned rows, and for D = 128 small enough that two blocks fit
    in an A100's 164 KB per SM (1 KB of it reserved per block)."""
    rows, keys = hp.constants()[0], hp.constants()[1]
    q, k0, v0, k1, v1, nbytes = hp.prefill_smem(D)
    row_bytes = (D + hp.constants()[3]) * 2
    assert row_bytes % 16 == 0
    slots = sorted([k0, v0, k1, v1])
    assert slots == [0, keys, 2 * keys, 3 * keys] and nbytes == 4 * keys * row_bytes
    assert q == k1 and q + rows <= k1 + keys
    assert 2 * (nbytes + 16 + 1024) <= 164 * 1024  # + the kernel's 16 bytes of static shared memory


def _attention_exact(q, k, v, positions, scale, window=0):
    """fp64 attention by positions: query t sees positions max(0, p_t - window + 1) .. p_t (window 0: from 0) at rows
    j % S, at most the latest S of them (the CUDA kernels' convention); written out here so that the CPU tests need
    neither tinychat._C nor tinychat.ops."""
    H, S = q.shape[2], k.shape[2]
    rep = H // k.shape[1]
    kk, vv = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = scale * q.double().transpose(1, 2) @ kk.transpose(-1, -2)  # [B, H, T, S]
    last = positions.clamp(min=0)[:, None]  # [T, 1]
    held = last - (last - torch.arange(S)[None, :]) % S  # [T, S]: the latest position <= p_t at row r
    visible = held >= ((last - window + 1).clamp(min=0) if window > 0 else 0)
    return (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ vv).transpose(1, 2)


@pytest.mark.parametrize("window", [0, 1, 3, 130, 5000])
def test_split_kv_simulation(hp, window):
    """The split-KV algorithm with the kernel's plan, log2-domain partials and combine, in fp64 on the CPU; keys
    by position from visible_range, read at their ring rows."""
    torch.manual_seed(0)
    B, T, Hkv, group, D, S = 2, 3, 2, 3, 16, 1000
    H = Hkv * group
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    positions = torch.tensor([0, 700, S + 50])  # S + 50: the ring's latest positions
    scale = D ** -0.5
    hpb, hb, splits, chunk = hp.plan(B * T, Hkv, group, S, 4)
    assert splits > 1
    out = torch.empty(B, T, H, D, dtype=torch.float64)
    log2e = 1 / math.log(2)
    for b in range(B):
        for t in range(T):
            first, n = hp.visible(int(positions[t]), window, S)
            rows = torch.tensor([hp.ring(hp.row_of(first, S), i, S) for i in range(n)])  # key i's row
            for h in range(H):
                kvh = h // group
                parts = []
                for s in range(splits):
                    lo, hi = hp.split_range(s, chunk, n)
                    if lo >= n:
                        continue
                    sc = (q[b, t, h].double() * scale * log2e) @ k[b, kvh, rows[lo:hi]].double().T
                    m = sc.max()
                    p = torch.exp2(sc - m)
                    parts.append((m, p.sum(), p @ v[b, kvh, rows[lo:hi]].double()))
                assert len(parts) == hp.active_splits(n, chunk)
                M = max(m for m, _, _ in parts)
                L = sum(l * torch.exp2(m - M) for m, l, _ in parts)
                A = sum(a * torch.exp2(m - M) for m, _, a in parts)
                out[b, t, h] = A / L
    torch.testing.assert_close(out, _attention_exact(q, k, v, positions, scale, window))


@pytest.mark.parametrize("window", [0, 1, 50, 64, 200])
@pytest.mark.parametrize("T,start", [(1, 0), (17, 0), (256, 0), (1000, 0), (17, 100), (256, 1023), (200, 37)])
def test_prefill_tile_schedule(hp, T, start, window):
    """Every position a row sees lies in a tile its block loads and its warp computes, and a tile left unmasked is
    fully visible to every valid row of the warp (tiles over positions, from the block's first visible one)."""
    rows, keys, warps = hp.constants()[:3]
    S = start + T + 5
    positions = list(range(start, start + T))
    if T > 1:  # out-of-order and duplicated positions, and one past the cache (the latest S positions)
        positions[1], positions[-1] = positions[-1], positions[1]
        positions[0] = S + 3
    spans = []  # [first, last] of each row
    for p in positions:
        first, n = hp.visible(p, window, S)
        spans.append((first, first + n - 1))
    for t0 in range(0, T, rows):
        block = spans[t0:t0 + rows]
        bfirst, blast = min(f for f, _ in block), max(e for _, e in block)
        n_tiles = hp.key_tiles(bfirst, blast)
        assert n_tiles * keys >= blast - bfirst + 1 and (n_tiles - 1) * keys < blast - bfirst + 1
        for w in range(warps):
            wrows = spans[t0 + 16 * w:min(t0 + 16 * w + 16, T)]
            first_min = min((f for f, _ in wrows), default=2**62)
            last_max = max((e for _, e in wrows), default=-2**62)
            first_max = max((f for f, _ in wrows), default=-2**62)
            last_min = min((e for _, e in wrows), default=2**62)
            for tile in range(n_tiles):
                lo = bfirst + tile * keys
                hi = lo + keys - 1  # the tile's positions [lo, hi]
                seen = [max(f, lo) <= min(e, hi) for f, e in wrows]  # rows that see part of the tile
                if hp.warp_skips(lo, first_min, last_max):
                    assert not any(seen)
                elif not hp.needs_mask(lo, first_max, last_min):
                    assert all(f <= lo and hi <= e for f, e in wrows)
                else:
                    assert any(not (f <= lo and hi <= e) for f, e in wrows)


def _ldmatrix(smem, addrs, trans):
    """PTX ldmatrix.x4 (b16): lanes 8i..8i+7 give the rows of matrix i; returns regs[lane][i] = 2 elements."""
    mats = [torch.stack([smem[r, c:c + 8] for r, c in addrs[8 * i:8 * i + 8]]) for i in range(4)]
    regs = []
    for lane in range(32):
        g, c = lane // 4, lane % 4
        if trans:
            regs.append([(m[2 * c, g], m[2 * c + 1, g]) for m in mats])
        else:
            regs.append([(m[g, 2 * c], m[g, 2 * c + 1]) for m in mats])
    return regs


def _mma(a_regs, b_regs):
    """PTX mma.m16n8k16 (row.col): A [16, 16] and B [16, 8] rebuilt from the lanes' fragments; returns C [16, 8]
    and per lane the 4 accumulator elements in fragment order."""
    A, Bm = torch.zeros(16, 16, dtype=torch.float64), torch.zeros(16, 8, dtype=torch.float64)
    for lane in range(32):
        g, c = lane // 4, lane % 4
        for i, (r, col) in enumerate([(g, 2 * c), (g + 8, 2 * c), (g, 2 * c + 8), (g + 8, 2 * c + 8)]):
            A[r, col], A[r, col + 1] = a_regs[lane][i]
        for i, k in enumerate([2 * c, 2 * c + 8]):
            Bm[k, g], Bm[k + 1, g] = b_regs[lane][i]
    C = A @ Bm
    frag = [[C[g, 2 * c], C[g, 2 * c + 1], C[g + 8, 2 * c], C[g + 8, 2 * c + 1]]
            for g, c in ((lane // 4, lane % 4) for lane in range(32))]
    return C, frag


def test_mma_fragment_maps(hp):
    """The prefill kernel's ldmatrix addresses and the reuse of the score accumulators as the A operand of P V
    compute Q K^T and P V for one 16-row slice, modelled on the PTX fragment layouts."""
    torch.manual_seed(0)
    maps = torch.tensor(hp.lane_maps()).view(32, 14)
    a_addr = [(int(maps[l, 0]), int(maps[l, 1])) for l in range(32)]
    k_addr = [(int(maps[l, 2]), int(maps[l, 3])) for l in range(32)]
    v_addr = [(int(maps[l, 4]), int(maps[l, 5])) for l in range(32)]
    c_pos = [[(int(maps[l, 6 + 2 * i]), int(maps[l, 7 + 2 * i])) for i in range(4)] for l in range(32)]
    D, NK = 32, 32  # two k-steps of Q K^T; two key slices of P V
    Q, K, V = torch.randn(16, D).double(), torch.randn(NK, D).double(), torch.randn(NK, D).double()

    # S = Q K^T: for each k-step, ldmatrix.x4 of Q (A) and of 16 keys (B of two n-tiles).
    S = torch.zeros(16, NK, dtype=torch.float64)
    s_frag = {}  # n-tile -> per-lane accumulators
    for ks in range(D // 16):
        qa = _ldmatrix(Q, [(r, ks * 16 + c) for r, c in a_addr], trans=False)
        for np_ in range(NK // 16):
            kb = _ldmatrix(K, [(np_ * 16 + r, ks * 16 + c) for r, c in k_addr], trans=False)
            for half in range(2):
                C, frag = _mma(qa, [[kb[l][2 * half], kb[l][2 * half + 1]] for l in range(32)])
                nt = 2 * np_ + half
                S[:, nt * 8:nt * 8 + 8] += C
                prev = s_frag.get(nt, [[0.0] * 4 for _ in range(32)])
                s_frag[nt] = [[prev[l][i] + frag[l][i] for i in range(4)] for l in range(32)]
    torch.testing.assert_close(S, Q @ K.T)
    for nt, frag in s_frag.items():  # the kernel's (row, col) of each accumulator element (masking uses them)
        for lane in range(32):
            for i in range(4):
                r, c = c_pos[lane][i]
                assert float(frag[lane][i]) == pytest.approx(float(S[r, nt * 8 + c]))

    # O = P V with P taken from the score accumulators (n-tiles 2kk, 2kk + 1 -> A of key slice kk).
    O = torch.zeros(16, D, dtype=torch.float64)
    for kk in range(NK // 16):
        f0, f1 = s_frag[2 * kk], s_frag[2 * kk + 1]
        pa = [[(f0[l][0], f0[l][1]), (f0[l][2], f0[l][3]), (f1[l][0], f1[l][1]), (f1[l][2], f1[l][3])]
              for l in range(32)]
        for dp in range(D // 16):
            vb = _ldmatrix(V, [(kk * 16 + r, dp * 16 + c) for r, c in v_addr], trans=True)
            for half in range(2):
                C, _ = _mma(pa, [[vb[l][2 * half], vb[l][2 * half + 1]] for l in range(32)])
                nt = 2 * dp + half
                O[:, nt * 8:nt * 8 + 8] += C
    torch.testing.assert_close(O, S @ V)


def test_smem_rows_conflict_free(hp):
    """Padded shared-memory rows: 16-byte aligned, and the 8 row addresses of one ldmatrix phase hit 8 disjoint
    groups of 4 banks."""
    for D in (64, 128):
        offs = [hp.smem_off(r, 0, D) * 2 for r in range(8)]  # bytes (16-bit elements)
        assert all(o % 16 == 0 for o in offs)
        banks = {(o // 4) % 32 // 4 for o in offs}
        assert len(banks) == 8


# ---------------------------------------------------------------- CUDA kernels


@pytest.fixture(scope="module")
def tc():
    from tinychat import ops

    assert ops.EXTENSION_AVAILABLE, "tinychat._C is not built"
    import tinychat._C

    assert tinychat._C.WITH_CUDA == 1, "tinychat._C was built without its CUDA kernels"
    return torch.ops.tinychat


def _err_bound_check(out, exact, naive, atol):
    err = (out.float() - exact.float()).abs().max().item()
    err_naive = (naive.float() - exact.float()).abs().max().item()
    assert err <= 2 * err_naive + atol, (err, err_naive)


def _cos_sin(max_pos, D, device):
    inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D)
    ang = torch.arange(max_pos, dtype=torch.float32, device=device)[:, None] * inv[None]
    return torch.cat((ang.cos(), ang.sin()), dim=-1).contiguous()


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (6, 2), (8, 2), (16, 2)])
@pytest.mark.parametrize("B,T,start", [(1, 1, 0), (2, 1, 40), (1, 17, 0), (2, 17, 30)])
def test_rope_kv_write(tc, dtype, D, H, Hkv, B, T, start):
    from tinychat.ops import rope_kv_write_ref

    dev = "cuda"
    S = 64
    qkv_wide = torch.randn(B, T, H + 2 * Hkv + 1, D, device=dev).to(dtype)
    qkv = qkv_wide[:, :, 1:]  # a strided view: the kernel takes any strides but the last
    positions = torch.arange(start, start + T, device=dev)
    cos_sin = _cos_sin(80, D, dev)
    k0 = torch.randn(B, Hkv, S, D, device=dev).to(dtype)
    v0 = torch.randn(B, Hkv, S, D, device=dev).to(dtype)
    k, v, k_ref, v_ref = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    q = tc.rope_kv_write(qkv, positions, cos_sin, k, v)
    q_ref = rope_kv_write_ref(qkv, positions, cos_sin, k_ref, v_ref)
    assert q.shape == (B, T, H, D) and q.is_contiguous() and q.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(k, k_ref, **tol)
    assert torch.equal(v, v_ref)  # copied
    untouched = torch.ones(S, dtype=torch.bool, device=dev)
    untouched[positions] = False
    assert torch.equal(k[:, :, untouched], k0[:, :, untouched])
    assert torch.equal(v[:, :, untouched], v0[:, :, untouched])


@needs_cuda
@pytest.mark.cuda
def test_rope_kv_write_skips_bad_positions(tc):
    dev, D, H, Hkv, S = "cuda", 64, 4, 2, 16
    qkv = torch.randn(1, 3, H + 2 * Hkv, D, device=dev, dtype=torch.float16)
    positions = torch.tensor([2, S + 5, -1], device=dev)  # the last two are out of range: not checked on the host
    cos_sin = _cos_sin(S, D, dev)
    k0 = torch.randn(1, Hkv, S, D, device=dev, dtype=torch.float16)
    v0 = torch.randn_like(k0)
    k, v = k0.clone(), v0.clone()
    q = tc.rope_kv_write(qkv, positions, cos_sin, k, v)
    assert torch.isnan(q[:, 1:]).all() and not torch.isnan(q[:, 0]).any()
    keep = torch.arange(S, device=dev) != 2
    assert torch.equal(k[:, :, keep], k0[:, :, keep]) and torch.equal(v[:, :, keep], v0[:, :, keep])


# gated activation op -> its function in x's dtype, through torch
GATED = {"silu_and_mul": lambda g, u: torch.nn.functional.silu(g) * u,
         "gelu_tanh_and_mul": lambda g, u: torch.nn.functional.gelu(g, approximate="tanh") * u}


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("shape", [(1, 2 * 11008), (3, 5, 2 * 64), (4, 2 * 7), (2, 2 * 1)])
@pytest.mark.parametrize("act", sorted(GATED))
def test_gated_activation(tc, dtype, shape, act):
    from tinychat import ops

    reference = getattr(ops, f"{act}_ref")
    x = (3 * torch.randn(*shape, device="cuda")).to(dtype)
    out = getattr(tc, act)(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.is_contiguous() and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, reference(x), atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(out, reference(x))
        _err_bound_check(out, reference(x.float()), GATED[act](*x.chunk(2, dim=-1)), atol=1e-6)
    # rows with a stride (a slice of a wider tensor) take the same kernel
    wide = torch.randn(*shape[:-1], shape[-1] + 8, device="cuda").to(dtype)
    xs = wide[..., :shape[-1]]
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(getattr(tc, act)(xs), reference(xs), **tol)
    extremes = torch.tensor([[-1e30, -1000.0, -20.0, 0.0, 20.0, 1000.0] + [2.0] * 6], device="cuda")
    torch.testing.assert_close(getattr(tc, act)(extremes), reference(extremes), atol=1e-6, rtol=1e-6)


@needs_cuda
@pytest.mark.cuda
def test_rope_kv_write_ring(tc):
    """Position p lands at cache row p % S, as in the reference (a ring of 5 rows, positions wrapping it)."""
    from tinychat.ops import rope_kv_write_ref

    dev, D, H, Hkv = "cuda", 64, 4, 2
    qkv = torch.randn(2, 5, H + 2 * Hkv, D, device=dev, dtype=torch.float16)
    positions = torch.arange(13, 18, device=dev)  # rows 3, 4, 0, 1, 2
    cos_sin = _cos_sin(32, D, dev)
    k, v = torch.zeros(2, Hkv, 5, D, device=dev, dtype=torch.float16), torch.zeros(2, Hkv, 5, D, device=dev,
                                                                                   dtype=torch.float16)
    k_ref, v_ref = k.clone(), v.clone()
    q = tc.rope_kv_write(qkv, positions, cos_sin, k, v)
    torch.testing.assert_close(q, rope_kv_write_ref(qkv, positions, cos_sin, k_ref, v_ref))
    torch.testing.assert_close(k, k_ref)
    assert torch.equal(v, v_ref)
    assert torch.equal(v[:, :, 3], qkv[:, 0, H + Hkv:]) and torch.equal(v[:, :, 0], qkv[:, 2, H + Hkv:])


def _naive_band_attention(q, k, v, positions, scale, window):
    """Attention with every step in q.dtype over a plain cache, query t seeing positions max(0, p_t - window + 1) ..
    p_t: the low-precision torch baseline of a sliding window."""
    rep = q.shape[2] // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q.transpose(1, 2) @ kk.transpose(-1, -2)) * scale  # [B, H, T, L]
    j = torch.arange(k.shape[2], device=q.device)[None, :]
    visible = (j <= positions[:, None]) & (j > positions[:, None] - window)
    return (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ vv).transpose(1, 2)


def _ring_of(full, S, upto):
    """The ring cache of S rows after positions 0 .. upto - 1 of `full` [B, Hkv, L, D] were written in order."""
    ring = torch.full((*full.shape[:2], S, full.shape[3]), float("nan"), dtype=full.dtype, device=full.device)
    for j in range(max(0, upto - S), upto):
        ring[:, :, j % S] = full[:, :, j]
    return ring


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("T,start,window", [(1, 0, 1), (1, 500, 3), (1, 4000, 1000), (3, 77, 64), (17, 0, 5),
                                            (100, 300, 70), (256, 1000, 512), (300, 0, 4096)])
def test_attention_window_and_ring(tc, dtype, D, T, start, window):
    """A sliding window over a plain cache (unwritten rows NaN) and over a ring of window + T - 1 rows (position j
    at row j % S, wrapped): both match the reference on the plain cache (fp32 math; low precision within twice the
    error of plain torch in that dtype). Decode, multi-token decode and the tensor-core prefill (T > 4 in fp16 /
    bf16), the tuned head dims and the ATen fallback (256)."""
    from tinychat.ops import attention_ref

    dev, B, H, Hkv = "cuda", 2, 8, 2
    L = start + T
    q = torch.randn(B, T, H, D, device=dev).to(dtype)
    k = torch.randn(B, Hkv, L, D, device=dev).to(dtype)
    v = torch.randn(B, Hkv, L, D, device=dev).to(dtype)
    positions = torch.arange(start, L, device=dev)
    scale = D ** -0.5
    exact = attention_ref(q.float(), k.float(), v.float(), positions, scale, window)
    plain_k = torch.cat([k, torch.full_like(k[:, :, :40], float("nan"))], 2)  # rows past the positions: NaN
    plain_v = torch.cat([v, torch.full_like(v[:, :, :40], float("nan"))], 2)
    S = window + T - 1
    for kc, vc in ((plain_k, plain_v), (_ring_of(k, S, L), _ring_of(v, S, L))):
        out = tc.attention(q, kc, vc, positions, scale, window)
        assert out.shape == (B, T, H, D) and out.dtype == dtype and not torch.isnan(out).any()
        if dtype == torch.float32:
            torch.testing.assert_close(out, exact, atol=2e-5, rtol=1e-4)
        else:
            _err_bound_check(out, exact, _naive_band_attention(q, k, v, positions, scale, window), atol=1e-4)


@needs_cuda
@pytest.mark.cuda
def test_attention_ring_written_by_rope_kv_write(tc):
    """A sliding-window layer over a ring of window + chunk - 1 rows, written by rope_kv_write in prefill chunks
    and decode steps while the sequence wraps the ring several times: each call matches the reference over a full
    cache."""
    from tinychat.ops import attention_ref

    dev, dtype, H, Hkv, D, window, chunk = "cuda", torch.float16, 8, 2, 128, 70, 100
    S = window + chunk - 1
    L = 4 * S + 7
    qkv = torch.randn(1, L, H + 2 * Hkv, D, device=dev).to(dtype)
    cos_sin = _cos_sin(L, D, dev)
    k_ring, v_ring = (torch.zeros(1, Hkv, S, D, device=dev, dtype=dtype) for _ in range(2))
    k_full, v_full = (torch.zeros(1, Hkv, L, D, device=dev, dtype=dtype) for _ in range(2))
    bounds = list(range(0, 3 * S, chunk)) + list(range(3 * S, L + 1))
    for a, b in zip(bounds, bounds[1:]):
        positions = torch.arange(a, b, device=dev)
        q = tc.rope_kv_write(qkv[:, a:b], positions, cos_sin, k_ring, v_ring)
        tc.rope_kv_write(qkv[:, a:b], positions, cos_sin, k_full, v_full)
        out = tc.attention(q, k_ring, v_ring, positions, D ** -0.5, window)
        exact = attention_ref(q.float(), k_full.float(), v_full.float(), positions, D ** -0.5, window)
        torch.testing.assert_close(out.float(), exact, atol=2e-3, rtol=2e-2)


def _naive_attention(q, k, v, positions, scale):
    """Attention with every step in q.dtype (scores, softmax, P V), the low-precision torch baseline."""
    H, S = q.shape[2], k.shape[2]
    rep = H // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q.transpose(1, 2) @ kk.transpose(-1, -2)) * scale
    visible = torch.arange(S, device=q.device)[None, :] <= positions.clamp(0, S - 1)[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (probs @ vv).transpose(1, 2)


def _run_attention(tc, dtype, B, T, H, Hkv, D, S, positions, poison=True):
    """Random q and caches; cache rows past the largest position are NaN (unwritten rows must never be read).
    Checks the kernel against fp32 math and the low-precision baseline; returns the output."""
    dev = "cuda"
    q = torch.randn(B, T, H, D, device=dev).to(dtype)
    k = torch.randn(B, Hkv, S, D, device=dev).to(dtype)
    v = torch.randn(B, Hkv, S, D, device=dev).to(dtype)
    last = int(positions.clamp(0, S - 1).max())
    if poison and last + 1 < S:
        k[:, :, last + 1:] = float("nan")
        v[:, :, last + 1:] = float("nan")
    kc, vc = k.clone(), v.clone()
    kc[:, :, last + 1:] = 0  # the references multiply masked rows by 0
    vc[:, :, last + 1:] = 0
    scale = D ** -0.5
    out = tc.attention(q, k, v, positions, scale)
    assert out.shape == (B, T, H, D) and out.dtype == dtype and out.is_contiguous()
    assert not torch.isnan(out).any()
    from tinychat.ops import attention_ref

    exact = attention_ref(q.float(), kc.float(), vc.float(), positions.clamp(0, S - 1), scale)
    if dtype == torch.float32:
        torch.testing.assert_close(out, exact, atol=2e-5, rtol=1e-4)
    else:
        _err_bound_check(out, exact, _naive_attention(q, kc, vc, positions, scale), atol=1e-4)
    return out


GQA = [(8, 8), (12, 4), (16, 4), (32, 4)]  # ratios 1, 3, 4, 8


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H,Hkv", GQA)
@pytest.mark.parametrize("L", [1, 7, 100, 1023, 4097, 8192])
def test_attention_decode(tc, dtype, D, H, Hkv, L):
    S = L + 300  # allocated beyond the length: the split plan follows S, the work follows the position
    _run_attention(tc, dtype, 1, 1, H, Hkv, D, S, torch.tensor([L - 1], device="cuda"))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("B,T", [(2, 1), (1, 2), (3, 4)])
def test_attention_decode_batched_and_multi_token(tc, dtype, B, T):
    S, L = 3000, 2500
    _run_attention(tc, dtype, B, T, 16, 4, 128, S, torch.arange(L - T, L, device="cuda"))


@needs_cuda
@pytest.mark.cuda
def test_attention_position_past_cache_is_clamped(tc):
    S = 500
    _run_attention(tc, torch.float16, 1, 1, 8, 2, 64, S, torch.tensor([S + 77], device="cuda"), poison=False)
    _run_attention(tc, torch.float16, 1, 20, 8, 2, 64, S, torch.arange(S - 10, S + 10, device="cuda"), poison=False)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H,Hkv", GQA)
@pytest.mark.parametrize("T,start", [(5, 0), (17, 0), (256, 0), (1000, 0), (17, 100), (256, 1023), (1000, 4097)])
def test_attention_prefill(tc, dtype, D, H, Hkv, T, start):
    S = start + T + 64 + 13  # unwritten rows past the chunk are NaN
    B = 2 if T <= 256 else 1
    _run_attention(tc, dtype, B, T, H, Hkv, D, S, torch.arange(start, start + T, device="cuda"))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("D", [16, 48, 96, 256])
@pytest.mark.parametrize("T,start", [(1, 99), (3, 50), (37, 0), (37, 60)])
def test_attention_other_head_dims(tc, dtype, D, T, start):
    """Head dims without a tuned kernel (a small test model's 16, Gemma 3's 256) run the same function on the
    device; unwritten cache rows (NaN) are never mixed in."""
    S = start + T + 20
    _run_attention(tc, dtype, 2, T, 6, 2, D, S, torch.arange(start, start + T, device="cuda"))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_attention_prefill_unordered_positions(tc, dtype):
    """Positions need not be sorted: each query row gets its own causal limit."""
    T, S = 150, 400
    positions = torch.randperm(S, device="cuda")[:T]
    _run_attention(tc, dtype, 1, T, 8, 2, 128, S, positions, poison=False)


@needs_cuda
@pytest.mark.cuda
def test_attention_fp32_prefill(tc):
    _run_attention(tc, torch.float32, 1, 100, 8, 2, 64, 300, torch.arange(50, 150, device="cuda"))


@needs_cuda
@pytest.mark.cuda
def test_attention_strided_q(tc):
    """q as a view of the fused projection (strided heads) gives the same result as a contiguous copy."""
    B, T, H, Hkv, D, S = 1, 33, 8, 2, 128, 100
    qkv = torch.randn(B, T, H + 2 * Hkv, D, device="cuda", dtype=torch.float16)
    q = qkv[:, :, :H]
    k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    pos = torch.arange(T, device="cuda")
    for t in (T, 1):
        assert torch.equal(tc.attention(q[:, :t], k, v, pos[:t], 0.1), tc.attention(q[:, :t].contiguous(), k, v,
                                                                                    pos[:t], 0.1))


def _misaligned(t):
    """A contiguous copy of t whose data starts one element past a 16-byte boundary (as a view carved out of a
    larger buffer would): contiguous() leaves such a view as it is, so 16-byte loads would fault on it."""
    flat = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("T", [1, 33])
@pytest.mark.parametrize("which", ["q", "k", "v", "all"])
def test_attention_misaligned_views(tc, dtype, T, which):
    """Contiguous views starting off a 16-byte boundary are copied to aligned buffers: same output as aligned
    inputs (on every path that does 16-byte loads), and the CUDA context survives."""
    B, H, Hkv, D, S = 1, 8, 2, 128, 100
    q = torch.randn(B, T, H, D, device="cuda").to(dtype)
    k = torch.randn(B, Hkv, S, D, device="cuda").to(dtype)
    v = torch.randn_like(k)
    pos = torch.arange(S - T, S, device="cuda")
    want = tc.attention(q, k, v, pos, 0.1)
    args = {"q": q, "k": k, "v": v}
    for name in ("q", "k", "v") if which == "all" else (which,):
        args[name] = _misaligned(args[name])
    got = tc.attention(args["q"], args["k"], args["v"], pos, 0.1)
    torch.cuda.synchronize()
    assert torch.equal(got, want)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", LOW)
def test_decode_step_cuda_graph(tc, dtype):
    """rope_kv_write + decode attention captured once in a CUDA graph, replayed with new positions and inputs in
    static buffers: the same results as eager calls."""
    dev, B, H, Hkv, D, S = "cuda", 1, 32, 8, 128, 4096
    cos_sin = _cos_sin(S, D, dev)
    k = torch.randn(B, Hkv, S, D, device=dev).to(dtype)
    v = torch.randn(B, Hkv, S, D, device=dev).to(dtype)
    qkv = torch.randn(B, 1, H + 2 * Hkv, D, device=dev).to(dtype)
    pos = torch.zeros(1, dtype=torch.long, device=dev)
    scale = D ** -0.5
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        tc.attention(tc.rope_kv_write(qkv, pos, cos_sin, k, v), k, v, pos, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = tc.attention(tc.rope_kv_write(qkv, pos, cos_sin, k, v), k, v, pos, scale)
    for p in (0, 1, 99, 1000, 4095, 17):
        qkv.copy_(torch.randn_like(qkv))
        pos.fill_(p)
        k_eager, v_eager = k.clone(), v.clone()
        graph.replay()
        q_e = tc.rope_kv_write(qkv, pos, cos_sin, k_eager, v_eager)
        expected = tc.attention(q_e, k_eager, v_eager, pos, scale)
        torch.cuda.synchronize()
        assert torch.equal(out, expected), p
        assert torch.equal(k, k_eager) and torch.equal(v, v_eager)


@needs_cuda
@pytest.mark.cuda
def test_errors(tc):
    dev = "cuda"
    q = torch.randn(1, 2, 8, 64, device=dev, dtype=torch.float16)
    k = torch.randn(1, 2, 16, 64, device=dev, dtype=torch.float16)
    pos = torch.arange(2, device=dev)
    with pytest.raises(RuntimeError, match="dtype"):
        tc.attention(q, k.bfloat16(), k.bfloat16(), pos, 1.0)
    with pytest.raises(RuntimeError, match=r"must be \[1, Hkv, S, 96\]"):  # q's head dim is not the caches'
        q96 = torch.randn(1, 2, 8, 96, device=dev).half()
        tc.attention(q96, k, k, pos, 1.0)
    with pytest.raises(RuntimeError, match="multiple"):
        k3 = torch.randn(1, 3, 16, 64, device=dev).half()
        tc.attention(q, k3, k3, pos, 1.0)
    with pytest.raises(RuntimeError, match="int64"):
        tc.attention(q, k, k, pos.int(), 1.0)
    with pytest.raises(RuntimeError):
        tc.attention(q, k, k, pos.cpu(), 1.0)  # mismatched devices
    with pytest.raises(RuntimeError):
        tc.attention(q, k, k[:, :, :8], pos, 1.0)  # v's shape differs
    with pytest.raises(RuntimeError):
        tc.attention(q[0], k, k, pos, 1.0)  # 3-d q
    with pytest.raises(RuntimeError):
        tc.attention(q.to(torch.int32), k, k, pos, 1.0)

    qkv = torch.randn(1, 2, 8 + 4, 64, device=dev, dtype=torch.float16)
    cs = _cos_sin(16, 64, dev)
    with pytest.raises(RuntimeError):
        tc.rope_kv_write(qkv, pos, cs, k.float(), k.float())  # cache dtype
    with pytest.raises(RuntimeError):
        tc.rope_kv_write(qkv, pos, cs.half(), k.clone(), k.clone())  # cos_sin dtype
    with pytest.raises(RuntimeError):
        tc.rope_kv_write(qkv[:, :, :11], pos, cs, k.clone(), k.clone())  # heads != H + 2 Hkv with H % Hkv == 0
    with pytest.raises(RuntimeError):
        tc.rope_kv_write(qkv, pos.cpu(), cs, k.clone(), k.clone())

    with pytest.raises(RuntimeError, match="even"):
        tc.silu_and_mul(torch.randn(3, 7, device=dev))
    with pytest.raises(RuntimeError):
        tc.silu_and_mul(torch.ones(3, 8, device=dev, dtype=torch.int32))
