// CUDA kernels of int4_linear (schema in csrc/ops.cpp; weight layout in tinychat/int4_layout.py, index and bit
// helpers in csrc/common/int4_layout.h). The layout and schema are the CPU ones: no device-specific repacking.
//
// y[i, n] = sum_k x[i, k] * W[n, k], W[n, k] = q[n, k] * s + m with s, m the scale and offset of group (n, k/G) in
// fp32; fp32 accumulation, each output rounded once to x's dtype. x [M, K] (after flattening) fp16 / bf16 (fp32
// accepted, GEMV path only), qweight uint8 [N, K/2]. The group parameters take one of three forms, all read as stored
// (no conversion pass; widened or formed where they are used):
//   * scales [N, K/G] fp32 or fp16 with offsets [N, K/G] of the same dtype: s = scales[n, g], m = offsets[n, g]
//     (fp16 widened with __half2float);
//   * the same scales without offsets: m = -8 s (ggml's Q4_0);
//   * K-quant superblocks (ggml's Q4_K; csrc/common/kquant.h): scales uint8 [N, K/256, 20], no offsets, G = 32.
//     Superblock j of row n covers groups 8j .. 8j + 7: fp16 d (bytes 0..1) and dmin (2..3), then 8 uint8 sc and 8
//     uint8 mn; group g has s = d * sc[g % 8] and m = -(dmin * mn[g % 8]), formed in fp32 (exact: 11 + 6 bits).
// sm_80 or newer.
//
// Two paths, picked per call from M (TINYCHAT_INT4_CUDA_PATH=gemv|gemm forces one; tests use it):
//
//  * GEMV (M <= 4 by default, up to 8 per block when forced, and every fp32 x): up to 4 warps per block (fewer when N
//    is too small to fill the GPU), 4 output channels per warp. Each lane walks the 32-channel blocks lane, lane + 32,
//    ... of its warp's 4 weight rows: one 16-byte load per row and block, with the group parameters of the block
//    (RawGroup: a scale and an offset as stored, or a K-quant superblock's first 4 bytes and the group's sc and mn;
//    formed into s and m where they are used), the first issued before x is staged and each next one before the
//    current one is used. x (up to 8 rows) is staged in shared memory as fp32, in chunks of K that fit 48 KB,
//    piece-major so that the 32 lanes read 32 consecutive 16-byte words (q4::gemv_x_word: no bank conflicts), with
//    the sum of x over every block. Each nibble pair becomes two fp16 1 + q/16 with one shift and one mask-or (exact;
//    q4::unit_pair_bits), widened to fp32; sum (1 + q/16) x accumulates in fp32 over the block, which then adds
//    16 s * (that - sum x) + m * sum x = sum (q s + m) x. A warp-shuffle reduction ends each output. All math fp32
//    (taking out the 1 of 1 + q/16 costs a few bits: ~2^-21 rel.).
//
//  * GEMM (M > 4): mma.sync m16n8k16 (fp16 or bf16 in, fp32 accumulate) on W = (q - 8) s + c, c = m + 8 s (c = 0
//    without offsets). A block computes a BM x BN tile of y over k tiles of BK = 32 (one 16-byte block of every weight
//    row, always inside one quantization group), fed by a cp.async pipeline of STAGES tiles in shared memory: x
//    [BM, 32] (16-byte chunks XOR-swizzled so ldmatrix is conflict-free), qweight [BN, 16 bytes] as stored, and at
//    the first k tile of each group (and of the split) the group's parameters of the BN weight rows. Warps are laid
//    out WM x WN; each owns MT x NT mma tiles (16 x 8). The B fragment of a quad lane t is bytes 2t, 2t+1, 2t+8, 2t+9
//    of its weight row's block: the low nibbles are k step 0, the high nibbles k step 1 (int4_layout.h). They become
//    fp16/bf16 pairs in registers: magic-number conversion minus (magic + 8) gives q - 8 exactly, times the scale
//    (formed in fp32) rounded to the activation dtype once per group, so (q - 8) s is rounded twice (scale, product)
//    where a dequantize-then-matmul rounds W once; |q - 8| <= 8, so those errors scale with Q4_0's centered weights,
//    never with the offset. Without offsets that is all: W is exactly Q4_0's (q - 8) s. With offsets and K-quant
//    superblocks, c is never rounded to the activation dtype: the launcher sums x over every group (xsum fp32
//    [M, K/G], one ATen reduction on the current stream), the group's first k tile also stages what forms m and
//    xsum [BM], and there every accumulator adds xsum[i, g] * c[n, g] in fp32 (c = fmaf(8, s, m) from the fp32 s
//    and m): M * N * K/G fp32 FMAs on the CUDA cores beside the M * N * K of the tensor cores (measured on an H200
//    with fp32 offsets, fp16 x, M >= 256: 25-30% more time than fp32 Q4_0 weights at G = 128, 80% at G = 32; the
//    K-quant form, G = 32 always, is not measured).
//    Tile shapes by M: 16 x 128, 64 x 128, 128 x 128. When the M x N tiles cannot fill the GPU, K is split over
//    blockIdx.z: each split writes fp32 partial sums to a workspace (the offset term of a group in the split where the
//    group starts, so each is added once) and a second kernel adds them in a fixed order (deterministic) and rounds.
//    Group parameters in shared memory take 4-byte slots, kParamSlots<P> per weight row, each filled by one 4-byte
//    cp.async (it copies 4, 8 or 16 bytes from an address aligned to the size):
//      - fp32: the scale and the offset (the second slot unused without offsets);
//      - fp16: for each of the two, the aligned 4-byte word holding it: the whole word when the value is its upper
//        half, else its lower 2 bytes (the rest zero-filled), so nothing outside the tensor is read; the reader takes
//        the half the parity of the value's index names;
//      - K-quant: the superblock's first word (d | dmin << 16), the word of sc holding sc[g % 8] and the word of mn
//        holding mn[g % 8]; the reader takes byte g % 4 of the latter two (G = 32: every k tile starts a group).
//    fp16 parameters and superblocks whose data is not 4-byte aligned are copied first (views at an odd offset): in
//    the GEMM, and superblocks in the GEMV too, which reads d and dmin as one 4-byte word.
//
// Every N >= 1 is supported (loads past N read zeros, stores are masked); K % 32 == 0, G % 32 == 0, K % G == 0
// (K-quant: G = 32, K % 256 == 0). No host synchronization and no allocation outside the caching allocator: the op is
// CUDA-graph safe.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/int4_layout.h"
#include "../common/kquant.h"
#include "helpers.cuh"

