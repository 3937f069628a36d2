"""The CUDA kernels of int4_linear (csrc/cuda/int4_linear.cu) against the PyTorch reference, and the layout helpers
they are built on (csrc/common/int4_layout.h).

test_layout_helpers* compile the header with the host compiler (torch.utils.cpp_extension.load_inline, cached in a
temporary folder) and run everywhere. The CUDA tests skip without a GPU, and FAIL on a GPU machine whose
tinychat._C was built without its CUDA kernels.

Weights: random groups quantized by ggml's Q4_1 recipe (fp32 or fp16 scales and offsets, the offsets non-integer
multiples of the scales) or Q4_0's (scales only, m = -8 s; some scales negative), or random codes with random K-quant
superblocks (uint8 [N, K/256, 20]: s = d * sc, m = -(dmin * mn), group size 32), see `weights`.

Error bound of the fp16/bf16 kernels (as FlashAttention's tests): max |out - exact| <= 2 * max |naive - exact|, where
exact is the fp32 reference (int4_linear_ref on fp32 x) and naive the same product done by plain torch in x's dtype
(x @ W.to(x.dtype).T with W dequantized in fp32); with a floor of one ulp of the largest output, for shapes with
few outputs (as tests/test_ops.py's check_close). test_offsets_in_fp32 and test_kquant_offsets_in_fp32 hold the
kernels to a bound derived from their own math instead, one a kernel that rounded the offset term to x's dtype would
break.
"""

import functools
import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import torch

from tinychat import ops
from tinychat.int4_layout import pack_int4_op, unpack_int4_op
from test_int4_linear import kquant_scales

ROOT = Path(__file__).resolve().parents[1]
LAYOUT_HEADER = ROOT / "csrc" / "common" / "int4_layout.h"

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LOW = [torch.float16, torch.bfloat16]
PATH_ENV = "TINYCHAT_INT4_CUDA_PATH"


# ---- the __host__ __device__ layout helpers, on the CPU ----

_HELPERS_SRC = r"""
#include <torch/extension.h>
#include <cstring>
#include "int4_layout.h"

using namespace tinychat::q4;

namespace {

float fp16_value(uint32_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }
float bf16_value(uint32_t bits) { return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits())); }

// Both halves of a magic-number pair as floats, minus the magic value: the two q.
std::pair<float, float> pair_values(uint32_t pair, bool bf16) {
  const uint32_t bits = pair | (bf16 ? kBf16Magic : kFp16Magic);
  const float base = bf16 ? kBf16MagicValue : kFp16MagicValue;
  auto value = bf16 ? bf16_value : fp16_value;
  return {value(bits & 0xFFFFu) - base, value(bits >> 16) - base};
}

}  // namespace

// q [N, K] (float) through nibble(); NaN where nothing was written.
torch::Tensor unpack_nibble(torch::Tensor qweight) {
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  auto out = torch::full({N, K}, NAN);
  auto o = out.accessor<float, 2>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) o[n][k] = static_cast<float>(nibble(qweight.data_ptr<uint8_t>() + n * K / 2, k));
  return out;
}

// q [N, K] as the GEMV kernel walks it: 16-byte blocks as 4 words, 4 pairs per word as fp16 1 + q/16.
torch::Tensor unpack_gemv(torch::Tensor qweight) {
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  auto out = torch::full({N, K}, NAN);
  auto o = out.accessor<float, 2>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < K / kBlock; ++b) {
      const uint8_t* block = qweight.data_ptr<uint8_t>() + n * K / 2 + b * kBlockBytes;
      for (int word = 0; word < 4; ++word) {
        uint32_t w;
        std::memcpy(&w, block + 4 * word, 4);  // little-endian, as on the GPU
        for (int shift = 0; shift < 16; shift += 4) {
          const uint32_t bits = unit_pair_bits(w, shift) | kUnitMagic;
          const float q0 = kUnitScale * (fp16_value(bits & 0xFFFFu) - 1.f);
          const float q1 = kUnitScale * (fp16_value(bits >> 16) - 1.f);
          o[n][b * kBlock + gemv_channel(word, shift, 0)] = q0;
          o[n][b * kBlock + gemv_channel(word, shift, 1)] = q1;
        }
      }
    }
  return out;
}

// q [N, K] as the GEMM kernel's quad lanes t = 0..3 build their mma B registers (fp16 or bf16 magic).
torch::Tensor unpack_mma(torch::Tensor qweight, bool bf16) {
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  auto out = torch::full({N, K}, NAN);
  auto o = out.accessor<float, 2>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < K / kBlock; ++b) {
      const uint8_t* block = qweight.data_ptr<uint8_t>() + n * K / 2 + b * kBlockBytes;
      for (int t = 0; t < 4; ++t) {
        const uint32_t lo = block[2 * t] | (block[2 * t + 1] << 8);
        const uint32_t hi = block[2 * t + 8] | (block[2 * t + 9] << 8);
        const uint32_t word = mma_b_word(lo, hi);
        for (int step = 0; step < 2; ++step)
          for (int reg = 0; reg < 2; ++reg) {
            const auto [q0, q1] = pair_values(pair_bits(word, mma_b_shift(step, reg)), bf16);
            o[n][b * kBlock + mma_b_channel(t, step, reg, 0)] = q0;
            o[n][b * kBlock + mma_b_channel(t, step, reg, 1)] = q1;
          }
      }
    }
  return out;
}

// W [N, K] fp32 through nibble() and dequant(); scales and offsets fp32 [N, K/G].
torch::Tensor dequant_all(torch::Tensor qweight, torch::Tensor scales, torch::Tensor offsets, int64_t G) {
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  auto out = torch::empty({N, K});
  auto o = out.accessor<float, 2>();
  auto s = scales.accessor<float, 2>();
  auto m = offsets.accessor<float, 2>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      o[n][k] = dequant(nibble(qweight.data_ptr<uint8_t>() + n * K / 2, k), s[n][k / G], m[n][k / G]);
  return out;
}

// The GEMV's x tile: float4 word of (m, piece, blk), its size in bytes, and the blocks one tile holds.
int64_t gemv_x_word_of(int64_t m, int64_t piece, int64_t blk, int64_t blocks) {
  return gemv_x_word(m, piece, blk, blocks);
}
int64_t gemv_xsum_index_of(int64_t m, int64_t blk, int64_t blocks) { return gemv_xsum_index(m, blk, blocks); }
int64_t gemv_smem_bytes_of(int64_t mb, int64_t blocks) { return gemv_smem_bytes(mb, blocks); }
int64_t gemv_chunk_blocks_of(int64_t mb, int64_t K, int64_t budget) { return gemv_chunk_blocks(mb, K, budget); }
"""


