// CPU kernels of int4_linear (schema in csrc/ops.cpp; weight layout in tinychat/int4_layout.py).
//
// y[m, n] = sum_k x[m, k] * W[n, k], W[n, k] = q[n, k] * s + m with s, m the scale and offset of group (n, k/G)
// (fp32 or fp16 as stored, widened exactly; m = -8 s without offsets), fp32 math, each output rounded to x's dtype
// once.
//
// Layout: qweight uint8 [N, K/2] in blocks of 32 input channels; byte j (0..15) of block b holds channel 32b + j in
// its low nibble and channel 32b + 16 + j in its high nibble. One 16-byte load thus gives 32 weights as two
// contiguous runs of 16 (mask, shift), which widen straight to fp32 lanes with no shuffle.
//
// One GEMV-style kernel over rows of W for every M (decode and prefill alike; on AVX-512 VNNI a GEMM past kExactRows
// rows of x, below): per row and group it accumulates
// sum_k q[k] * x[m, k] in SIMD registers for up to kMaxMB rows of x at once, then applies the group's scale; the
// offset term m * sum_{k in g} x[m, k] uses per-group sums of x computed once per call. Each weight byte is read
// from memory once per kMaxMB rows of x; x stays in L1. On the fp32 paths each output row is computed the same way
// whatever M is (batch-invariant), so a prompt prefilled in parts gives the logits of one whole prefill (VNNI rounds
// x by M: see there). (A dequantize + torch GEMM path for M >= 16 was faster only from about 256 rows on, and broke
// that invariance: measured on an EPYC, 2 threads, SmolLM2's MLP, the kernel took 0.61 / 2.39 / 7.61 ms at
// M = 16 / 64 / 256 against 1.16 / 2.17 / 7.60 for the GEMM (AVX-512; AVX2 0.63 / 2.88 / 12.09 against 2.54 / 5.07 /
// 10.45).)
//
// Instruction sets: AVX-512 with VNNI (x rounded to int8 by M: up to 8 rows of x and 2 or 4 rows of W a pass in
// the GEMV, tiles of 6 rows of x by 32 rows of W in the GEMM; see "AVX-512 VNNI" below), AVX-512 (F/BW/VL/DQ),
// AVX2 + FMA, and portable C++ (which the compiler vectorizes as it can; NEON on ARM through that path), picked at
// run time (isa.h).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/checks.h"
#include "isa.h"
#include "kernels.h"
#include "linear.h"
#include "vec.h"