namespace tinychat {

namespace {

using q4::kBlock;
using q4::kBlockBytes;

constexpr float kQ40Offset = -8.f;  // m = kQ40Offset * s without offsets (ggml's Q4_0): W = (q - 8) s

// P = uint8_t: the group parameters are K-quant superblocks (kquant.h), else fp32 or fp16 scales and offsets.
template <typename P>
constexpr bool kKQuant = std::is_same_v<P, uint8_t>;

// The operands of one call as the kernels take them: x [M, K], qweight [N, K/2], y [M, N]; scales [N, K/G] and
// offsets [N, K/G] or nullptr (m = -8 s) for P = float or __half; for P = uint8_t, scales: the superblocks
// [N, K/256, 20] and offsets nullptr. T: float, __half or __nv_bfloat16.
template <typename T, typename P>
struct Operands {
  const T* x;
  const uint8_t* qweight;
  const P* scales;
  const P* offsets;
  T* y;
  int M, N, K, G;
};

// ---- conversions (torch builds with __CUDA_NO_HALF_CONVERSIONS__: use the intrinsics; from_float: helpers.cuh) ----

template <typename To, typename From>
__device__ __forceinline__ To bit_cast(From v) {  // by value: constexpr constants stay usable on the device
  static_assert(sizeof(To) == sizeof(From), "bit_cast: sizes differ");
  To out;
  memcpy(&out, &v, sizeof(To));
  return out;
}

// Two q (0..15) at bits 6..9 and 22..25 (q4::unit_pair_bits) -> float2 {1 + q0/16, 1 + q1/16}, exactly.
__device__ __forceinline__ float2 unit_pair_to_float2(uint32_t pair) {
  return __half22float2(bit_cast<__half2>(pair | q4::kUnitMagic));
}

// A group parameter (scale or offset) as stored, widened to fp32 (exactly).
__device__ __forceinline__ float param_float(float v) { return v; }
__device__ __forceinline__ float param_float(__half v) { return __half2float(v); }

// K-quant: s = d * sc and m = -(dmin * mn) from a superblock's first 4 bytes (d_dmin: fp16 d | fp16 dmin << 16) and
// a group's sc or mn (0..255), in fp32 (exact).
__device__ __forceinline__ float kq_scale(uint32_t d_dmin, uint32_t sc) {
  return __half2float(bit_cast<__half>(static_cast<uint16_t>(d_dmin))) * static_cast<float>(sc);
}
__device__ __forceinline__ float kq_offset(uint32_t d_dmin, uint32_t mn) {
  return -(__half2float(bit_cast<__half>(static_cast<uint16_t>(d_dmin >> 16))) * static_cast<float>(mn));
}

// 8 consecutive elements of x (16-byte aligned) as fp32.
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
template <typename T>  // __half or __nv_bfloat16
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f;
    if constexpr (std::is_same_v<T, __half>) {
      f = __half22float2(bit_cast<__half2>(words[i]));
    } else {
      f = __bfloat1622float2(bit_cast<__nv_bfloat162>(words[i]));
    }
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

// ================================================================================================================
// GEMV path
// ================================================================================================================

constexpr int kGemvMaxWarps = 4;            // warps per block (fewer when N is too small to fill the GPU)
constexpr int kGemvRows = 4;                // output channels (weight rows) per warp
constexpr int kGemvMaxM = 8;                // rows of x per block; larger M runs ceil(M / 8) blocks along y
// The automatic path takes the GEMV up to this M, the GEMM above. Measured on an H200 (fp16, Llama-2-7B shapes,
// benchmarks/results/cuda_int4_nvidia_h200.json): the GEMV took 41-94 us at M = 4 and 80-199 us at M = 8, the GEMM
// 42-98 us at M = 16 (the same 16-row tile serves M = 5..16).
constexpr int kGemvAutoMaxM = 4;
constexpr int kGemvSmemBytes = 48 * 1024;   // x tile + block sums (no opt-in needed below 48 KB)

// One group's parameters as the GEMV loads them, formed into s and m (group_sm) where they are used, so that a
// prefetch is not waited for right after it is issued. fp32 / fp16: the scale and the offset as stored (the offset
// not loaded without offsets).
template <typename P>
struct RawGroup {
  P s, m;
};
// K-quant: the superblock's first 4 bytes (fp16 d | fp16 dmin << 16) and the group's sc | mn << 8.
template <>
struct RawGroup<uint8_t> {
  uint32_t d_dmin, sc_mn;
};

// The parameters of group g of weight row n (n_groups = K/G per row).
template <typename P>
__device__ __forceinline__ RawGroup<P> load_group(const P* scales, const P* offsets, int n, int n_groups, int g) {
  const int64_t p = static_cast<int64_t>(n) * n_groups + g;
  return {__ldg(scales + p), offsets != nullptr ? __ldg(offsets + p) : P{}};
}
// K-quant: superblocks [N, K/256, 20] with 4-byte aligned data (the launcher copies them otherwise); group g of a
// row is group g % 8 of its superblock g / 8.
__device__ __forceinline__ RawGroup<uint8_t> load_group(const uint8_t* superblocks, const uint8_t*, int n,
                                                        int n_groups, int g) {
  const uint32_t j = static_cast<uint32_t>(g) / kq::kSuperGroups, i = static_cast<uint32_t>(g) % kq::kSuperGroups;
  const uint8_t* sb = superblocks + static_cast<int64_t>(n) * (n_groups / kq::kSuperGroups * kq::kSuperBytes) +
                      j * kq::kSuperBytes;
  const uint32_t sc = __ldg(sb + kq::kScaleAt + i), mn = __ldg(sb + kq::kMinAt + i);
  return {__ldg(reinterpret_cast<const uint32_t*>(sb)), sc | (mn << 8)};
}

// The group's s and m in fp32 ({s, m}); has_offsets: whether the fp32 / fp16 form has offsets (else m = -8 s).
template <typename P>
__device__ __forceinline__ float2 group_sm(const RawGroup<P>& r, bool has_offsets) {
  const float s = param_float(r.s);
  return make_float2(s, has_offsets ? param_float(r.m) : kQ40Offset * s);
}
__device__ __forceinline__ float2 group_sm(const RawGroup<uint8_t>& r, bool) {
  return make_float2(kq_scale(r.d_dmin, r.sc_mn & 0xFFu), kq_offset(r.d_dmin, r.sc_mn >> 8));
}

// y [M, N] for rows m0 = blockIdx.y * MB .. of x and rows n0 = (blockIdx.x * warps + warp) * kGemvRows .. of W,
// warps = blockDim.x / 32; scales and offsets as in Operands. Dynamic shared memory: the x tile of `blocks` 32-channel
// blocks and its block sums (q4::gemv_x_word, q4::gemv_xsum_index; rows of x past M hold zeros).
template <typename T, typename P, int MB>
__global__ void __launch_bounds__(kGemvMaxWarps * kWarp)
    int4_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qweight, const P* __restrict__ scales,
                     const P* __restrict__ offsets, T* __restrict__ y, int M, int N, int K, int G, int blocks) {
  extern __shared__ float4 gemv_smem[];
  float4* xs = gemv_smem;                                                  // the x tile, float4 words
  float* xsum = reinterpret_cast<float*>(gemv_smem + MB * q4::kGemvPieces * q4::gemv_x_stride(blocks));
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  const int m0 = blockIdx.y * MB;
  const int rows_m = min(MB, M - m0);
  const int n0 = (blockIdx.x * warps + warp) * kGemvRows;
  const int n_groups = K / G;
  const int chunk = blocks * kBlock;  // channels per tile
  const bool has_offsets = offsets != nullptr;  // fp32 / fp16 form only (group_sm)

  const uint8_t* qrow[kGemvRows];  // weight rows (clamped to row 0 past N; their loads are skipped)
  bool row_ok[kGemvRows];
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r) {
    row_ok[r] = n0 + r < N;
    qrow[r] = qweight + static_cast<int64_t>(row_ok[r] ? n0 + r : 0) * (K / 2);
  }