@pytest.fixture(scope="module")
def helpers():
    """The helpers compiled on the host; the build is cached in a temporary folder (rebuilt when the header
    or this source changes: the header's hash is part of the source)."""
    from torch.utils.cpp_extension import load_inline

    header_hash = hashlib.sha256(LAYOUT_HEADER.read_bytes()).hexdigest()[:16]
    build_dir = os.path.join(tempfile.gettempdir(), "tinychat_int4_layout_test")
    os.makedirs(build_dir, exist_ok=True)
    return load_inline(
        name="tinychat_int4_layout_test",
        cpp_sources=f"// int4_layout.h sha256 {header_hash}\n{_HELPERS_SRC}",
        functions=["unpack_nibble", "unpack_gemv", "unpack_mma", "dequant_all", "gemv_x_word_of", "gemv_xsum_index_of",
                   "gemv_smem_bytes_of", "gemv_chunk_blocks_of"],
        extra_include_paths=[str(LAYOUT_HEADER.parent)],
        extra_cflags=["-O1"],
        build_directory=build_dir,
        verbose=False,
    )


def random_qweight(N, K, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)  # [N, K]
    return q, pack_int4_op(q)


@pytest.mark.parametrize("N,K,seed", [(1, 32, 0), (3, 64, 1), (17, 256, 2), (8, 1024, 3)])
def test_layout_helpers_unpack(helpers, N, K, seed):
    """Every path from packed bytes to q (single nibbles, GEMV pairs, mma fragments in fp16 and bf16) gives
    unpack_int4_op's q, each channel exactly once."""
    q, qweight = random_qweight(N, K, seed)
    assert torch.equal(unpack_int4_op(qweight), q)
    expected = q.float()
    paths = [("nibble", helpers.unpack_nibble(qweight)), ("gemv", helpers.unpack_gemv(qweight)),
             ("mma fp16", helpers.unpack_mma(qweight, False)), ("mma bf16", helpers.unpack_mma(qweight, True))]
    for name, got in paths:
        assert not got.isnan().any(), f"{name}: some channels were never produced"
        assert torch.equal(got, expected), f"{name}: wrong channel order or value"