namespace tinychat {

namespace {

constexpr int64_t kBlock = 32;            // input channels per 16 bytes of qweight
constexpr int kMaxMB = 4;                 // rows of x a GEMV pass handles together
constexpr int kMaxMBVnni = 8;             // the same on the VNNI path (its accumulators are fewer registers)
constexpr int64_t kFineRows = kMaxMBVnni;  // the VNNI GEMV rounds x at two int8 levels in calls of up to this many rows
constexpr int kGemvLevels = 2;             // (those levels)
constexpr int kGemmLevels = 1;             // and the GEMM past kExactRows rows at one level
constexpr int64_t kExactRows = 64;         // and leaves x in fp32 (the AVX-512 kernels) in calls of up to this many
constexpr int64_t kQuadRowsMaxM = 2;       // the VNNI GEMV takes rows of W 4 at a time up to this many rows of x

// x rounded to int8 per block of 32 channels, in the order the VNNI kernel multiplies it with a row's bytes: a
// 64-byte load of qweight (a chunk) holds 4 blocks, whose low nibbles are channels 32b + j and high nibbles
// 32b + 16 + j. So for chunk c and row m of x, q8[c, m] holds 64 bytes "lo" (x[m, 32b + j] for the chunk's blocks b
// in turn, 16 bytes a block) then 64 bytes "hi" (x[m, 32b + 16 + j]); chunk-major, so that the rows of x a kernel
// call multiplies sit at constant offsets. With two levels (levels = 2), 64 bytes "lo" and "hi" of the fine level
// follow: x = s * (q1 + q2 / 256), q1 the block's int8 code (s = absmax / 127) and q2 = round(256 (x / s - q1)), in
// [-127, 127]: about 16 bits, for 2 more vpdpbusd a chunk. lane_scales [chunks, M, 16]: the scale of the unit the
// int32 dot products of each lane count (s, or s / 256 with two levels: lanes 4i..4i+3: block 4c + i); blocks past K
// are zeros with scale 0.
struct Int8Activations {
  std::vector<int8_t> q8;          // [chunks, M, levels, 2, 64]
  std::vector<float> lane_scales;  // [chunks, M, 16]
  std::vector<float> group_sums;   // [M, K/G]: the sum of the rounded x over each group (for the offset term)
  int64_t chunks;
  int levels;                       // 1 or 2
  std::vector<uint8_t> group_mask;  // [chunks]: which of the 4 scales loaded from the chunk's first group are real
  std::vector<int32_t> chunk_group;  // [chunks]: the chunk's first group
  int64_t full_chunks;  // chunks 0 .. full_chunks - 1 lie whole in a row and have 4 groups' scales from their first
  std::array<int32_t, 16> lane_group;  // the group of lane l's block, from the chunk's first group
};

// The problem, as raw pointers. x fp32 [M, K] (rows contiguous); xsum fp32 [M, K/G] (sum of x over each group).
struct Problem {
  const float* x;
  const float* xsum;
  const uint8_t* q;       // [N, K/2]
  GroupParams w;          // scales, offsets [N, K/G]
  float* y;               // fp32 [M, N]
  int64_t M, N, K, G;
  int64_t ng;                 // K / G
  const Int8Activations* xq;  // the VNNI path's x, rounded to int8 (else nullptr)
};

// ---- portable path ----

// y[m, n] for MB rows of x from m0, one row n of W.
template <int MB>
void gemv_row_scalar(const Problem& p, int64_t n, int64_t m0, const float* sw, const float* mw) {
  const uint8_t* qrow = p.q + n * (p.K / 2);
  const int64_t ng = p.ng;
  float acc[MB] = {};
  for (int64_t g = 0; g < ng; ++g) {
    float gacc[MB] = {};
    for (int64_t b = g * p.G; b < (g + 1) * p.G; b += kBlock) {
      const uint8_t* qb = qrow + b / 2;
      #pragma GCC unroll 8  // keep the MB accumulators in registers
      for (int mb = 0; mb < MB; ++mb) {
        const float* xb = p.x + (m0 + mb) * p.K + b;
        float s = 0.f;
        for (int j = 0; j < 16; ++j) {
          s += static_cast<float>(qb[j] & 0xF) * xb[j] + static_cast<float>(qb[j] >> 4) * xb[16 + j];
        }
        gacc[mb] += s;
      }
    }
    const float sc = sw[g], off = mw[g];
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) acc[mb] += sc * gacc[mb] + off * p.xsum[(m0 + mb) * ng + g];
  }
  #pragma GCC unroll 8  // keep the MB accumulators in registers
  for (int mb = 0; mb < MB; ++mb) p.y[(m0 + mb) * p.N + n] = acc[mb];
}

#ifdef TINYCHAT_X86

// ---- AVX2 + FMA ----

template <int MB>
TINYCHAT_AVX2 void gemv_row_avx2(const Problem& p, int64_t n, int64_t m0, const float* sw, const float* mw) {
  const uint8_t* qrow = p.q + n * (p.K / 2);
  const int64_t ng = p.ng;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m256 acc[MB];
  #pragma GCC unroll 8  // keep the MB accumulators in registers
  for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm256_setzero_ps();
  float off_term[MB] = {};  // the offset terms
  for (int64_t g = 0; g < ng; ++g) {
    __m256 gacc[MB];
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) gacc[mb] = _mm256_setzero_ps();
    for (int64_t b = g * p.G; b < (g + 1) * p.G; b += kBlock) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + b / 2));
      const __m128i lo = _mm_and_si128(bytes, low4);                       // channels b .. b+15
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);    // channels b+16 .. b+31
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
      const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
      const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
      #pragma GCC unroll 8  // keep the MB accumulators in registers
      for (int mb = 0; mb < MB; ++mb) {
        const float* xb = p.x + (m0 + mb) * p.K + b;
        gacc[mb] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), gacc[mb]);
        gacc[mb] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), gacc[mb]);
        gacc[mb] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), gacc[mb]);
        gacc[mb] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), gacc[mb]);
      }
    }
    const float sc = sw[g], off = mw[g];
    const __m256 vs = _mm256_set1_ps(sc);
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) {
      acc[mb] = _mm256_fmadd_ps(vs, gacc[mb], acc[mb]);
      off_term[mb] += off * p.xsum[(m0 + mb) * ng + g];
    }
  }
  #pragma GCC unroll 8  // keep the MB accumulators in registers
  for (int mb = 0; mb < MB; ++mb) p.y[(m0 + mb) * p.N + n] = hsum_avx2(acc[mb]) + off_term[mb];
}

// ---- AVX-512 ----

// gcc 12's AVX-512 intrinsics start from _mm512_undefined_*() and trip its own uninitialized-value warnings
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

template <int MB>
TINYCHAT_AVX512 void gemv_row_avx512(const Problem& p, int64_t n, int64_t m0, const float* sw, const float* mw) {
  const uint8_t* qrow = p.q + n * (p.K / 2);
  const int64_t ng = p.ng;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m512 acc[MB];
  #pragma GCC unroll 8  // keep the MB accumulators in registers
  for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm512_setzero_ps();
  float off_term[MB] = {};  // the offset terms
  for (int64_t g = 0; g < ng; ++g) {
    __m512 gacc[MB];
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) gacc[mb] = _mm512_setzero_ps();
    for (int64_t b = g * p.G; b < (g + 1) * p.G; b += kBlock) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + b / 2));
      const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, low4)));
      const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4)));
      #pragma GCC unroll 8  // keep the MB accumulators in registers
      for (int mb = 0; mb < MB; ++mb) {
        const float* xb = p.x + (m0 + mb) * p.K + b;
        gacc[mb] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), gacc[mb]);
        gacc[mb] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), gacc[mb]);
      }
    }
    const float sc = sw[g], off = mw[g];
    const __m512 vs = _mm512_set1_ps(sc);
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) {
      acc[mb] = _mm512_fmadd_ps(vs, gacc[mb], acc[mb]);
      off_term[mb] += off * p.xsum[(m0 + mb) * ng + g];
    }
  }
  #pragma GCC unroll 8  // keep the MB accumulators in registers
  for (int mb = 0; mb < MB; ++mb) p.y[(m0 + mb) * p.N + n] = _mm512_reduce_add_ps(acc[mb]) + off_term[mb];
}