  float acc[kGemvRows][MB];
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
    for (int m = 0; m < MB; ++m) acc[r][m] = 0.f;

  // The block's weights and group parameters, as stored: a prefetch is formed into s and m where it is used, so that
  // the lane does not wait for it right after issuing it.
  uint4 w[kGemvRows];
  RawGroup<P> par[kGemvRows];
  for (int c0 = 0; c0 < K; c0 += chunk) {
    const int kc = min(chunk, K - c0);  // channels in this chunk (a multiple of 32)
    const int n_blk = kc / kBlock;
    // Lane walks blocks blk = lane, lane + 32, ... of the chunk; block b = c0 / 32 + blk of the row.
    auto load_block = [&](int blk, uint4 (&w_out)[kGemvRows], RawGroup<P> (&par_out)[kGemvRows]) {
      const int b = c0 / kBlock + blk;
      const int g = b * kBlock / G;
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) {
        w_out[r] = make_uint4(0, 0, 0, 0);
        par_out[r] = RawGroup<P>{};
        if (row_ok[r]) {
          w_out[r] = __ldcs(reinterpret_cast<const uint4*>(qrow[r] + static_cast<int64_t>(b) * kBlockBytes));
          par_out[r] = load_group(scales, offsets, n0 + r, n_groups, g);
        }
      }
    };
    // The first weight loads go out before x is staged: the block does not wait a whole memory round trip after
    // the barrier below.
    if (lane < n_blk) load_block(lane, w, par);

    // Stage x[m0 : m0 + MB, c0 : c0 + kc] as fp32, 8 channels (pieces 2j, 2j + 1 of a block) per lane; a quad of
    // lanes covers one block and adds up its sum with two shuffles. Every lane of a warp runs the same iterations
    // (the shuffles need it).
    __syncthreads();  // the previous chunk is no longer read
    const int units_per_row = kc / 8;
    const int units = MB * units_per_row;
    for (int base = warp * kWarp; base < units; base += warps * kWarp) {
      const int u = base + lane;
      const int m = u / units_per_row;
      const int k = (u % units_per_row) * 8;
      const int blk = k / kBlock, piece = (k % kBlock) / 4;
      float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (u < units && m < rows_m) load8(x + static_cast<int64_t>(m0 + m) * K + c0 + k, v);
      if (u < units) {
        xs[q4::gemv_x_word(m, piece, blk, blocks)] = make_float4(v[0], v[1], v[2], v[3]);
        xs[q4::gemv_x_word(m, piece + 1, blk, blocks)] = make_float4(v[4], v[5], v[6], v[7]);
      }
      float s = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      if (u < units && lane % 4 == 0) xsum[q4::gemv_xsum_index(m, blk, blocks)] = s;
    }
    __syncthreads();

    for (int blk = lane; blk < n_blk; blk += kWarp) {
      uint4 w_next[kGemvRows];
      RawGroup<P> par_next[kGemvRows];
      if (blk + kWarp < n_blk) load_block(blk + kWarp, w_next, par_next);

      float part[kGemvRows][MB];  // sum over the block of (1 + q/16) * x
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
        for (int m = 0; m < MB; ++m) part[r][m] = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // word i of the block: channels 4i..4i+3 (low nibbles), 16+4i.. (high)
        // 1 + q/16 of the 8 channels (exact fp32), slot j: channel 4i + j (j < 4), 16 + 4i + j - 4 (j >= 4)
        float qf[kGemvRows][8];
#pragma unroll
        for (int r = 0; r < kGemvRows; ++r) {
          const uint32_t word = i == 0 ? w[r].x : i == 1 ? w[r].y : i == 2 ? w[r].z : w[r].w;
#pragma unroll
          for (int shift = 0; shift < 16; shift += 4) {
            const float2 f = unit_pair_to_float2(q4::unit_pair_bits(word, shift));
            const int c0_ = q4::gemv_channel(i, shift, 0), c1_ = q4::gemv_channel(i, shift, 1);
            qf[r][(c0_ >= 16 ? 4 : 0) + c0_ % 4] = f.x;
            qf[r][(c1_ >= 16 ? 4 : 0) + c1_ % 4] = f.y;
          }
        }
#pragma unroll
        for (int m = 0; m < MB; ++m) {
          const float4 lo = xs[q4::gemv_x_word(m, i, blk, blocks)];      // channels 4i .. 4i + 3
          const float4 hi = xs[q4::gemv_x_word(m, 4 + i, blk, blocks)];  // channels 16 + 4i ..
          const float xv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
          for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
            for (int j = 0; j < 8; ++j) part[r][m] = fmaf(qf[r][j], xv[j], part[r][m]);
        }
      }
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) {
        const float2 sm = group_sm(par[r], has_offsets);  // the group's s and m
        const float s16 = q4::kUnitScale * sm.x;           // exact
#pragma unroll
        for (int m = 0; m < MB; ++m) {
          // sum (q s + m) x = 16 s (part - sum x) + m sum x
          const float xs_blk = xsum[q4::gemv_xsum_index(m, blk, blocks)];
          acc[r][m] = fmaf(sm.y, xs_blk, fmaf(s16, part[r][m] - xs_blk, acc[r][m]));
        }
      }

