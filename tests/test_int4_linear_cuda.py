"""The CUDA kernels of int4_linear (csrc/cuda/int4_linear.cu) against the PyTorch reference, and the layout helpers
they are built on (csrc/common/int4_layout.h).

test_layout_helpers* compile the header with the host compiler (torch.utils.cpp_extension.load_inline, cached in a
temporary folder) and run everywhere. The CUDA tests skip without a GPU, and FAIL on a GPU machine whose
tinychat._C was built without its CUDA kernels.

Error bound of the fp16/bf16 kernels (as FlashAttention's tests): max |out - exact| <= 2 * max |naive - exact|, where
exact is the fp32 reference (int4_linear_ref on fp32 x) and naive the same product done by plain torch in x's dtype
(x @ W.to(x.dtype).T with W dequantized in fp32); with a floor of one ulp of the largest output, for shapes with
few outputs (as tests/test_ops.py's check_close).
"""

import functools
import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import torch

from tinychat import ops
from tinychat.int4_layout import pack_int4_op, to_int4_op, unpack_int4_op
from tinychat.quant.quantize import QuantConfig, quantize

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

// W [N, K] fp32 through nibble() and dequant().
torch::Tensor dequant_all(torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t G) {
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  auto out = torch::empty({N, K});
  auto o = out.accessor<float, 2>();
  auto s = scales.accessor<float, 2>();
  auto z = zeros.accessor<float, 2>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k)
      o[n][k] = dequant(nibble(qweight.data_ptr<uint8_t>() + n * K / 2, k), s[n][k / G], z[n][k / G]);
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
    """dequant() is the op's W[n, k] = (q - zeros[n, k/G]) * scales[n, k/G], bit for bit in fp32."""
    N, K = 5, 256
    q, qweight = random_qweight(N, K, G)
    g = torch.Generator().manual_seed(G)
    scales = torch.rand(N, K // G, generator=g) * 0.1 + 1e-3
    zeros = torch.randint(0, 16, (N, K // G), generator=g).float()
    expected = ((q.float().reshape(N, K // G, G) - zeros[..., None]) * scales[..., None]).reshape(N, K)
    assert torch.equal(helpers.dequant_all(qweight, scales, zeros, G), expected)


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


@functools.cache
def weights(N, K, G):
    """An RTN-quantized random [N, K] weight on the GPU: (qweight, scales, zeros, W fp32 [N, K])."""
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(N * 7 + K + G))
    q, scales, zeros = quantize(w, QuantConfig(4, G))
    qweight, scales, zeros = to_int4_op(q, scales, zeros)
    W = ((q.float().reshape(N, K // G, G) - zeros[..., None]) * scales[..., None]).reshape(N, K)
    return tuple(t.cuda() for t in (qweight, scales, zeros, W))


@pytest.fixture
def path(request, monkeypatch):
    """Forces the kernel path through TINYCHAT_INT4_CUDA_PATH ("auto": the launcher's own choice)."""
    monkeypatch.setenv(PATH_ENV, request.param)
    return request.param


def check(x, N, K, G):
    """Runs the op on x (CUDA, [..., K]) and holds it to the reference."""
    qweight, scales, zeros, W = weights(N, K, G)
    out = tc().int4_linear(x, qweight, scales, zeros, G)
    assert out.shape == (*x.shape[:-1], N) and out.dtype == x.dtype and out.is_contiguous()
    assert out.device == x.device
    exact = ops.int4_linear_ref(x.float(), qweight, scales, zeros, G)  # fp32 [..., N]
    if x.dtype == torch.float32:
        torch.testing.assert_close(out, exact, atol=1e-4, rtol=1e-4)
        return
    naive = x @ W.to(x.dtype).t()  # plain torch in x.dtype (fp32 accumulation inside cuBLAS)
    err = (out.float() - exact).abs().max().item()
    err_naive = (naive.float() - exact).abs().max().item()
    one_ulp = torch.finfo(x.dtype).eps * exact.abs().max().item()  # the floor for few outputs (tests/test_ops.py)
    assert err <= max(2 * err_naive, one_ulp), f"N={N} K={K} G={G} x {tuple(x.shape)}: err {err}, naive {err_naive}"


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
    """Decode-sized M: the GEMV path (auto picks it) and the tensor-core path forced, 16-row tile and split K."""
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
    over blocks of 8 rows."""
    if path == "gemv" and M > 64 and K > 4096:
        pytest.skip("slow and nothing new")
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to("cuda", dtype)
    check(x, N, K, G)


@pytest.mark.parametrize("M", [1, 8, 17, 300])
@pytest.mark.parametrize("G", [32, 64, 128])
@needs_cuda
@pytest.mark.cuda
def test_fp32_x(M, G):
    """fp32 activations run the GEMV path at every M, exact fp32 math."""
    x = torch.randn(M, 256, generator=torch.Generator().manual_seed(M)).cuda()
    check(x, 40, 256, G)


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
    qweight, scales, zeros, _w = weights(N, K, G)
    out = tc().int4_linear(base[:0, 0, :K], qweight, scales, zeros, G)
    assert out.shape == (0, N)


@pytest.mark.parametrize("M", [1, 5, 16, 300])
@pytest.mark.parametrize("dtype", LOW)
@needs_cuda
@pytest.mark.cuda
def test_cuda_graph(M, dtype):
    """Captured in a CUDA graph (the split-K workspace comes from the graph's pool) and replayed on new inputs:
    the same output as an eager call, bit for bit (the kernels are deterministic)."""
    N, K, G = 1000, 4096, 128
    qweight, scales, zeros, _w = weights(N, K, G)
    gen = torch.Generator().manual_seed(M)
    static_x = torch.randn(M, K, generator=gen).to("cuda", dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _i in range(2):
            tc().int4_linear(static_x, qweight, scales, zeros, G)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = tc().int4_linear(static_x, qweight, scales, zeros, G)
    for _i in range(2):
        x = torch.randn(M, K, generator=gen).to("cuda", dtype)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, tc().int4_linear(x, qweight, scales, zeros, G))


@needs_cuda
@pytest.mark.cuda
def test_deterministic():
    N, K, G = 300, 4096, 64
    qweight, scales, zeros, _w = weights(N, K, G)
    for M in (1, 16, 100):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to("cuda", torch.bfloat16)
        first = tc().int4_linear(x, qweight, scales, zeros, G)
        for _i in range(3):
            assert torch.equal(tc().int4_linear(x, qweight, scales, zeros, G), first)


def _bad_calls():
    """(label, build(x, qweight, scales, zeros) -> the op's arguments, expected message regex); x [3, 128], G 64."""
    G = 64
    return [
        ("x int32", lambda x, q, s, z: (x.int(), q, s, z, G), "x must be float32, bfloat16 or float16"),
        ("qweight int8", lambda x, q, s, z: (x, q.to(torch.int8), s, z, G), "qweight must be uint8"),
        ("scales fp16", lambda x, q, s, z: (x, q, s.half(), z, G), "scales must be float32"),
        ("x on the CPU", lambda x, q, s, z: (x.cpu(), q, s, z, G), "x must be a CUDA tensor"),
        ("zeros on the CPU", lambda x, q, s, z: (x, q, s, z.cpu(), G), "zeros"),
        ("K not a multiple of 32", lambda x, q, s, z: (x[:, :48], q[:, :24].contiguous(), s[:, :1].contiguous(),
                                                        z[:, :1].contiguous(), 48), "multiple of 32"),
        ("G not dividing K", lambda x, q, s, z: (x, q, s, z, 96), "must divide"),
        ("G not a multiple of 32", lambda x, q, s, z: (x[:, :96], q[:, :48].contiguous(), s[:, :2].contiguous(),
                                                        z[:, :2].contiguous(), 48), "multiple of 32"),
        ("qweight not contiguous", lambda x, q, s, z: (x, q.t().contiguous().t(), s, z, G),
         "qweight must be contiguous"),
        ("qweight wrong K", lambda x, q, s, z: (x, q[:, :32], s, z, G), r"qweight must have shape \[N, K/2\]"),
        ("scales wrong shape", lambda x, q, s, z: (x, q, s[:, :1], z, G), "scales must have shape"),
        ("zeros not contiguous", lambda x, q, s, z: (x, q, s, z.t().contiguous().t(), G), "zeros must be contiguous"),
    ]


@pytest.mark.parametrize("label,build,message", _bad_calls(), ids=[c[0] for c in _bad_calls()])
@needs_cuda
@pytest.mark.cuda
def test_errors(label, build, message):
    N, K, G = 16, 128, 64
    qweight, scales, zeros, _w = weights(N, K, G)
    x = torch.randn(3, K).to("cuda", torch.float16)
    with pytest.raises(RuntimeError, match=message):
        tc().int4_linear(*build(x, qweight, scales, zeros))


@needs_cuda
@pytest.mark.cuda
def test_path_env_errors(monkeypatch):
    qweight, scales, zeros, _w = weights(16, 128, 64)
    monkeypatch.setenv(PATH_ENV, "fast")
    with pytest.raises(RuntimeError, match="TINYCHAT_INT4_CUDA_PATH must be auto, gemv or gemm"):
        tc().int4_linear(torch.randn(2, 128, device="cuda", dtype=torch.float16), qweight, scales, zeros, 64)
    monkeypatch.setenv(PATH_ENV, "gemm")
    with pytest.raises(RuntimeError, match="needs fp16 or bf16 x"):
        tc().int4_linear(torch.randn(2, 128, device="cuda"), qweight, scales, zeros, 64)


@needs_cuda
@pytest.mark.cuda
def test_old_gpu_is_refused():
    if torch.cuda.get_device_capability()[0] >= 8:
        pytest.skip("this GPU is sm_80 or newer")
    qweight, scales, zeros, _w = weights(16, 128, 64)
    with pytest.raises(RuntimeError, match="compute capability 8.0"):
        tc().int4_linear(torch.randn(2, 128, device="cuda", dtype=torch.float16), qweight, scales, zeros, 64)