#pragma GCC diagnostic pop

#endif  // TINYCHAT_X86

// ---- AVX-512 VNNI: int8 activations ----
//
// x is rounded to int8 per block of 32 channels (scale s = absmax / 127), once per call. Per row of W and chunk of
// 4 blocks (64 bytes of qweight, 128 weights): two vpdpbusd multiply the unsigned 4-bit weights (low and high
// nibbles) with the signed int8 activations and sum them exactly in int32 lanes, 4 lanes per block; the lanes are
// then scaled by (weight scale of the lane's group) x (activation scale of its block) and accumulated in fp32. The
// offset term m * sum(x) sums the rounded x too, so the result is x_rounded @ W.T: the only error next to the fp32
// path is the rounding of x, |error| <= sum_k |W[n, k]| * step(x's block) / 2, with step = s.
//
// How x is rounded depends on the rows of x in the call (the same for every row of a call):
// - up to kFineRows (decode steps): at two int8 levels (Int8Activations), step = s / 256: 1/256 of llama.cpp's
//   error at 1.1-1.3x the cost of one level here, and still faster than fp32 x. A sampled answer meets this error at
//   every token it decodes, and drifts from the file's own answer with it.
// - up to kExactRows (a chat turn's prompt): not at all, the AVX-512 kernels with fp32 x (1.4x one level's cost):
//   what a short prompt leaves in the KV cache is the file's own, at a cost of milliseconds.
// - more (a long prompt, where prefill speed is what users wait for): at one level, step = s, as llama.cpp, in the
//   GEMM below.
// Group sizes must divide 128 or be multiples of it.

constexpr int64_t kChunkBytes = 64;  // 4 blocks of qweight

bool vnni_supports(int64_t G) { return 128 % G == 0 || G % 128 == 0; }

#ifdef TINYCHAT_X86
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// int8 codes of 16 values v, |v| <= 127.5: round to nearest, halves away from zero (+-0.5, then truncation).
TINYCHAT_AVX512_VNNI TINYCHAT_INLINE __m512i round_int8(__m512 v) {
  const __mmask16 nonneg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GE_OQ);
  return _mm512_cvttps_epi32(_mm512_add_ps(v, _mm512_mask_blend_ps(nonneg, _mm512_set1_ps(-0.5f),
                                                                   _mm512_set1_ps(0.5f))));
}

// Row m of x [M, K] rounded into a (Int8Activations' layout, above), a block of 32 channels at a time in two
// vectors (a scalar loop here cost several us a call: as much as a decode step's GEMV of a small matrix).
TINYCHAT_AVX512_VNNI void quantize_row(const float* x, int64_t m, int64_t M, int64_t K, int64_t G,
                                       Int8Activations& a) {
  const int64_t blocks = K / kBlock, ng = K / G, row_bytes = a.levels * 2 * kChunkBytes;
  for (int64_t b = 0; b < blocks; ++b) {
    const float* xb = x + m * K + b * kBlock;
    const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);  // channels 32b + j, 32b + 16 + j
    // a NaN or infinity in x must reach y: such a block gets the scale NaN (and codes 0)
    const bool finite = (_mm512_fpclass_ps_mask(x0, 0x99) | _mm512_fpclass_ps_mask(x1, 0x99)) == 0;
    float absmax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    if (!finite) absmax = std::numeric_limits<float>::quiet_NaN();
    const __m512 inv = _mm512_set1_ps(finite && absmax > 0.f ? 127.f / absmax : 0.f);
    int8_t* lo = a.q8.data() + ((b / 4) * M + m) * row_bytes + (b % 4) * 16;  // then hi, fine lo, fine hi
    __m512i qsum = _mm512_setzero_si512();  // in the unit of the lane scale
    for (int half = 0; half < 2; ++half) {
      const __m512 v = finite ? _mm512_mul_ps(half == 0 ? x0 : x1, inv) : _mm512_setzero_ps();  // |v| <= 127
      const __m512i q1 = round_int8(v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + half * kChunkBytes), _mm512_cvtepi32_epi8(q1));
      if (a.levels == 2) {  // q2 = round(256 (v - q1)), clamped to [-127, 127]
        const __m512 fine = _mm512_mul_ps(_mm512_set1_ps(256.f), _mm512_sub_ps(v, _mm512_cvtepi32_ps(q1)));
        const __m512i q2 = round_int8(_mm512_min_ps(_mm512_max_ps(fine, _mm512_set1_ps(-127.f)),
                                                    _mm512_set1_ps(127.f)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + (2 + half) * kChunkBytes), _mm512_cvtepi32_epi8(q2));
        qsum = _mm512_add_epi32(qsum, _mm512_add_epi32(_mm512_slli_epi32(q1, 8), q2));
      } else {
        qsum = _mm512_add_epi32(qsum, q1);
      }
    }
    const float scale = absmax / (a.levels == 2 ? 127.f * 256.f : 127.f);
    for (int l = 0; l < 4; ++l) a.lane_scales[((b / 4) * M + m) * 16 + (b % 4) * 4 + l] = scale;
    a.group_sums[m * ng + b * kBlock / G] += scale * static_cast<float>(_mm512_reduce_add_epi32(qsum));
  }
}