#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) {
        w[r] = w_next[r];
        par[r] = par_next[r];
      }
    }
  }

  // Reduce over the warp; lane r * MB + m stores y[m0 + m, n0 + r].
#pragma unroll
  for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      const float v = warp_sum(acc[r][m]);
      if (lane == r * MB + m && row_ok[r] && m < rows_m) {
        y[static_cast<int64_t>(m0 + m) * N + n0 + r] = from_float<T>(v);
      }
    }
}

// Warps per GEMV block: kGemvMaxWarps, halved while the grid would leave SMs idle (SmolLM2's 960-row qkv is 60
// blocks of 4 warps on a 132-SM H100; 240 of 1 warp).
int gemv_warps(int N, int grid_y, int sms) {
  int warps = kGemvMaxWarps;
  while (warps > 1 && static_cast<int64_t>((N + warps * kGemvRows - 1) / (warps * kGemvRows)) * grid_y < sms) {
    warps /= 2;
  }
  return warps;
}

template <int MB, typename T, typename P>
void launch_gemv(const Operands<T, P>& op, cudaStream_t stream) {
  static_assert(kGemvRows * MB <= kWarp, "one lane stores each output of a warp");
  const int blocks = q4::gemv_chunk_blocks(MB, op.K, kGemvSmemBytes);
  const int grid_y = (op.M + MB - 1) / MB;
  TORCH_CHECK(grid_y <= 65535, "int4_linear: too many rows of x for the GEMV path: M = ", op.M);
  const int warps = gemv_warps(op.N, grid_y, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const dim3 grid((op.N + warps * kGemvRows - 1) / (warps * kGemvRows), grid_y);
  int4_gemv_kernel<T, P, MB><<<grid, warps * kWarp, q4::gemv_smem_bytes(MB, blocks), stream>>>(
      op.x, op.qweight, op.scales, op.offsets, op.y, op.M, op.N, op.K, op.G, blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename P>
void run_gemv(const Operands<T, P>& op, cudaStream_t stream) {
  switch (std::min(op.M, kGemvMaxM)) {
    case 1: return launch_gemv<1>(op, stream);
    case 2: return launch_gemv<2>(op, stream);
    case 3: return launch_gemv<3>(op, stream);
    case 4: return launch_gemv<4>(op, stream);
    case 5: return launch_gemv<5>(op, stream);
    case 6: return launch_gemv<6>(op, stream);
    case 7: return launch_gemv<7>(op, stream);
    default: return launch_gemv<8>(op, stream);
  }
}

// ================================================================================================================
// GEMM path (tensor cores)
// ================================================================================================================

constexpr int kBK = 32;  // k per pipeline tile: one 16-byte block of each weight row
static_assert(kBK == kBlock, "a k tile is one block of the layout");

// ---- PTX wrappers (cp_async16, cp_async_commit, cp_async_wait, ldmatrix_x4, mma_m16n8k16: helpers.cuh) ----

// 4 bytes global -> shared, asynchronously; src_bytes (0..4) of them read from src (4-byte aligned, a valid address
// even when 0), the rest zero-filled.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}

// ---- group parameters in shared memory: kParamSlots<P> 4-byte slots per weight row (see the top of the file) ----

// fp32 / fp16: the scale and the offset; K-quant: the superblock's first word, the words holding sc and mn.
template <typename P>
constexpr int kParamSlots = kKQuant<P> ? 3 : 2;

// Parameter *src -> its slot, asynchronously; zero-filled when !ok (src must still be a valid address). fp16: the
// 4-byte word holding it (the tensor's data 4-byte aligned), whole when it is the upper half, else its lower 2 bytes.
__device__ __forceinline__ void stage_param(void* slot, const float* src, bool ok) { cp_async4(slot, src, ok ? 4 : 0); }
__device__ __forceinline__ void stage_param(void* slot, const __half* src, bool ok) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(src);
  const bool upper = (a & 2) != 0;
  cp_async4(slot, reinterpret_cast<const void*>(a & ~uintptr_t{3}), !ok ? 0 : upper ? 4 : 2);
}

// Whether parameter (n, g) of an fp16 [N, n_groups] tensor with 4-byte aligned data is the upper half of its word:
// whether its index n * n_groups + g is odd.
__device__ __forceinline__ bool param_upper(int n, int n_groups, int g) { return ((n & n_groups) ^ g) & 1; }

// A staged parameter, widened to fp32; `upper`: param_upper (fp16 only).
template <typename P>
__device__ __forceinline__ float param_from_slot(uint32_t slot, bool upper) {
  if constexpr (std::is_same_v<P, __half>) {
    return __half2float(bit_cast<__half>(static_cast<uint16_t>(upper ? slot >> 16 : slot)));
  } else {
    return bit_cast<float>(slot);
  }
}

// Byte b (0..3) of a staged K-quant word (sc or mn of group g: b = g % 4).
__device__ __forceinline__ uint32_t slot_byte(uint32_t slot, int b) { return (slot >> (8 * b)) & 0xFFu; }

// The s and m in fp32 of group g of weight row n = n0 + col, staged at slots params[k * BN + col] (k < kParamSlots).
template <typename P, int BN>
__device__ __forceinline__ float staged_scale(const uint32_t* params, int col, int n, int n_groups, int g) {
  if constexpr (kKQuant<P>) {
    return kq_scale(params[col], slot_byte(params[BN + col], g % 4));
  } else {
    return param_from_slot<P>(params[col], param_upper(n, n_groups, g));
  }
}
template <typename P, int BN>
__device__ __forceinline__ float staged_offset(const uint32_t* params, int col, int n, int n_groups, int g) {
  if constexpr (kKQuant<P>) {
    return kq_offset(params[col], slot_byte(params[2 * BN + col], g % 4));
  } else {
    return param_from_slot<P>(params[BN + col], param_upper(n, n_groups, g));
  }
}

// Per activation dtype: the 16-bit pair type and the magic numbers of the nibble conversion.
template <typename T>
struct MmaType;

template <>
struct MmaType<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = q4::kFp16Magic;        // two fp16 1024; | q gives 1024 + q
  static constexpr uint32_t kMagic8 = kMagic + 0x00080008u;  // two fp16 1032 = 1024 + 8 (the ulp at 1024 is 1)
  __device__ static T2 splat(float v) { return __float2half2_rn(v); }
};

template <>
struct MmaType<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = q4::kBf16Magic;        // two bf16 128; | q gives 128 + q
  static constexpr uint32_t kMagic8 = kMagic + 0x00080008u;  // two bf16 136 = 128 + 8 (the ulp at 128 is 1)
  __device__ static T2 splat(float v) { return __float2bfloat162_rn(v); }
};