def test_layout_helpers_every_byte_value(helpers):
    """All 256 byte values at every byte position of a block: row r, byte j = (r + j) % 16 | (r // 16) << 4."""
    r, j = torch.arange(256)[:, None], torch.arange(16)[None, :]
    q = torch.cat(((r + j) % 16, (r // 16).expand(256, 16)), dim=1).to(torch.uint8)  # [256, 32]
    assert len(set((pack_int4_op(q)[:, 5]).tolist())) == 256
    qweight = pack_int4_op(q)
    for got in (helpers.unpack_gemv(qweight), helpers.unpack_mma(qweight, False), helpers.unpack_mma(qweight, True)):
        assert torch.equal(got, q.float())


@pytest.mark.parametrize("G", [32, 64, 128])
def test_layout_helpers_dequant(helpers, G):
    """dequant() is the op's W[n, k] = q[n, k] * s + m (s, m: the scale and offset of group (n, k/G)), bit for bit in
    fp32 (int4_linear_ref's product, then sum)."""
    N, K = 5, 256
    q, qweight = random_qweight(N, K, G)
    g = torch.Generator().manual_seed(G)
    scales = torch.rand(N, K // G, generator=g) * 0.1 + 1e-3
    offsets = -torch.rand(N, K // G, generator=g) * 15 * scales  # non-integer multiples of the scales
    expected = (q.float().reshape(N, K // G, G) * scales[..., None] + offsets[..., None]).reshape(N, K)
    assert torch.equal(helpers.dequant_all(qweight, scales, offsets, G), expected)


def wavefronts(byte_addresses, width):
    """Shared-memory wavefronts of one warp-wide load or store of `width` bytes per lane at these addresses: 32
    banks of 4 bytes, each wavefront serves one 4-byte word per bank (lanes reading the same word share it)."""
    words_of_bank = {}
    for a in byte_addresses:
        for word in range(a // 4, (a + width) // 4):
            words_of_bank.setdefault(word % 32, set()).add(word)
    return max(len(w) for w in words_of_bank.values())


GEMV_SMEM_BUDGET = 48 * 1024  # int4_linear.cu's kGemvSmemBytes


@pytest.mark.parametrize("MB", [1, 2, 3, 8])
@pytest.mark.parametrize("K", [128, 576, 1056, 4096, 11008, 14336])
def test_gemv_x_tile_has_no_bank_conflicts(helpers, MB, K):
    """The GEMV's x tile (q4::gemv_x_word): the 32 lanes of a warp read piece p of blocks lane, lane + 32, ...:
    32 consecutive 16-byte words, 4 wavefronts per 128-bit load, the minimum (the block-major tile took 32). The
    staging stores (a quad of lanes per block, pieces 2j and 2j + 1), 4 times rarer than the loads, take the
    minimum too, except in a warp that straddles two rows of x. Each word of the tile
    is written once, and the tile and its block sums fit the kernel's 48 KB."""
    blocks = helpers.gemv_chunk_blocks_of(MB, K, GEMV_SMEM_BUDGET)
    assert 1 <= blocks <= K // 32
    assert helpers.gemv_smem_bytes_of(MB, blocks) <= GEMV_SMEM_BUDGET
    if blocks < K // 32:  # a smaller tile only when the next larger one does not fit
        assert helpers.gemv_smem_bytes_of(MB, blocks + 1) > GEMV_SMEM_BUDGET
    words = {helpers.gemv_x_word_of(m, p, b, blocks) for m in range(MB) for p in range(8) for b in range(blocks)}
    assert len(words) == MB * 8 * blocks  # no two pieces share a word
    tile_bytes = 16 * (max(words) + 1)
    sums = {helpers.gemv_xsum_index_of(m, b, blocks) for m in range(MB) for b in range(blocks)}
    assert len(sums) == MB * blocks and tile_bytes + 4 * (max(sums) + 1) <= helpers.gemv_smem_bytes_of(MB, blocks)
    for m in range(MB):
        for p in range(8):
            for first in range(0, blocks, 32):  # the lanes of one load: blocks first .. first + 31
                lanes = range(first, min(first + 32, blocks))
                loads = [16 * helpers.gemv_x_word_of(m, p, b, blocks) for b in lanes]
                assert wavefronts(loads, 16) == -(-16 * len(lanes) // 128), (m, p, first)
    units_per_row = blocks * 4  # staging: lane u takes row u // units_per_row, channels 8 (u % units_per_row) ..
    for base in range(0, MB * units_per_row, 32):
        units = [u for u in range(base, base + 32) if u < MB * units_per_row]
        for half in range(2):  # the two 16-byte stores of a lane: pieces 2j, 2j + 1 of its block
            stores = [16 * helpers.gemv_x_word_of(u // units_per_row, 2 * (u % 4) + half, (u % units_per_row) // 4,
                                                  blocks) for u in units]
            least = -(-16 * len(units) // 128)
            one_row = units[0] // units_per_row == units[-1] // units_per_row
            # a warp whose lanes straddle two rows of x may take up to twice the minimum there
            assert wavefronts(stores, 16) <= (least if one_row else 2 * least), (base, half)


def test_bank_model_counts_the_old_conflicts():
    """The wavefront model itself: 32 lanes 128 bytes apart (the block-major tile) need 32 wavefronts; 32
    consecutive 16-byte words need 4; 32 lanes reading one word need 1."""
    assert wavefronts([128 * lane for lane in range(32)], 16) == 32
    assert wavefronts([16 * lane for lane in range(32)], 16) == 4
    assert wavefronts([64] * 32, 16) == 1


# ---- the CUDA kernels ----


def tc():
    """torch.ops.tinychat, asserting the extension is built with its CUDA kernels."""
    assert ops.EXTENSION_AVAILABLE, "tinychat._C is not built: pip install --no-build-isolation -e ."
    import tinychat._C

    assert tinychat._C.WITH_CUDA, "tinychat._C was built without CUDA kernels (export CUDA_HOME=... and rebuild)"
    return torch.ops.tinychat


PARAM_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# (parameter dtype, offsets present): Q4_1-style groups with fp32 / fp16 parameters, and Q4_0-style without offsets
PARAM_KINDS = [("fp32", True), ("fp16", True), ("fp32", False), ("fp16", False)]
PARAM_IDS = ["fp32-offsets", "fp16-offsets", "fp32-q4_0", "fp16-q4_0"]
# ... and the K-quant superblocks (group size 32 only)
ALL_KINDS = [*PARAM_KINDS, ("kquant", False)]
ALL_IDS = [*PARAM_IDS, "kquant"]


@functools.cache
def weights(N, K, G, params="fp32", offsets=True):
    """A random [N, K] weight quantized in groups of G, on the GPU: (qweight, scales, offsets or None, W fp32 [N, K]).

    offsets: ggml's Q4_1 recipe (s = (max - min) / 15, m = min: non-integer multiples of s); else Q4_0's (s = amax / -8
    with amax the group's value of largest magnitude, sign kept, so about half the scales are negative; m = -8 s).
    Scales and offsets are stored in `params` (fp32 or fp16); W is the op's definition from the stored values (q * s + m
    with both widened to fp32). params "kquant" (G = 32, K % 256 == 0, offsets ignored): random codes and random
    superblocks uint8 [N, K/256, 20] (test_int4_linear.kquant_scales: d in [0.001, 0.011], dmin in [0, 0.02], sc and
    mn in 0..63), no offsets; W from ops.group_weights (s = d * sc, m = -(dmin * mn) in fp32)."""
    if params == "kquant":
        gen = torch.Generator().manual_seed(N * 7 + K)
        q = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)  # [N, K]
        superblocks = kquant_scales(N, K, gen)  # [N, K/256, 20]
        W = ops.group_weights(q, superblocks, None, G, -8.0)  # [N, K] fp32
        return pack_int4_op(q).cuda(), superblocks.cuda(), None, W.cuda()
    n_groups = K // G
    wg = torch.randn(N, K, generator=torch.Generator().manual_seed(N * 7 + K + G)).reshape(N, n_groups, G)
    if offsets:
        lo, hi = wg.amin(-1), wg.amax(-1)  # [N, K/G]
        scales, offs = (hi - lo) / 15, lo
        q = ((wg - offs[..., None]) / scales[..., None]).round().clamp(0, 15)
    else:
        amax = wg.gather(-1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1)  # [N, K/G]
        scales, offs = amax / -8, None
        q = (wg / scales[..., None] + 8).round().clamp(0, 15)
    scales = scales.to(PARAM_DTYPES[params])
    offs = None if offs is None else offs.to(PARAM_DTYPES[params])
    m = -8 * scales.float() if offs is None else offs.float()  # [N, K/G]
    W = (q * scales.float()[..., None] + m[..., None]).reshape(N, K)
    qweight = pack_int4_op(q.reshape(N, K).to(torch.uint8))
    return qweight.cuda(), scales.cuda(), None if offs is None else offs.cuda(), W.cuda()


@pytest.fixture
def path(request, monkeypatch):
    """Forces the kernel path through TINYCHAT_INT4_CUDA_PATH ("auto": the launcher's own choice)."""
    monkeypatch.setenv(PATH_ENV, request.param)
    return request.param


def check(x, N, K, G, params="fp32", offsets=True):
    """Runs the op on x (CUDA, [..., K]) with weights(N, K, G, params, offsets) and holds it to the reference (the
    fp32 reference dequantizes K-quant superblocks itself: ops.kquant_group_params)."""
    qweight, scales, offs, W = weights(N, K, G, params, offsets)
    out = tc().int4_linear(x, qweight, scales, offs, G)
    assert out.shape == (*x.shape[:-1], N) and out.dtype == x.dtype and out.is_contiguous()
    assert out.device == x.device
    exact = ops.int4_linear_ref(x.float(), qweight, scales, offs, G)  # fp32 [..., N]
    if x.dtype == torch.float32:
        torch.testing.assert_close(out, exact, atol=1e-4, rtol=1e-4)
        return
    naive = x @ W.to(x.dtype).t()  # plain torch in x.dtype (fp32 accumulation inside cuBLAS)
    err = (out.float() - exact).abs().max().item()
    err_naive = (naive.float() - exact).abs().max().item()
    one_ulp = torch.finfo(x.dtype).eps * exact.abs().max().item()  # the floor for few outputs (tests/test_ops.py)
    assert err <= max(2 * err_naive, one_ulp), (f"N={N} K={K} G={G} {params} offsets={offsets} x {tuple(x.shape)}: "
                                                f"err {err}, naive {err_naive}")


# (N, K, G): odd and tiny N, the Llama-2-7B / Llama-3-8B down_proj K, every group size
SHAPES = [(23, 64, 32), (200, 576, 64), (4096, 4096, 128), (96, 11008, 128), (72, 14336, 32), (130, 4096, 64),
          (1, 128, 128)]


@pytest.mark.parametrize("path", ["auto", "gemv", "gemm"], indirect=True)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("N,K,G", SHAPES)
@needs_cuda
@pytest.mark.cuda
def test_small_m(path, dtype, M, N, K, G):
    """Decode-sized M: the GEMV path (auto picks it) and the tensor-core path forced, 16-row tile and split K (splits
    that start inside a group too: (96, 11008, 128), (4096, 4096, 128)). fp32 scales with offsets."""
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to("cuda", dtype)
    check(x, N, K, G)


@pytest.mark.parametrize("path", ["auto", "gemv"], indirect=True)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("M", [16, 17, 64, 300, 1024])
@pytest.mark.parametrize("N,K,G", SHAPES)
@needs_cuda
@pytest.mark.cuda
def test_large_m(path, dtype, M, N, K, G):
    """Prefill-sized M: every GEMM tile shape (16, 64, 128 rows), with and without split K; and the GEMV path run
    over blocks of 8 rows. fp32 scales with offsets."""
    if path == "gemv" and M > 64 and K > 4096:
        pytest.skip("slow and nothing new")
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to("cuda", dtype)
    check(x, N, K, G)


# (N, K, G): odd N, G = 32, 64, 128 and K
PARAM_SHAPES = [(23, 64, 32), (130, 1024, 64), (257, 2048, 128), (33, 576, 576)]


@pytest.mark.parametrize("path", ["gemv", "gemm"], indirect=True)
@pytest.mark.parametrize("params,offsets", PARAM_KINDS, ids=PARAM_IDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 17, 64, 300])
@pytest.mark.parametrize("N,K,G", PARAM_SHAPES)
@needs_cuda
@pytest.mark.cuda
def test_group_params(path, params, offsets, dtype, M, N, K, G):
    """Every form of the group parameters (fp32 or fp16, offsets or none) on both paths and every GEMM tile shape,
    split K included."""
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to("cuda", dtype)
    check(x, N, K, G, params, offsets)


@pytest.mark.parametrize("params,offsets", PARAM_KINDS, ids=PARAM_IDS)
@pytest.mark.parametrize("M", [1, 8, 17, 300])
@pytest.mark.parametrize("G", [32, 64, 128, 256])
@needs_cuda
@pytest.mark.cuda
def test_fp32_x(params, offsets, M, G):
    """fp32 activations run the GEMV path at every M, exact fp32 math (G = 256 = K: one group per row)."""
    x = torch.randn(M, 256, generator=torch.Generator().manual_seed(M)).cuda()
    check(x, 41, 256, G, params, offsets)


# (N, K): odd N, 1 to 16 superblocks per row (8 to 128 k tiles: the GEMM splits K from K = 1024 on)
KQUANT_SHAPES = [(23, 256), (130, 1024), (257, 2048), (33, 4096)]


@pytest.mark.parametrize("path", ["gemv", "gemm"], indirect=True)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 17, 64, 300])
@pytest.mark.parametrize("N,K", KQUANT_SHAPES)
@needs_cuda
@pytest.mark.cuda
def test_kquant_params(path, dtype, M, N, K):
    """K-quant superblocks (uint8 [N, K/256, 20], group size 32) on both paths and every GEMM tile shape, split K
    included: s = d * sc and m = -(dmin * mn) formed in the kernels from the stored bytes."""
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to("cuda", dtype)
    check(x, N, K, 32, "kquant")


@pytest.mark.parametrize("M", [1, 8, 17, 300])
@pytest.mark.parametrize("K", [256, 1024])
@needs_cuda
@pytest.mark.cuda
def test_kquant_fp32_x(M, K):
    """K-quant superblocks with fp32 activations (the GEMV path at every M, exact fp32 math)."""
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).cuda()
    check(x, 41, K, 32, "kquant")


def assert_offsets_in_fp32(out, x, q, scales, offsets, G):
    """out [M, N] (fp64) of int4_linear on x [M, K] (fp16/bf16) and codes q [N, K] with fp32 scales and offsets
    [N, K/G]: within the bound of the GEMM's math with an fp32 offset term, and the data such that rounding
    c = m + 8 s to x's dtype would break that bound on most outputs. The bound: eps |exact| + eps sum |x (q - 8) s|
    (the activation-dtype part) + 2^-18 (sum |x (q - 8) s| + sum |c xsum|) (fp32 accumulation)."""
    N, K = q.shape
    n_groups = K // G
    s, m = scales.double(), offsets.double()  # [N, K/G], exactly the stored values
    W = (q.float().reshape(N, n_groups, G) * scales[..., None] + offsets[..., None]).reshape(N, K)  # the op's fp32 W
    xd = x.double()
    exact = xd @ W.double().t()  # [M, N], the product in fp64
    centered = ((q.double().reshape(N, n_groups, G) - 8) * s[..., None]).reshape(N, K)  # (q - 8) s
    c = m + 8 * s  # [N, K/G]
    xsum = xd.reshape(-1, n_groups, G).sum(-1)  # [M, K/G]
    eps = torch.finfo(x.dtype).eps
    low_part = xd.abs() @ centered.abs().t()  # [M, N]
    tol = eps * (exact.abs() + low_part) + 2**-18 * (low_part + xsum.abs() @ c.abs().t())
    err = (out - exact).abs()
    assert (err <= tol).all(), f"worst error {(err / tol).max().item():.2f} times the bound"
    rounded_c_err = (xsum @ (c.to(x.dtype).double() - c).t()).abs()  # what rounding c to x's dtype would add
    assert (rounded_c_err > tol).double().mean() > 0.5, "the data cannot tell an fp32 offset term from a rounded one"


@pytest.mark.parametrize("path", ["gemv", "gemm"], indirect=True)
@pytest.mark.parametrize("params", ["fp32", "fp16"])
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("M", [5, 17, 64, 300])
@needs_cuda
@pytest.mark.cuda
def test_offsets_in_fp32(path, params, dtype, M):
    """The offset term is applied in fp32, not in x's dtype. Offsets of 0.5..1, over 200 times |(q - 8) s|, of
    opposite signs in groups 2j and 2j + 1, and x near 1: each group's offset term c xsum (c = m + 8 s, xsum the
    group's sum of x, ~512) is large but they cancel in y. Per output, the kernels' math bounds the error by

        eps * |exact|                    rounding y once (half an ulp, with a factor 2 to spare)
      + eps * sum_k |x_k (q_k - 8) s|     (q - 8) s in x's dtype: the scale and the product each rounded once
      + 2^-18 * sum of |terms|           fp32 accumulation (tensor cores add with truncation: up to about an ulp of
                                         the running sum per k step; this allows 32 at the largest sum)

    (eps: x's dtype's machine epsilon; the terms: |x_k (q_k - 8) s| and |c xsum| per group). Rounding c to x's dtype
    would add up to eps/2 |c xsum| per group, a median 8 to 28 times that bound here: the test checks that it would
    break the bound on most outputs. The GEMM's splits (8 of 8 k tiles) start inside the groups (16 k tiles)."""
    N, K, G = 40, 2048, 512
    n_groups = K // G
    gen = torch.Generator().manual_seed(M)
    q = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(N, n_groups, generator=gen) + 1) * 2**-13  # |(q - 8) s| <= 0.002
    a = torch.rand(N, n_groups // 2, generator=gen) * 0.5 + 0.5
    d = (torch.rand(N, n_groups // 2, generator=gen) - 0.5) * 2**-8
    offsets = torch.stack((a, -(a + d)), dim=-1).reshape(N, n_groups)  # [N, K/G]: a, -(a + d) in pairs of groups
    scales, offsets = scales.to(PARAM_DTYPES[params]), offsets.to(PARAM_DTYPES[params])
    x = (1 + torch.randn(M, K, generator=gen) * 2**-6).to(dtype)  # [M, K]

    qweight = pack_int4_op(q)
    out = tc().int4_linear(x.cuda(), qweight.cuda(), scales.cuda(), offsets.cuda(), G).cpu().double()  # [M, N]
    assert_offsets_in_fp32(out, x, q, scales.float(), offsets.float(), G)


@pytest.mark.parametrize("path", ["gemv", "gemm"], indirect=True)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("M", [5, 17, 64, 300])
@needs_cuda
@pytest.mark.cuda
def test_kquant_offsets_in_fp32(path, dtype, M):
    """test_offsets_in_fp32 for K-quant superblocks: m = -(dmin * mn) is formed and applied in fp32, never rounded to
    x's dtype. d = 2^-14 (1..2) and sc 1..7 keep |(q - 8) s| <= 0.0069; dmin = 2^-4 (1..2) and mn 32..62 make
    m = -2 .. -7.75, mn equal in groups 2j and 2j + 1 (c = m + 8 s differs there by 8 d (sc' - sc)); x near +1 in
    even groups and -1 in odd ones, so each group's offset term c xsum (|xsum| ~ 32) is large but pairs cancel in y.
    Same bound as test_offsets_in_fp32 (its terms: |x_k (q_k - 8) s| and |c xsum| per group); rounding c to x's dtype
    would break it on most outputs (85-96% of them for these M and dtypes, checked from the data). The GEMM splits K
    (64 k tiles, one per group)."""
    N, K, G = 40, 2048, 32
    n_super, n_groups = K // 256, K // G
    gen = torch.Generator().manual_seed(M)
    q = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    superblocks = torch.empty(N, n_super, 20, dtype=torch.uint8)  # [N, K/256, 20]
    superblocks[..., 0:2] = ((torch.rand(N, n_super, 1, generator=gen) + 1) * 2**-14).half().view(torch.uint8)  # d
    superblocks[..., 2:4] = ((torch.rand(N, n_super, 1, generator=gen) + 1) * 2**-4).half().view(torch.uint8)  # dmin
    superblocks[..., 4:12] = torch.randint(1, 8, (N, n_super, 8), generator=gen, dtype=torch.uint8)  # sc
    mn = torch.randint(32, 63, (N, n_super, 4), generator=gen, dtype=torch.uint8)
    superblocks[..., 12:20] = mn.repeat_interleave(2, dim=-1)  # mn, equal in groups 2j and 2j + 1
    sign = torch.tensor([1.0, -1.0]).repeat(n_groups // 2).repeat_interleave(G)  # [K]: +1 in even groups
    x = (sign * (1 + torch.randn(M, K, generator=gen) * 2**-8)).to(dtype)  # [M, K]

    qweight = pack_int4_op(q)
    out = tc().int4_linear(x.cuda(), qweight.cuda(), superblocks.cuda(), None, G).cpu().double()  # [M, N]
    assert_offsets_in_fp32(out, x, q, *ops.kquant_group_params(superblocks), G)  # fp32 [N, K/G], exact


@pytest.mark.parametrize("path", ["gemv", "gemm"], indirect=True)
@needs_cuda
@pytest.mark.cuda
def test_shapes_and_strides(path):
    """x of any rank and strides (rows not contiguous, a transposed view, an unaligned start), and empty x."""
    N, K, G = 48, 256, 64
    base = torch.randn(3, 5, 2 * K, generator=torch.Generator().manual_seed(0)).to("cuda", torch.float16)
    check(base[..., :K], N, K, G)  # [3, 5, K], rows 2K apart
    check(base[..., :K].transpose(0, 1), N, K, G)  # [5, 3, K]
    flat = torch.randn(K * 9 + 1, generator=torch.Generator().manual_seed(1)).to("cuda", torch.float16)
    check(flat[1:].view(9, K), N, K, G)  # data 2 bytes past an aligned address
    qweight, scales, offs, _w = weights(N, K, G)
    out = tc().int4_linear(base[:0, 0, :K], qweight, scales, offs, G)
    assert out.shape == (0, N)


@pytest.mark.parametrize("path", ["gemv", "gemm"], indirect=True)
@pytest.mark.parametrize("offsets", [True, False], ids=["offsets", "q4_0"])
@needs_cuda
@pytest.mark.cuda
def test_misaligned_fp16_params(path, offsets):
    """fp16 scales and offsets whose data starts 2 bytes past a 4-byte boundary (views at an odd element; the GEMM
    stages fp16 parameters by their 4-byte words): the same output as the aligned tensors give. N * K/G is odd, so the
    last parameter is the lower half of its word, read without the 2 bytes past the tensor."""
    N, K, G = 37, 512, 64
    qweight, scales, offs, _w = weights(N, K, G, "fp16", offsets)

    def shifted(t):  # t's values in a view 2 bytes past an aligned allocation
        view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
        assert view.data_ptr() % 4 == 2
        return view.copy_(t)

    for M in (3, 17):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to("cuda", torch.float16)
        expected = tc().int4_linear(x, qweight, scales, offs, G)
        got = tc().int4_linear(x, qweight, shifted(scales), None if offs is None else shifted(offs), G)
        assert torch.equal(got, expected)
        check(x, N, K, G, "fp16", offsets)


@pytest.mark.parametrize("path", ["gemv", "gemm"], indirect=True)
@pytest.mark.parametrize("shift", [1, 2, 3])
@needs_cuda
@pytest.mark.cuda
def test_misaligned_kquant(path, shift):
    """K-quant superblocks whose data starts 1, 2 or 3 bytes past a 4-byte boundary (both paths read d and dmin as one
    4-byte word, the GEMM stages 4-byte words): the same output as the aligned tensor gives."""
    N, K = 37, 512
    qweight, superblocks, _offs, _w = weights(N, K, 32, "kquant")
    view = torch.empty(superblocks.numel() + shift, dtype=torch.uint8, device="cuda")[shift:].view(superblocks.shape)
    assert view.data_ptr() % 4 == shift
    view.copy_(superblocks)
    for M in (3, 17):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to("cuda", torch.float16)
        expected = tc().int4_linear(x, qweight, superblocks, None, 32)
        assert torch.equal(tc().int4_linear(x, qweight, view, None, 32), expected)
        check(x, N, K, 32, "kquant")


@pytest.mark.parametrize("params,offsets", [("fp16", True), ("fp32", False), ("kquant", False)],
                         ids=["fp16-offsets", "fp32-q4_0", "kquant"])
@pytest.mark.parametrize("M", [1, 5, 16, 300])
@pytest.mark.parametrize("dtype", LOW)
@needs_cuda
@pytest.mark.cuda
def test_cuda_graph(M, dtype, params, offsets):
    """Captured in a CUDA graph (the split-K workspace and the group sums of x come from the graph's pool) and replayed
    on new inputs: the same output as an eager call, bit for bit (the kernels are deterministic)."""
    N, K, G = 1000, 4096, 32 if params == "kquant" else 128
    qweight, scales, offs, _w = weights(N, K, G, params, offsets)
    gen = torch.Generator().manual_seed(M)
    static_x = torch.randn(M, K, generator=gen).to("cuda", dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _i in range(2):
            tc().int4_linear(static_x, qweight, scales, offs, G)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = tc().int4_linear(static_x, qweight, scales, offs, G)
    for _i in range(2):
        x = torch.randn(M, K, generator=gen).to("cuda", dtype)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, tc().int4_linear(x, qweight, scales, offs, G))


@pytest.mark.parametrize("params,offsets", ALL_KINDS, ids=ALL_IDS)
@needs_cuda
@pytest.mark.cuda
def test_deterministic(params, offsets):
    N, K, G = 300, 4096, 32 if params == "kquant" else 64
    qweight, scales, offs, _w = weights(N, K, G, params, offsets)
    for M in (1, 16, 100):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to("cuda", torch.bfloat16)
        first = tc().int4_linear(x, qweight, scales, offs, G)
        for _i in range(3):
            assert torch.equal(tc().int4_linear(x, qweight, scales, offs, G), first)


def _bad_calls():
    """(label, build(x, qweight, scales, offsets) -> the op's arguments, expected message regex); x [3, 128], G 64,
    fp32 scales and offsets."""
    G = 64
    return [
        ("x int32", lambda x, q, s, o: (x.int(), q, s, o, G), "x must be float32, bfloat16 or float16"),
        ("qweight int8", lambda x, q, s, o: (x, q.to(torch.int8), s, o, G), "qweight must be uint8"),
        ("scales bf16", lambda x, q, s, o: (x, q, s.bfloat16(), None, G), "scales must be float32, float16"),
        ("offsets fp16", lambda x, q, s, o: (x, q, s, o.half(), G), "offsets must have the scales' dtype"),
        ("x on the CPU", lambda x, q, s, o: (x.cpu(), q, s, o, G), "x must be a CUDA tensor"),
        ("offsets on the CPU", lambda x, q, s, o: (x, q, s, o.cpu(), G), "offsets must be a CUDA tensor"),
        ("K not a multiple of 32", lambda x, q, s, o: (x[:, :48], q[:, :24].contiguous(), s[:, :1].contiguous(),
                                                        o[:, :1].contiguous(), 48), "multiple of 32"),
        ("G not dividing K", lambda x, q, s, o: (x, q, s, o, 96), "must divide"),
        ("G not a multiple of 32", lambda x, q, s, o: (x[:, :96], q[:, :48].contiguous(), s[:, :2].contiguous(),
                                                        o[:, :2].contiguous(), 48), "multiple of 32"),
        ("qweight not contiguous", lambda x, q, s, o: (x, q.t().contiguous().t(), s, o, G),
         "qweight must be contiguous"),
        ("qweight wrong K", lambda x, q, s, o: (x, q[:, :32], s, o, G), r"qweight must have shape \[N, K/2\]"),
        ("scales wrong shape", lambda x, q, s, o: (x, q, s[:, :1], None, G), "scales must have shape"),
        ("offsets wrong shape", lambda x, q, s, o: (x, q, s, o[:, :1], G), "offsets must have the scales' shape"),
        ("offsets not contiguous", lambda x, q, s, o: (x, q, s, o.t().contiguous().t(), G),
         "offsets must be contiguous"),
    ]


@pytest.mark.parametrize("label,build,message", _bad_calls(), ids=[c[0] for c in _bad_calls()])
@needs_cuda
@pytest.mark.cuda
def test_errors(label, build, message):
    N, K, G = 16, 128, 64
    qweight, scales, offs, _w = weights(N, K, G)
    x = torch.randn(3, K).to("cuda", torch.float16)
    with pytest.raises(RuntimeError, match=message):
        tc().int4_linear(*build(x, qweight, scales, offs))


def _kquant_bad_calls():
    """(label, build(x, qweight, superblocks) -> the op's arguments, expected message regex); x [3, 512], qweight
    [16, 256], superblocks [16, 2, 20], group size 32."""
    return [
        ("group size 64", lambda x, q, sb: (x, q, sb, None, 64),
         r"uint8 scales \(K-quant superblocks\) need group_size 32 and K a multiple of 256, got group_size 64"),
        ("K not a multiple of 256",
         lambda x, q, sb: (x[:, :128], q[:, :64].contiguous(), sb[:, :1].contiguous(), None, 32),
         r"need group_size 32 and K a multiple of 256, got .* K = 128"),
        ("20 bytes per superblock", lambda x, q, sb: (x, q, sb[..., :16].contiguous(), None, 32),
         r"must have shape \[N, K/256, 20\] = \[16, 2, 20\], got \[16, 2, 16\]"),
        ("superblocks per row", lambda x, q, sb: (x, q, sb[:, :1].contiguous(), None, 32),
         r"must have shape \[N, K/256, 20\] = \[16, 2, 20\], got \[16, 1, 20\]"),
        ("rows", lambda x, q, sb: (x, q, sb[:8], None, 32), r"must have shape \[N, K/256, 20\] = \[16, 2, 20\]"),
        ("offsets given", lambda x, q, sb: (x, q, sb, sb, 32), r"carry their offsets: offsets must be None"),
        ("not contiguous", lambda x, q, sb: (x, q, sb.transpose(0, 1).contiguous().transpose(0, 1), None, 32),
         "scales must be contiguous"),
        ("on the CPU", lambda x, q, sb: (x, q, sb.cpu(), None, 32), "scales must be a CUDA tensor"),
    ]


@pytest.mark.parametrize("label,build,message", _kquant_bad_calls(), ids=[c[0] for c in _kquant_bad_calls()])
@needs_cuda
@pytest.mark.cuda
def test_kquant_errors(label, build, message):
    """K-quant superblocks run on CUDA with the CPU kernels' argument rules: a clear error for each misuse."""
    qweight, superblocks, _offs, _w = weights(16, 512, 32, "kquant")
    x = torch.randn(3, 512).to("cuda", torch.float16)
    with pytest.raises(RuntimeError, match=message):
        tc().int4_linear(*build(x, qweight, superblocks))


@needs_cuda
@pytest.mark.cuda
def test_path_env_errors(monkeypatch):
    qweight, scales, offs, _w = weights(16, 128, 64)
    monkeypatch.setenv(PATH_ENV, "fast")
    with pytest.raises(RuntimeError, match="TINYCHAT_INT4_CUDA_PATH must be auto, gemv or gemm"):
        tc().int4_linear(torch.randn(2, 128, device="cuda", dtype=torch.float16), qweight, scales, offs, 64)
    monkeypatch.setenv(PATH_ENV, "gemm")
    with pytest.raises(RuntimeError, match="needs fp16 or bf16 x"):
        tc().int4_linear(torch.randn(2, 128, device="cuda"), qweight, scales, offs, 64)


@needs_cuda
@pytest.mark.cuda
def test_old_gpu_is_refused():
    if torch.cuda.get_device_capability()[0] >= 8:
        pytest.skip("this GPU is sm_80 or newer")
    qweight, scales, offs, _w = weights(16, 128, 64)
    with pytest.raises(RuntimeError, match="compute capability 8.0"):
        tc().int4_linear(torch.randn(2, 128, device="cuda", dtype=torch.float16), qweight, scales, offs, 64)