Int8Activations quantize_activations(const float* x, int64_t M, int64_t K, int64_t G, int levels) {
  Int8Activations a;
  const int64_t blocks = K / kBlock, ng = K / G;
  const int64_t row_bytes = levels * 2 * kChunkBytes;  // one row of x in one chunk
  a.chunks = (blocks + 3) / 4;
  a.levels = levels;
  a.q8.assign(a.chunks * M * row_bytes, 0);
  a.lane_scales.assign(a.chunks * M * 16, 0.f);
  a.group_sums.assign(M * ng, 0.f);
  const int64_t groups_per_chunk = std::max<int64_t>(1, 128 / G);
  a.full_chunks = a.chunks;
  for (int64_t c = 0; c < a.chunks; ++c) {
    const int64_t g0 = c * 128 / G;
    a.group_mask.push_back(static_cast<uint8_t>((1u << std::min(groups_per_chunk, ng - g0)) - 1));
    a.chunk_group.push_back(static_cast<int32_t>(g0));
    if (a.full_chunks == a.chunks && ((c + 1) * kChunkBytes > K / 2 || g0 + 4 > ng)) a.full_chunks = c;
  }
  for (int l = 0; l < 16; ++l) a.lane_group[l] = static_cast<int32_t>((l / 4) * kBlock / G);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (8 * K));
  at::parallel_for(0, M, grain, [&](int64_t m_begin, int64_t m_end) {
    for (int64_t m = m_begin; m < m_end; ++m) quantize_row(x, m, M, K, G, a);
  });
  return a;
}

// 4 group parameters from p (masked by `mask` unless `whole`) and 16 (masked by `live`) as fp32: as stored (float),
// or fp16 widened exactly in the register (a Q4_1 row's scales and mins, without widening each row into a buffer).
TINYCHAT_AVX512_VNNI TINYCHAT_INLINE __m128 load4(const float* p, __mmask8 mask, bool whole) {
  return whole ? _mm_loadu_ps(p) : _mm_maskz_loadu_ps(mask, p);
}
TINYCHAT_AVX512_VNNI TINYCHAT_INLINE __m128 load4(const at::Half* p, __mmask8 mask, bool whole) {
  const __m128i h = whole ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)) : _mm_maskz_loadu_epi16(mask, p);
  return _mm512_castps512_ps128(_mm512_cvtph_ps(_mm256_zextsi128_si256(h)));  // (the 128-bit form needs F16C)
}
TINYCHAT_AVX512_VNNI TINYCHAT_INLINE __m512 load16(const float* p, __mmask16 live) {
  return _mm512_maskz_loadu_ps(live, p);
}
TINYCHAT_AVX512_VNNI TINYCHAT_INLINE __m512 load16(const at::Half* p, __mmask16 live) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, p));
}

// The sums of the 16 lanes of a, b, c and d, as 4 lanes [sum a, sum b, sum c, sum d]: one tree for the four (a
// row's own reduction cost about as much as the row's share of a small matrix's chunks).
TINYCHAT_AVX512_VNNI TINYCHAT_INLINE __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // per 128-bit lane: a0 + a2, b0 + b2, a1 + a3, b1 + b3 (and the same of c, d)
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  // per 128-bit lane: the lane's partial sums of a, b, c, d in turn
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

// One chunk (64 bytes of qweight, 128 channels) of rows n .. n + RB - 1 of W (qc[r]: row r's chunk; sw[r] + g0: row
// r's scales from the chunk's first group g0) against MB rows of x (xq: their codes, xs: their lane scales, row_bytes
// apart), into acc. Tail: the chunk is cut by the row's end (bytes) or by its last group (scales): masked loads,
// which are slow, only there. `ahead`: the bytes from a row's chunk to the same chunk of the row this thread most
// likely runs next, prefetched into L2: streaming a matrix larger than the caches, the hardware prefetcher alone kept
// the GEMV at half the read bandwidth, and prefetches into L1 (whose few line-fill buffers they hold until the line
// arrives) at 21-26 GB/s, against 29-37 GB/s into L2 (Llama-2-7B's w13, 2 threads, EPYC Zen 4, runs alternating).
// Prefetches never fault past the end.
template <int MB, int RB, bool Tail, typename PT>
TINYCHAT_AVX512_VNNI TINYCHAT_INLINE void vnni_chunk(const uint8_t* const* qc, const PT* const* sw, int64_t g0,
                                                     const int8_t* xq,
                                                     const float* xs, int64_t ahead, __m512i lane_group,
                                                     __mmask64 byte_mask, __mmask8 scale_mask, __m512 (&acc)[RB][MB]) {
  constexpr int64_t row_bytes = kGemvLevels * 2 * kChunkBytes;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // x's codes and scales, loaded once for the RB rows of W: a core loads one 64-byte vector a cycle, which the
  // loads of x for every row (the compiler's choice of memory operands) had made the bound
  __m512i xv[MB][2 * kGemvLevels];
  __m512 xsv[MB];
  #pragma GCC unroll 8
  for (int mb = 0; mb < MB; ++mb) {
    #pragma GCC unroll 4
    for (int v = 0; v < 2 * kGemvLevels; ++v) {
      xv[mb][v] = _mm512_loadu_si512(xq + mb * row_bytes + v * kChunkBytes);
      if constexpr (MB <= 2) asm("" : "+v"(xv[mb][v]));  // keep it in a register (registers allow at small MB)
    }
    xsv[mb] = _mm512_loadu_ps(xs + mb * 16);
  }
  #pragma GCC unroll 4
  for (int r = 0; r < RB; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(qc[r] + ahead), _MM_HINT_T1);
    __m512i bytes = Tail ? _mm512_maskz_loadu_epi8(byte_mask, qc[r]) : _mm512_loadu_si512(qc[r]);
    asm("" : "+v"(bytes));  // one load of the row's chunk for both nibbles
    const __m512i lo = _mm512_and_si512(bytes, low4);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
    // up to 4 scales from the chunk's first group, spread to the lanes of their blocks
    const __m128 s4 = load4(sw[r] + g0, scale_mask, !Tail);
    const __m512 wscale = _mm512_permutexvar_ps(lane_group, _mm512_castps128_ps512(s4));
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) {
      __m512i dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xv[mb][0]);
      dots = _mm512_dpbusd_epi32(dots, hi, xv[mb][1]);
      // 256 * coarse + fine, exact in int32 (|.| < 2^22) and in the fp32 conversion
      __m512i fine = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xv[mb][2]);
      fine = _mm512_dpbusd_epi32(fine, hi, xv[mb][3]);
      dots = _mm512_add_epi32(_mm512_slli_epi32(dots, 8), fine);
      acc[r][mb] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_mul_ps(wscale, xsv[mb]), acc[r][mb]);
    }
  }
}