// A pair of nibbles (q4::pair_bits) -> two weights (q - 8) * scale in T, as one mma register. (magic + q) - (magic + 8)
// is exact; the product is rounded once.
template <typename T>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t pair, typename MmaType<T>::T2 scale) {
  using T2 = typename MmaType<T>::T2;
  const T2 biased = bit_cast<T2>(pair | MmaType<T>::kMagic);
  const T2 centered = __hsub2(biased, bit_cast<T2>(MmaType<T>::kMagic8));
  return bit_cast<uint32_t>(__hmul2(centered, scale));
}

// Tile shapes: warps WM x WN, each with MT x NT mma tiles of 16 x 8; STAGES tiles of k in flight; SLOTS: group
// parameter slots per weight row (kParamSlots).
template <int WM_, int WN_, int MT_, int NT_, int STAGES_, int SLOTS_>
struct GemmConfig {
  static constexpr int WM = WM_, WN = WN_, MT = MT_, NT = NT_, STAGES = STAGES_, SLOTS = SLOTS_;
  static constexpr int kThreads = WM * WN * kWarp;
  static constexpr int BM = WM * MT * 16;
  static constexpr int BN = WN * NT * 8;
  // One pipeline stage in shared memory:
  static constexpr int kABytes = BM * kBK * 2;      // x [BM, 32] fp16/bf16, rows of 4 swizzled 16-byte chunks
  static constexpr int kBBytes = BN * kBlockBytes;  // qweight [BN, 16 bytes], as stored
  // group-start tiles only: SLOTS slots [SLOTS, BN] (scales and offsets, or the K-quant words), xsum [BM] fp32
  static constexpr int kParamBytes = (SLOTS * BN + BM) * 4;
  static constexpr int kStageBytes = kABytes + kBBytes + kParamBytes;
  static constexpr int kSmemBytes = STAGES * kStageBytes;
  static_assert(kSmemBytes <= 48 * 1024, "keep the pipeline under 48 KB (no opt-in attribute needed)");
  static_assert(kStageBytes % 16 == 0, "stages stay 16-byte aligned");
  static_assert(BN <= kThreads && BM <= kThreads, "one thread stages each weight row's and x row's parameters");
};

// Shared memory per block (STAGES * kStageBytes), 2 slots (fp32 / fp16) and 3 (K-quant): 33280 and 37376 bytes
// (small), 44544 and 47616 (medium), 47104 and 49152 (large).
template <int SLOTS>
using GemmSmall = GemmConfig<1, 4, 1, 4, 8, SLOTS>;   // 16 x 128 tile, 128 threads: M <= 16
template <int SLOTS>
using GemmMedium = GemmConfig<2, 2, 2, 8, 6, SLOTS>;  // 64 x 128 tile, 128 threads: M <= 64
template <int SLOTS>
using GemmLarge = GemmConfig<2, 4, 4, 4, 4, SLOTS>;   // 128 x 128 tile, 256 threads

// 16-byte chunk `chunk` (0..3) of row `row` of an x tile sits at chunk ^ ((row / 2) % 4): the 8 rows one ldmatrix
// phase reads (same logical chunk) then fall in 8 different 16-byte bank groups.
__device__ __forceinline__ int a_chunk(int row, int chunk) { return chunk ^ ((row >> 1) & 3); }

// Block (blockIdx.x, blockIdx.y, blockIdx.z) computes y[m0 : m0 + BM, n0 : n0 + BN] over k tiles
// [z * tiles_per_split, (z + 1) * tiles_per_split). With partial != nullptr it writes fp32 partial sums
// partial[z, m, n] (fp32 [splits, M, N]) instead of y. scales and offsets as in Operands. kOffsets (always with
// K-quant superblocks): the offset term is added, from xsum (fp32 [M, K/G], x summed over each group); else offsets
// and xsum are nullptr and m = -8 s.
template <typename T, typename P, bool kOffsets, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    int4_gemm_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qweight, const P* __restrict__ scales,
                     const P* __restrict__ offsets, const float* __restrict__ xsum, T* __restrict__ y,
                     float* __restrict__ partial, int M, int N, int K, int G, int tiles_per_split) {
  using Mma = MmaType<T>;
  using T2 = typename Mma::T2;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, MT = Cfg::MT, NT = Cfg::NT, STAGES = Cfg::STAGES;
  static_assert(Cfg::SLOTS == kParamSlots<P>, "the stage layout has the parameter form's slots");
  static_assert(kOffsets || !kKQuant<P>, "K-quant groups always have an offset term");
  extern __shared__ float4 gemm_smem[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(gemm_smem);

  const int tid = threadIdx.x;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int warp_m = warp / Cfg::WN;
  const int warp_n = warp % Cfg::WN;
  const int m0 = blockIdx.y * BM;
  const int n0 = blockIdx.x * BN;
  const int n_groups = K / G;
  const int tiles_per_group = G / kBK;
  const int kt_begin = blockIdx.z * tiles_per_split;
  const int kt_end = min(K / kBK, kt_begin + tiles_per_split);

  // What this thread copies per stage, fixed over the k loop (row and column bases hoisted; each stage adds its k
  // offset): A_ITERS 16-byte chunks of the x tile, B_ITERS weight rows with their group parameters, and (tid < BM,
  // with offsets) the xsum of x row m0 + tid.
  constexpr int A_ITERS = (BM * 4 + Cfg::kThreads - 1) / Cfg::kThreads;
  constexpr int B_ITERS = (BN + Cfg::kThreads - 1) / Cfg::kThreads;
  const T* a_src[A_ITERS];  // x row (row 0 past M: a valid address, the copy zero-fills) at the chunk's column
  uint32_t a_ok = 0;        // bit it: the chunk's row is inside x
#pragma unroll
  for (int it = 0; it < A_ITERS; ++it) {
    const int i = tid + it * Cfg::kThreads;
    const bool ok = m0 + i / 4 < M;
    a_ok |= static_cast<uint32_t>(ok) << it;
    a_src[it] = x + static_cast<int64_t>(ok ? m0 + i / 4 : 0) * K + (i % 4) * 8;
  }
  const uint8_t* b_src[B_ITERS];  // weight row (row 0 past N)
  const P* s_src[B_ITERS];        // its scales, offsets at the same offset from `offsets`; or its superblocks
  bool b_ok[B_ITERS], b_live[B_ITERS];
#pragma unroll
  for (int it = 0; it < B_ITERS; ++it) {
    const int i = tid + it * Cfg::kThreads;
    b_live[it] = i < BN;
    b_ok[it] = n0 + i < N;
    const int64_t n = b_ok[it] ? n0 + i : 0;
    b_src[it] = qweight + n * (K / 2);
    s_src[it] = scales + n * (kKQuant<P> ? n_groups / kq::kSuperGroups * kq::kSuperBytes : n_groups);
  }
  const bool xs_ok = m0 + tid < M;
  const float* xs_src = nullptr;  // xsum row (row 0 past M)
  if constexpr (kOffsets) xs_src = xsum + static_cast<int64_t>(xs_ok ? m0 + tid : 0) * n_groups;

  // Tiles are loaded in order kt_begin, kt_begin + 1, ...: a running group counter instead of a division per tile.
  // What forms s is (re)loaded at the first tile of each group and of the split; what forms m, and xsum, at the first
  // tile of each group only (where its offset term is added).
  int load_kt = kt_begin;
  int load_g = kt_begin / tiles_per_group;
  int load_r = kt_begin - load_g * tiles_per_group;  // tile's index within its group
  auto load_stage = [&](int stage) {
    uint8_t* st = smem + stage * Cfg::kStageBytes;
#pragma unroll
    for (int it = 0; it < A_ITERS; ++it) {
      const int i = tid + it * Cfg::kThreads;
      if (i < BM * 4) cp_async16(st + (i / 4) * 64 + a_chunk(i / 4, i % 4) * 16, a_src[it] + load_kt * kBK,
                                 (a_ok >> it) & 1u);
    }
#pragma unroll
    for (int it = 0; it < B_ITERS; ++it)
      if (b_live[it]) {
        const int i = tid + it * Cfg::kThreads;
        cp_async16(st + Cfg::kABytes + i * kBlockBytes, b_src[it] + load_kt * kBlockBytes, b_ok[it]);
      }
    if (load_kt == kt_begin || load_r == 0) {
      uint32_t* params = reinterpret_cast<uint32_t*>(st + Cfg::kABytes + Cfg::kBBytes);  // slots [SLOTS, BN] | xsum
#pragma unroll
      for (int it = 0; it < B_ITERS; ++it)
        if (b_live[it]) {
          const int i = tid + it * Cfg::kThreads;
          if constexpr (kKQuant<P>) {
            // the superblock of group load_g: its first word (d, dmin), the words holding the group's sc and mn
            const uint8_t* sb = s_src[it] + (load_g / kq::kSuperGroups) * kq::kSuperBytes;
            const int word = (load_g % kq::kSuperGroups) & ~3;  // the words' offset within sc and mn: 0 or 4
            const int bytes = b_ok[it] ? 4 : 0;
            cp_async4(params + i, sb, bytes);
            cp_async4(params + BN + i, sb + kq::kScaleAt + word, bytes);
            if (load_r == 0) cp_async4(params + 2 * BN + i, sb + kq::kMinAt + word, bytes);
          } else {
            const P* sp = s_src[it] + load_g;
            stage_param(params + i, sp, b_ok[it]);
            if constexpr (kOffsets) {
              if (load_r == 0) stage_param(params + BN + i, offsets + (sp - scales), b_ok[it]);
            }
          }
        }
      if constexpr (kOffsets) {
        if (load_r == 0 && tid < BM) cp_async4(params + Cfg::SLOTS * BN + tid, xs_src + load_g, xs_ok ? 4 : 0);
      }
    }
    ++load_kt;
    if (++load_r == tiles_per_group) {
      load_r = 0;
      ++load_g;
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

  // Prologue: tiles kt_begin .. kt_begin + STAGES - 2 in flight (one commit group per tile, empty past the end).
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (kt_begin + s < kt_end) load_stage(s);
    cp_async_commit();
  }

  T2 scale2[NT];  // the current group's scale of each n8 tile's B column (groupID), splatted
  const int quad = lane / 4;  // mma groupID: row of A / C, column (output channel) of B
  const int t = lane % 4;     // mma thread in group
  int cur_g = kt_begin / tiles_per_group;  // tile kt's group
  int cur_r = kt_begin % tiles_per_group;  // tile kt's index within its group
  for (int kt = kt_begin; kt < kt_end; ++kt) {
    const int i = kt - kt_begin;
    cp_async_wait<STAGES - 2>();  // tile kt has landed (for this thread) ...
    __syncthreads();              // ... for every thread; and tile kt - 1's stage is free to refill
    if (kt + STAGES - 1 < kt_end) load_stage((i + STAGES - 1) % STAGES);  // tile kt + STAGES - 1
    cp_async_commit();

    const uint8_t* st = smem + (i % STAGES) * Cfg::kStageBytes;
    const uint8_t* b_tile = st + Cfg::kABytes;
    const bool group_first = cur_r == 0;  // the group's first tile: its offset term is added here
    const int g = cur_g;
    if (++cur_r == tiles_per_group) {
      cur_r = 0;
      ++cur_g;
    }
    if (kt == kt_begin || group_first) {
      const uint32_t* params = reinterpret_cast<const uint32_t*>(b_tile + Cfg::kBBytes);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int col = (warp_n * NT + nt) * 8 + quad;
        scale2[nt] = Mma::splat(staged_scale<P, BN>(params, col, n0 + col, n_groups, g));
      }
      if constexpr (kOffsets) {
        if (group_first) {
          // acc[i][n] += xsum[i, g] * (m + 8 s)[n, g]: accumulator e of tile (mt, nt) is row quad + 8 * (e / 2),
          // column 2t + e % 2
          const float* xs_tile = reinterpret_cast<const float*>(params + Cfg::SLOTS * BN);
          float xs[MT][2];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) xs[mt][h] = xs_tile[(warp_m * MT + mt) * 16 + quad + 8 * h];
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              const int col = (warp_n * NT + nt) * 8 + 2 * t + j;
              const float c = fmaf(-kQ40Offset, staged_scale<P, BN>(params, col, n0 + col, n_groups, g),
                                   staged_offset<P, BN>(params, col, n0 + col, n_groups, g));
#pragma unroll
              for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int h = 0; h < 2; ++h) acc[mt][nt][2 * h + j] = fmaf(xs[mt][h], c, acc[mt][nt][2 * h + j]);
            }
        }
      }
    }
    // Bytes 2t, 2t+1, 2t+8, 2t+9 of each of the warp's weight rows: both k steps of B.
    uint32_t b_word[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint8_t* row = b_tile + ((warp_n * NT + nt) * 8 + quad) * kBlockBytes;
      const uint32_t lo = *reinterpret_cast<const uint16_t*>(row + 2 * t);
      const uint32_t hi = *reinterpret_cast<const uint16_t*>(row + 2 * t + 8);
      b_word[nt] = q4::mma_b_word(lo, hi);
    }