// Rows n .. n + RB - 1 of W against rows m0 .. m0 + MB - 1 of x; sw[r], mw[r]: row n + r's scales and offsets (fp32
// from row_params, or the fp16 tensors themselves: PT). RB > 1 (2 or 4 rows of W) loads x's codes and scales once
// for every row of W: each row's arithmetic is the single row's up to the final sum of its lanes. The loop over the
// chunks is branch-free up to a.full_chunks, its pointers hoisted (the compiler had reloaded them every chunk).
template <int MB, int RB, typename PT>
TINYCHAT_AVX512_VNNI TINYCHAT_INLINE void vnni_rows(const Problem& p, int64_t n, int64_t m0, const PT* const* sw,
                                                    const PT* const* mw) {
  const Int8Activations& a = *p.xq;
  constexpr int64_t row_bytes = kGemvLevels * 2 * kChunkBytes;
  const int64_t half = p.K / 2, ng = p.ng, chunks = a.chunks, full = a.full_chunks;
  const int64_t x_stride = p.M * row_bytes, s_stride = p.M * 16;  // from one chunk of x's rows to the next
  const int8_t* xq = a.q8.data() + m0 * row_bytes;
  const float* xs = a.lane_scales.data() + m0 * 16;
  const int32_t* chunk_group = a.chunk_group.data();
  const __m512i lane_group = _mm512_loadu_si512(a.lane_group.data());
  const uint8_t* qc[RB];
  __m512 acc[RB][MB];
  #pragma GCC unroll 4
  for (int r = 0; r < RB; ++r) {
    qc[r] = p.q + (n + r) * half;
    #pragma GCC unroll 8
    for (int mb = 0; mb < MB; ++mb) acc[r][mb] = _mm512_setzero_ps();
  }
  int64_t c = 0;
  for (; c < full; ++c) {
    vnni_chunk<MB, RB, false>(qc, sw, chunk_group[c], xq, xs, RB * half, lane_group, 0, 0, acc);
    #pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) qc[r] += kChunkBytes;
    xq += x_stride;
    xs += s_stride;
  }
  for (; c < chunks; ++c) {
    const int64_t left = half - c * kChunkBytes;  // qweight bytes of a row from this chunk on
    const __mmask64 byte_mask = left >= kChunkBytes ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
    vnni_chunk<MB, RB, true>(qc, sw, chunk_group[c], xq, xs, RB * half, lane_group, byte_mask, a.group_mask[c],
                                acc);
    #pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) qc[r] += kChunkBytes;
    xq += x_stride;
    xs += s_stride;
  }
  // the offset terms m * sum(x) over the row's groups, 16 at a time into the same accumulators (a scalar loop here
  // was one chain of ng dependent FMAs a row: a third of the row's time at SmolLM2's and Llama's shapes)
  const float* xsum = a.group_sums.data() + m0 * ng;
  for (int64_t g = 0; g < ng; g += 16) {
    const __mmask16 live = ng - g >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << (ng - g)) - 1);
    #pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      const __m512 mv = load16(mw[r] + g, live);
      #pragma GCC unroll 8  // keep the MB accumulators in registers
      for (int mb = 0; mb < MB; ++mb) {
        acc[r][mb] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(live, xsum + mb * ng + g), acc[r][mb]);
      }
    }
  }
  #pragma GCC unroll 8
  for (int mb = 0; mb < MB; ++mb) {
    float* y = p.y + (m0 + mb) * p.N + n;
    if constexpr (RB == 4) {
      _mm_storeu_ps(y, reduce4(acc[0][mb], acc[1][mb], acc[2][mb], acc[3][mb]));
    } else {
      #pragma GCC unroll 2
      for (int r = 0; r < RB; ++r) y[r] = _mm512_reduce_add_ps(acc[r][mb]);
    }
  }
}