#pragma unroll
    for (int step = 0; step < 2; ++step) {  // k 0..15, 16..31 of the tile
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        // ldmatrix.x4: lanes 0-15 address rows 0-15 at k 0..7 of the step, lanes 16-31 the same rows at k 8..15
        const int row = (warp_m * MT + mt) * 16 + lane % 16;
        ldmatrix_x4(a[mt], st + row * 64 + a_chunk(row, 2 * step + lane / 16) * 16);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint32_t b[2] = {dequant_pair<T>(q4::pair_bits(b_word[nt], q4::mma_b_shift(step, 0)), scale2[nt]),
                               dequant_pair<T>(q4::pair_bits(b_word[nt], q4::mma_b_shift(step, 1)), scale2[nt])};
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma_m16n8k16<T>(acc[mt][nt], a[mt], b[0], b[1]);
      }
    }
  }
  cp_async_wait<0>();  // nothing real is left in flight; retire the empty groups before exit

  // Epilogue: accumulator e of tile (mt, nt) is row quad + 8 * (e / 2), column 2t + e % 2.
  const bool pairs = N % 2 == 0;  // then (row * N + even column) is even: 2-element stores are aligned
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + (warp_m * MT + mt) * 16 + quad + 8 * h;
        const int n = n0 + (warp_n * NT + nt) * 8 + 2 * t;
        if (m >= M || n >= N) continue;
        const float v0 = acc[mt][nt][2 * h], v1 = acc[mt][nt][2 * h + 1];
        if (partial != nullptr) {
          float* dst = partial + (static_cast<int64_t>(blockIdx.z) * M + m) * N + n;
          if (pairs) {
            *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
          } else {
            dst[0] = v0;
            if (n + 1 < N) dst[1] = v1;
          }
        } else {
          T* dst = y + static_cast<int64_t>(m) * N + n;
          if (pairs) {
            *reinterpret_cast<T2*>(dst) = T2{from_float<T>(v0), from_float<T>(v1)};
          } else {
            dst[0] = from_float<T>(v0);
            if (n + 1 < N) dst[1] = from_float<T>(v1);
          }
        }
      }
}

// y[i] = sum over splits of partial[s, i], in split order, rounded once. partial fp32 [splits, M * N].
template <typename T>
__global__ void splitk_reduce_kernel(const float* __restrict__ partial, T* __restrict__ y, int64_t count,
                                     int splits) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int z = 0; z < splits; ++z) s += partial[z * count + i];
    y[i] = from_float<T>(s);
  }
}

constexpr int kMaxSplits = 16;
constexpr int kMinTilesPerSplit = 8;  // k tiles (of 32) per split: enough to fill the pipeline