// The VNNI kernels as the driver below calls them: RB = 1, 2 or 4 rows of W from n against MB rows of x from m0,
// with their parameters rp (row_params), or (Half) read straight from the fp16 scales and offsets.
using VnniFn = void (*)(const Problem&, int64_t n, int64_t m0, const RowParams* rp);

template <int MB, int RB, bool Half>
TINYCHAT_AVX512_VNNI void gemv_vnni(const Problem& p, int64_t n, int64_t m0, const RowParams* rp) {
  if constexpr (Half) {
    const at::Half* sw[RB];
    const at::Half* mw[RB];
    for (int r = 0; r < RB; ++r) {
      sw[r] = static_cast<const at::Half*>(p.w.scales) + (n + r) * p.ng;
      mw[r] = static_cast<const at::Half*>(p.w.offsets) + (n + r) * p.ng;
    }
    vnni_rows<MB, RB>(p, n, m0, sw, mw);
  } else {
    const float* sw[RB];
    const float* mw[RB];
    for (int r = 0; r < RB; ++r) {
      sw[r] = rp[r].s;
      mw[r] = rp[r].m;
    }
    vnni_rows<MB, RB>(p, n, m0, sw, mw);
  }
}

template <int RB, bool Half>
VnniFn vnni_fn(int64_t mb) {
  static_assert(kMaxMBVnni == 8, "vnni_fn instantiates MB = 1..8");
  if constexpr (RB == 4) {  // decode steps only (kQuadRowsMaxM): 4 x MB accumulators
    return mb == 1 ? gemv_vnni<1, RB, Half> : gemv_vnni<2, RB, Half>;
  } else {
    switch (mb) {
      case 1: return gemv_vnni<1, RB, Half>;
      case 2: return gemv_vnni<2, RB, Half>;
      case 3: return gemv_vnni<3, RB, Half>;
      case 4: return gemv_vnni<4, RB, Half>;
      case 5: return gemv_vnni<5, RB, Half>;
      case 6: return gemv_vnni<6, RB, Half>;
      case 7: return gemv_vnni<7, RB, Half>;
      default: return gemv_vnni<8, RB, Half>;
    }
  }
}

// The VNNI path's driver: rows of W RB at a time (4 for up to kQuadRowsMaxM rows of x, else 2; the last N % RB rows
// alone), split over threads, each unit against every chunk of kMaxMBVnni rows of x; x's codes and scales are loaded
// once for the unit's rows (vnni_rows). fp16 scales with fp16 offsets (Q4_1) are read as stored; other forms are
// widened a row at a time (row_params).
template <bool Half, int RB>
void run_vnni_units(const Problem& p) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (RB * p.K * p.M));
  const int64_t full_mb = std::min<int64_t>(kMaxMBVnni, p.M), tail_mb = p.M % kMaxMBVnni;
  const VnniFn unit_full = vnni_fn<RB, Half>(full_mb), unit_tail = vnni_fn<RB, Half>(tail_mb);
  const VnniFn one_full = vnni_fn<1, Half>(full_mb), one_tail = vnni_fn<1, Half>(tail_mb);
  const int64_t units = p.N / RB;  // then the rows past units * RB one at a time
  at::parallel_for(0, units + p.N % RB, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(Half ? 0 : 2 * RB * p.ng);  // [RB, 2, K/G]: the rows' parameters when widened
    for (int64_t i = begin; i < end; ++i) {
      const bool whole = i < units;
      const int64_t n = whole ? RB * i : RB * units + (i - units), rows = whole ? RB : 1;
      RowParams rp[RB] = {};
      if constexpr (!Half) {
        for (int64_t r = 0; r < rows; ++r) {
          rp[r] = row_params(p.w, n + r, p.ng, buf.data() + 2 * r * p.ng, Isa::kAvx512Vnni);
        }
      }
      for (int64_t m0 = 0; m0 < p.M; m0 += kMaxMBVnni) {
        const bool full = p.M - m0 >= kMaxMBVnni || tail_mb == 0;
        (whole ? (full ? unit_full : unit_tail) : (full ? one_full : one_tail))(p, n, m0, rp);
      }
    }
  });
}

template <bool Half>
void run_vnni(const Problem& p) {
  p.M <= kQuadRowsMaxM ? run_vnni_units<Half, 4>(p) : run_vnni_units<Half, 2>(p);
}

// ---- AVX-512 VNNI GEMM (prefill: more than kExactRows rows of x) ----
//
// The GEMV above puts 128 channels of one row of W in a vector's lanes, so each of its vpdpbusd is followed by a
// conversion, a scale product and an FMA per 8 channels of a lane (three float instructions per two vpdpbusd: the
// vector units' bound at prefill). Here the lanes are 16 rows of W instead: lane i holds 4 bytes of row n + i (8
// weights: the low nibbles are channels 4q..4q+3 of a block, the high nibbles 16 + 4q..), and x's matching 4 int8
// codes are broadcast to every lane, so 8 vpdpbusd sum a whole block of 32 channels exactly in each lane's int32, and
// the float work (conversion, scale product, FMA) comes once per block: a fourth of the GEMV's. A thread copies
// a panel of kPanelRows rows of W into that order (a transpose of 4-byte words: the layout in memory stays the one
// every kernel reads) and their group parameters as fp32, then runs the panel against all of x, kGemmRowsX rows at a
// time. Per output, the arithmetic is the same whichever tile it lies in (batch-invariant, like the GEMV).