// xsum: fp32 [M, K/G] with kOffsets, else nullptr.
template <bool kOffsets, typename Cfg, typename T, typename P>
void launch_gemm(const Operands<T, P>& op, const float* xsum, const at::TensorOptions& float_options,
                 cudaStream_t stream) {
  const int M = op.M, N = op.N;
  const int tiles_m = (M + Cfg::BM - 1) / Cfg::BM;
  const int tiles_n = (N + Cfg::BN - 1) / Cfg::BN;
  TORCH_CHECK(tiles_m <= 65535, "int4_linear: too many rows of x: M = ", M);
  const int k_tiles = op.K / kBK;
  // Split K when the output tiles leave the GPU underused: aim at two blocks per SM.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int splits = 1;
  if (tiles_m * tiles_n < sms) {
    const int wanted = (2 * sms + tiles_m * tiles_n - 1) / (tiles_m * tiles_n);
    splits = std::max(1, std::min({wanted, kMaxSplits, k_tiles / kMinTilesPerSplit}));
  }
  const int tiles_per_split = (k_tiles + splits - 1) / splits;
  splits = (k_tiles + tiles_per_split - 1) / tiles_per_split;  // no empty split

  at::Tensor partial;  // fp32 [splits, M, N], from the caching allocator (graph-safe)
  if (splits > 1) partial = at::empty({splits, M, N}, float_options);
  const dim3 grid(tiles_n, tiles_m, splits);
  int4_gemm_kernel<T, P, kOffsets, Cfg><<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(
      op.x, op.qweight, op.scales, op.offsets, xsum, op.y, splits > 1 ? partial.data_ptr<float>() : nullptr, M, N,
      op.K, op.G, tiles_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t count = static_cast<int64_t>(M) * N;
    const int threads = 256;
    const int blocks = static_cast<int>(std::min<int64_t>((count + threads - 1) / threads, 4 * sms));
    splitk_reduce_kernel<T><<<blocks, threads, 0, stream>>>(partial.const_data_ptr<float>(), op.y, count, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <bool kOffsets, typename T, typename P>
void run_gemm_tiles(const Operands<T, P>& op, const float* xsum, const at::TensorOptions& float_options,
                    cudaStream_t stream) {
  constexpr int S = kParamSlots<P>;
  if (op.M <= GemmSmall<S>::BM) return launch_gemm<kOffsets, GemmSmall<S>>(op, xsum, float_options, stream);
  if (op.M <= GemmMedium<S>::BM) return launch_gemm<kOffsets, GemmMedium<S>>(op, xsum, float_options, stream);
  launch_gemm<kOffsets, GemmLarge<S>>(op, xsum, float_options, stream);
}

// x2: op.x as a tensor, contiguous [M, K].
template <typename T, typename P>
void run_gemm(const Operands<T, P>& op, const at::Tensor& x2, cudaStream_t stream) {
  const auto float_options = x2.options().dtype(at::kFloat);
  if constexpr (!kKQuant<P>) {  // K-quant superblocks always have offsets
    if (op.offsets == nullptr) return run_gemm_tiles<false>(op, nullptr, float_options, stream);
  }
  // x summed over each group in fp32 (one reduction on the current stream; the sum accumulates in fp32 without an
  // fp32 copy of x): fp32 [M, K/G]
  const at::Tensor xsum = x2.view({op.M, op.K / op.G, op.G}).sum(2, /*keepdim=*/false, at::kFloat);
  run_gemm_tiles<true>(op, xsum.const_data_ptr<float>(), float_options, stream);
}

// ================================================================================================================
// Launcher
// ================================================================================================================

enum class Path { kAuto, kGemv, kGemm };

// TINYCHAT_INT4_CUDA_PATH: unset / "" / auto, gemv or gemm (read per call, so tests can switch it).
Path requested_path() {
  const char* env = std::getenv("TINYCHAT_INT4_CUDA_PATH");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return Path::kAuto;
  if (std::strcmp(env, "gemv") == 0) return Path::kGemv;
  if (std::strcmp(env, "gemm") == 0) return Path::kGemm;
  TORCH_CHECK(false, "TINYCHAT_INT4_CUDA_PATH must be auto, gemv or gemm, got '", env, "'");
}

// Every argument of int4_linear on CUDA: the CPU kernel's rules (checks.h: the three forms of the group parameters),
// qweight's alignment and 32-bit sizes.
void check_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                const c10::optional<at::Tensor>& offsets, int64_t group_size) {
  const char* op = "int4_linear";
  check_int4_linear_args(x, qweight, scales, offsets, group_size, c10::DeviceType::CUDA);
  TORCH_CHECK(x.size(-1) <= INT32_MAX / 2, op, ": K too large: ", x.size(-1));
  TORCH_CHECK(qweight.size(0) <= INT32_MAX, op, ": N too large: ", qweight.size(0));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(qweight.const_data_ptr()) % 16 == 0, op,
              ": qweight's data must be 16-byte aligned (the CUDA kernels load 16 bytes at a time)");
}

// t itself when its data is 4-byte aligned, else a contiguous copy in a fresh allocation: the GEMM stages fp16 group
// parameters by the 4-byte words that hold them (stage_param), and both paths read a K-quant superblock's d and dmin
// as one 4-byte word.
at::Tensor aligned4(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 4 == 0 ? t : t.clone(at::MemoryFormat::Contiguous);
}

template <typename E>  // the kernels' element type for the tensor's dtype (float, __half, __nv_bfloat16, uint8_t)
const E* data(const at::Tensor& t) {
  return static_cast<const E*>(t.const_data_ptr());
}

// One call with x's element type T and the parameters' P (float, __half; uint8_t: K-quant superblocks). x2 [M, K]
// contiguous and 16-byte aligned, y [M, N]; gemv: the GEMV path (always for fp32 x).
template <typename T, typename P>
void run(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales,
         const c10::optional<at::Tensor>& offsets, at::Tensor& y, int64_t group_size, bool gemv,
         cudaStream_t stream) {
  // Parameters read by 4-byte words need 4-byte aligned data (aligned4): superblocks on both paths, fp16 parameters
  // in the GEMM. The tensors the kernels read, kept alive until the launch is queued (the allocator is stream-ordered).
  const bool words = kKQuant<P> || (std::is_same_v<P, __half> && !gemv);
  const at::Tensor s = words ? aligned4(scales) : scales;
  const at::Tensor o = !offsets.has_value() ? at::Tensor() : words ? aligned4(*offsets) : *offsets;
  const Operands<T, P> op{data<T>(x2),
                          data<uint8_t>(qweight),
                          data<P>(s),
                          o.defined() ? data<P>(o) : nullptr,
                          static_cast<T*>(y.data_ptr()),
                          static_cast<int>(x2.size(0)),
                          static_cast<int>(qweight.size(0)),
                          static_cast<int>(x2.size(1)),
                          static_cast<int>(group_size)};
  if constexpr (std::is_same_v<T, float>) {
    run_gemv(op, stream);  // fp32 x: the GEMV only
  } else if (gemv) {
    run_gemv(op, stream);
  } else {
    run_gemm(op, x2, stream);
  }
}

template <typename T>
void run_for_params(const at::Tensor& x2, const at::Tensor& qweight, const at::Tensor& scales,
                    const c10::optional<at::Tensor>& offsets, at::Tensor& y, int64_t group_size, bool gemv,
                    cudaStream_t stream) {
  switch (scales.scalar_type()) {
    case at::kHalf:
      run<T, __half>(x2, qweight, scales, offsets, y, group_size, gemv, stream);
      break;
    case at::kByte:  // K-quant superblocks
      run<T, uint8_t>(x2, qweight, scales, offsets, y, group_size, gemv, stream);
      break;
    default:  // float32 (check_args allows nothing else)
      run<T, float>(x2, qweight, scales, offsets, y, group_size, gemv, stream);
  }
}

at::Tensor int4_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& offsets, int64_t group_size) {
  check_args(x, qweight, scales, offsets, group_size);
  const c10::cuda::CUDAGuard guard(x.device());
  check_sm80("int4_linear");
  const int64_t K = x.size(-1);
  const int64_t N = qweight.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  if (x.numel() == 0 || N == 0) return at::zeros(out_shape, x.options());

  // [M, K]: a view when x is contiguous and 16-byte aligned (its rows are loaded 16 bytes at a time), else a copy
  const at::Tensor x2 = aligned_rows16(x.reshape({-1, K}).contiguous());
  const int64_t M = x2.size(0);
  TORCH_CHECK(M <= INT32_MAX, "int4_linear: too many rows of x: ", M);
  at::Tensor y = at::empty({M, N}, x.options());  // [M, N]

  const Path wanted = requested_path();
  const bool is_fp32 = x.scalar_type() == at::kFloat;
  TORCH_CHECK(!(is_fp32 && wanted == Path::kGemm),
              "int4_linear: TINYCHAT_INT4_CUDA_PATH=gemm needs fp16 or bf16 x (the tensor-core path); x is float32");
  const bool gemv = is_fp32 || wanted == Path::kGemv || (wanted == Path::kAuto && M <= kGemvAutoMaxM);

  const auto stream = at::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kHalf:
      run_for_params<__half>(x2, qweight, scales, offsets, y, group_size, gemv, stream);
      break;
    case at::kBFloat16:
      run_for_params<__nv_bfloat16>(x2, qweight, scales, offsets, y, group_size, gemv, stream);
      break;
    default:  // float32 (check_args allows nothing else)
      run_for_params<float>(x2, qweight, scales, offsets, y, group_size, gemv, stream);
  }
  return y.view(out_shape);
}

}  // namespace
}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CUDA, m) {
  m.impl("int4_linear", &tinychat::int4_linear_cuda);
}