constexpr int kGemmVecs = 2;                      // vectors of 16 rows of W in a tile
constexpr int64_t kPanelRows = 16 * kGemmVecs;    // rows of W a panel holds
constexpr int kGemmRowsX = 6;                     // rows of x in a tile (2 x 6 int32 and 2 x 6 fp32 accumulators)

// A panel: rows n0 .. n0 + kPanelRows - 1 of W (rows past N are zeros), words[d * kPanelRows + r] = 4-byte word d
// of row n0 + r (word d = block d / 4's bytes 4 (d % 4) .. + 3); s, m [K/G, kPanelRows]: the rows' group parameters.
struct Panel {
  std::vector<uint32_t> words;
  std::vector<float> s, m;
  std::vector<float> buf;  // [2, K/G]: a row's parameters when widened
};

void pack_panel(const Problem& p, int64_t n0, Panel& panel) {
  const int64_t nwords = p.K / 8, rows = std::min(kPanelRows, p.N - n0);
  panel.words.assign(nwords * kPanelRows, 0u);
  panel.s.assign(p.ng * kPanelRows, 0.f);
  panel.m.assign(p.ng * kPanelRows, 0.f);
  panel.buf.resize(2 * p.ng);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = p.q + (n0 + r) * (p.K / 2);
    for (int64_t d = 0; d < nwords; ++d) std::memcpy(&panel.words[d * kPanelRows + r], row + 4 * d, 4);
    const RowParams rp = row_params(p.w, n0 + r, p.ng, panel.buf.data(), Isa::kAvx512Vnni);
    for (int64_t g = 0; g < p.ng; ++g) {
      panel.s[g * kPanelRows + r] = rp.s[g];
      panel.m[g * kPanelRows + r] = rp.m[g];
    }
  }
}

// Rows m0 .. m0 + MB - 1 of x against the panel of rows n0.. into y.
template <int MB>
TINYCHAT_AVX512_VNNI void gemm_tile(const Problem& p, const Panel& panel, int64_t n0, int64_t m0) {
  constexpr int NV = kGemmVecs;
  constexpr int64_t NR = kPanelRows, row_bytes = kGemmLevels * 2 * kChunkBytes;  // a row of x in a chunk: lo, hi
  const Int8Activations& a = *p.xq;
  const int64_t blocks = p.K / kBlock, blocks_per_group = p.G / kBlock;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 facc[NV][MB];
  #pragma GCC unroll 8
  for (int mb = 0; mb < MB; ++mb) {
    #pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) facc[v][mb] = _mm512_setzero_ps();
  }
  const uint32_t* wb = panel.words.data();
  for (int64_t b = 0, g = 0, in_group = 0; b < blocks; ++b, wb += 4 * NR) {
    // block b of row m0 + mb of x: its codes at xb + mb * row_bytes (16 "lo", then 16 "hi" kChunkBytes further) and
    // its scale at xs[mb * 16]
    const int64_t at = ((b / 4) * p.M + m0);
    const int8_t* xb = a.q8.data() + at * row_bytes + (b % 4) * 16;
    const float* xs = a.lane_scales.data() + at * 16 + (b % 4) * 4;
    __m512i iacc[NV][MB];
    #pragma GCC unroll 8
    for (int mb = 0; mb < MB; ++mb) {
      #pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) iacc[v][mb] = _mm512_setzero_si512();
    }
    #pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      __m512i lo[NV], hi[NV];
      #pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __m512i w = _mm512_loadu_si512(wb + q * NR + v * 16);
        lo[v] = _mm512_and_si512(w, low4);
        hi[v] = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
      }
      #pragma GCC unroll 8
      for (int mb = 0; mb < MB; ++mb) {
        int32_t xl, xh;
        std::memcpy(&xl, xb + mb * row_bytes + 4 * q, 4);
        std::memcpy(&xh, xb + mb * row_bytes + kChunkBytes + 4 * q, 4);
        const __m512i xlv = _mm512_set1_epi32(xl), xhv = _mm512_set1_epi32(xh);
        #pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          iacc[v][mb] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(iacc[v][mb], lo[v], xlv), hi[v], xhv);
        }
      }
    }
    __m512 ws[NV];
    #pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) ws[v] = _mm512_loadu_ps(panel.s.data() + g * NR + v * 16);
    #pragma GCC unroll 8
    for (int mb = 0; mb < MB; ++mb) {
      const __m512 xsv = _mm512_set1_ps(xs[mb * 16]);
      #pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        facc[v][mb] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[v][mb]), _mm512_mul_ps(ws[v], xsv), facc[v][mb]);
      }
    }
    if (++in_group == blocks_per_group) {
      in_group = 0;
      ++g;
    }
  }
  // the offset terms m * sum(x) over the groups
  for (int64_t g = 0; g < p.ng; ++g) {
    #pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512 mv = _mm512_loadu_ps(panel.m.data() + g * NR + v * 16);
      #pragma GCC unroll 8
      for (int mb = 0; mb < MB; ++mb) {
        facc[v][mb] = _mm512_fmadd_ps(mv, _mm512_set1_ps(a.group_sums[(m0 + mb) * p.ng + g]), facc[v][mb]);
      }
    }
  }
  #pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t n = n0 + v * 16, left = p.N - n;
    if (left <= 0) break;
    const __mmask16 live = left >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << left) - 1);
    #pragma GCC unroll 8
    for (int mb = 0; mb < MB; ++mb) _mm512_mask_storeu_ps(p.y + (m0 + mb) * p.N + n, live, facc[v][mb]);
  }
}

using GemmTileFn = void (*)(const Problem&, const Panel&, int64_t, int64_t);

GemmTileFn gemm_tile_fn(int64_t mb) {
  static_assert(kGemmRowsX == 6, "gemm_tile_fn instantiates MB = 1..6");
  switch (mb) {
    case 1: return gemm_tile<1>;
    case 2: return gemm_tile<2>;
    case 3: return gemm_tile<3>;
    case 4: return gemm_tile<4>;
    case 5: return gemm_tile<5>;
    default: return gemm_tile<6>;
  }
}

// The GEMM's driver: panels of W split over threads, each against every tile of kGemmRowsX rows of x.
void run_vnni_gemm(const Problem& p) {
  const int64_t panels = (p.N + kPanelRows - 1) / kPanelRows, tail_mb = p.M % kGemmRowsX;
  const GemmTileFn full = gemm_tile_fn(kGemmRowsX), tail = gemm_tile_fn(tail_mb);
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    Panel panel;
    for (int64_t i = begin; i < end; ++i) {
      pack_panel(p, i * kPanelRows, panel);
      for (int64_t m0 = 0; m0 < p.M; m0 += kGemmRowsX) {
        (p.M - m0 >= kGemmRowsX ? full : tail)(p, panel, i * kPanelRows, m0);
      }
    }
  });
}

#pragma GCC diagnostic pop
#endif  // TINYCHAT_X86

// ---- dispatch ----

using GemvRowFn = void (*)(const Problem&, int64_t, int64_t, const float*, const float*);

// The GEMV kernel for `isa` and MB rows of x.
template <int MB>
GemvRowFn gemv_row_for(Isa isa) {
#ifdef TINYCHAT_X86
  if (isa >= Isa::kAvx512) return gemv_row_avx512<MB>;
  if (isa == Isa::kAvx2) return gemv_row_avx2<MB>;
#endif
  return gemv_row_scalar<MB>;
}

// The fp32 paths' GEMV kernel for `isa` and mb rows of x (the VNNI path has its own driver, run_vnni).
GemvRowFn gemv_row_fn(Isa isa, int mb) {
  static_assert(kMaxMB == 4, "gemv_row_fn instantiates MB = 1..4");
  switch (mb) {
    case 1: return gemv_row_for<1>(isa);
    case 2: return gemv_row_for<2>(isa);
    case 3: return gemv_row_for<3>(isa);
    default: return gemv_row_for<4>(isa);
  }
}

}  // namespace

at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& offsets, int64_t group_size) {
  check_int4_linear_args(x, qweight, scales, offsets, group_size, c10::DeviceType::CPU);
  const Isa isa = current_isa();
  const int64_t K = x.size(-1);
  const int64_t N = qweight.size(0);
  const std::vector<int64_t> out_shape = linear_out_shape(x, N);
  if (x.numel() == 0 || N == 0) return at::zeros(out_shape, x.options());
  const at::Tensor xf = float_rows(x);  // [M, K]
  const int64_t M = xf.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());  // fp32 [M, N]
  Problem p{xf.const_data_ptr<float>(), nullptr, qweight.const_data_ptr<uint8_t>(), group_params(scales, offsets, -8.f),
            y.data_ptr<float>(), M, N, K, group_size, K / group_size, nullptr};
#ifdef TINYCHAT_X86
  if (isa == Isa::kAvx512Vnni && M > kExactRows) {
    const Int8Activations xq = quantize_activations(p.x, M, K, group_size, kGemmLevels);
    p.xq = &xq;
    run_vnni_gemm(p);
    return y.to(x.scalar_type()).view(out_shape);
  }
#endif
  const Isa gemv_isa = isa == Isa::kAvx512Vnni && (!vnni_supports(group_size) || M > kFineRows) ? Isa::kAvx512 : isa;
#ifdef TINYCHAT_X86
  if (gemv_isa == Isa::kAvx512Vnni) {
    const Int8Activations xq = quantize_activations(p.x, M, K, group_size, kGemvLevels);
    p.xq = &xq;
    p.w.kind == GroupParams::Kind::kHalf && p.w.offsets != nullptr ? run_vnni<true>(p) : run_vnni<false>(p);
    return y.to(x.scalar_type()).view(out_shape);
  }
#endif
  const std::vector<float> xsum = group_sums(p.x, M, K, group_size);  // [M, K/G], the offset term's factor
  p.xsum = xsum.data();
  run_rows(p, gemv_isa, kMaxMB, gemv_row_fn);
  return y.to(x.scalar_type()).view(out_shape);
}

}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CPU, m) {
  m.impl("int4_linear", &tinychat::int4_linear_cpu);
}
