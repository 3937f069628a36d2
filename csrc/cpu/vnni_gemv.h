// The AVX-512 VNNI GEMV that both quantized linears run at decode (int4_linear.cpp: 4-bit codes; int8_linear.cpp:
// 8-bit codes), for up to kMaxMBVnni rows of x, and the rounding of x to int8 that int4_linear's GEMM shares.
//
// x is rounded to int8 per block of 32 channels (scale s = absmax / 127), once per call, at two levels in the GEMV
// (x = s (q1 + q2 / 256): 1/256 of llama.cpp's rounding error, at 1.1-1.3x one level's cost). Per row of W and chunk
// of 4 blocks (128 weights: 64 bytes of 4-bit codes, or 128 bytes of 8-bit codes: Codes below) vpdpbusd multiply
// the unsigned codes (4-bit, or 8-bit + 128) with the signed int8 activations and sum them exactly in int32 lanes, 4
// lanes per block; the lanes are then scaled by (weight scale of the lane's group) x (activation scale of its block)
// and accumulated in fp32. The offset term m * sum(x) sums the rounded x too, so the result is x_rounded @ W.T: the
// only error next to the fp32 path is the rounding of x, |error| <= sum_k |W[n, k]| * step(x's block) / 2, with
// step = s / 256 (s at one level). Group sizes: vnni_supports.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <limits>
#include <vector>

#include "isa.h"
#include "linear.h"

namespace tinychat::vnni {

constexpr int64_t kBlock = 32;        // channels of x per int8 scale
constexpr int kMaxMBVnni = 8;         // rows of x a GEMV pass handles together
constexpr int kGemvLevels = 2;        // the GEMV's int8 levels of x
constexpr int64_t kQuadRowsMaxM = 2;  // the GEMV takes rows of W 4 at a time up to this many rows of x
// how far ahead the GEMV prefetches W: the rows of the unit this many units on (one unit ahead had left SmolLM2's
// decode step waiting on memory: 163-170 against 194-204 tok/s with 4, 2 threads, runs alternating; 2 and 6 were
// within the noise of 4)
constexpr int64_t kPrefetchUnits = 4;

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

constexpr int64_t kChunkBytes = 64;  // a vector of x's codes in a chunk: 4 blocks' "lo" or "hi" halves

// the group sizes the GEMV takes: whole blocks of x that divide 128 or are multiples of it
inline bool vnni_supports(int64_t G) { return G % kBlock == 0 && (128 % G == 0 || G % 128 == 0); }

// A GEMV's operands, as raw pointers: W's codes q [N, row_bytes] (Codes' layout), its group parameters [N, K/G], x
// rounded (xq), y fp32 [M, N].
struct VnniGemv {
  const uint8_t* q;
  int64_t row_bytes;
  GroupParams w;
  float* y;
  int64_t M, N, K;
  int64_t ng;  // K / G
  const Int8Activations* xq;
};

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
TINYCHAT_AVX512_VNNI inline void quantize_row(const float* x, int64_t m, int64_t M, int64_t K, int64_t G,
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

inline Int8Activations quantize_activations(const float* x, int64_t M, int64_t K, int64_t G, int levels) {
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

// The first n of 64 bytes (none for n <= 0): a masked load of a row's bytes that ends inside a 64-byte vector.
inline __mmask64 first_bytes(int64_t n) {
  return n >= 64 ? ~__mmask64{0} : n <= 0 ? __mmask64{0} : (__mmask64{1} << n) - 1;
}

// The codes of W, by how a chunk of 128 channels of a row is stored and turned into the unsigned vectors "lo" and
// "hi" that multiply x's (Int8Activations' order).
// Nibbles (int4_linear; tinychat/int4_layout.py): 64 bytes, byte j of block b holding channel 32b + j in its low
// nibble and 32b + 16 + j in its high one: lo and hi are the nibbles.
struct Nibbles {
  static constexpr int64_t kRowChunk = 64;  // a row's bytes in a chunk
  struct Mask {
    __mmask64 bytes;
  };
  static Mask tail_mask(int64_t left) { return {first_bytes(left)}; }
  template <bool Tail>
  TINYCHAT_AVX512_VNNI static TINYCHAT_INLINE void load(const uint8_t* q, Mask m, __m512i& lo, __m512i& hi) {
    __m512i bytes = Tail ? _mm512_maskz_loadu_epi8(m.bytes, q) : _mm512_loadu_si512(q);
    asm("" : "+v"(bytes));  // one load of the row's chunk for both nibbles
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    lo = _mm512_and_si512(bytes, low4);
    hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
  }
  // the offset term's factors of 16 groups from g: the offsets themselves (none: m = default_offset * s)
  template <typename PT>
  TINYCHAT_AVX512_VNNI static TINYCHAT_INLINE __m512 offsets(const PT* mw, const PT* sw, float default_offset,
                                                             int64_t g, __mmask16 live) {
    if (mw == nullptr) return _mm512_mul_ps(load16(sw + g, live), _mm512_set1_ps(default_offset));
    return load16(mw + g, live);
  }
};

// Bytes (int8_linear): 128 bytes, channel k at byte k, signed; the codes are multiplied as code + 128 (unsigned, a
// flip of the top bit) and the 128 * s * sum(x) that adds is taken back with the offsets (m - 128 s). lo and hi
// gather the 16-byte halves of the 4 blocks (vshufi64x2 of the two 64-byte loads).
struct Bytes {
  static constexpr int64_t kRowChunk = 128;
  struct Mask {
    __mmask64 first, second;
  };
  static Mask tail_mask(int64_t left) { return {first_bytes(left), first_bytes(left - 64)}; }
  template <bool Tail>
  TINYCHAT_AVX512_VNNI static TINYCHAT_INLINE void load(const uint8_t* q, Mask m, __m512i& lo, __m512i& hi) {
    // bytes past the row read as 0 and flip to 128: x's codes there are 0
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    const __m512i a = _mm512_xor_si512(Tail ? _mm512_maskz_loadu_epi8(m.first, q) : _mm512_loadu_si512(q), flip);
    const __m512i b = _mm512_xor_si512(Tail ? _mm512_maskz_loadu_epi8(m.second, q + 64) : _mm512_loadu_si512(q + 64),
                                       flip);
    lo = _mm512_shuffle_i64x2(a, b, 0x88);  // blocks 0..3, bytes 0..15 of each
    hi = _mm512_shuffle_i64x2(a, b, 0xDD);  // bytes 16..31
  }
  template <typename PT>
  TINYCHAT_AVX512_VNNI static TINYCHAT_INLINE __m512 offsets(const PT* mw, const PT* sw, float default_offset,
                                                             int64_t g, __mmask16 live) {
    if (mw == nullptr) return _mm512_mul_ps(load16(sw + g, live), _mm512_set1_ps(default_offset - 128.f));
    return _mm512_fmadd_ps(_mm512_set1_ps(-128.f), load16(sw + g, live), load16(mw + g, live));
  }
};

// One chunk (128 channels: Codes::kRowChunk bytes of each row) of rows n .. n + RB - 1 of W (qc[r]: row r's chunk;
// sw[r] + g0: row r's scales from the chunk's first group g0) against MB rows of x (xq: their codes, xs: their lane
// scales, row_bytes apart), into acc. Tail: the chunk is cut by the row's end (bytes) or by its last group (scales):
// masked loads, which are slow, only there. `ahead`: the bytes from a row's chunk to the same chunk of the row this
// thread most likely runs kPrefetchUnits units later, prefetched into L2: streaming a matrix larger than the caches,
// the hardware prefetcher alone kept the GEMV at half the read bandwidth, and prefetches into L1 (whose few line-fill
// buffers they hold until the line arrives) at 21-26 GB/s, against 29-37 GB/s into L2 (Llama-2-7B's w13, 2 threads,
// EPYC Zen 4, runs alternating). Prefetches never fault past the end.
template <typename Codes, int MB, int RB, bool Tail, typename PT>
TINYCHAT_AVX512_VNNI TINYCHAT_INLINE void vnni_chunk(const uint8_t* const* qc, const PT* const* sw, int64_t g0,
                                                     const int8_t* xq, const float* xs, int64_t ahead,
                                                     __m512i lane_group, typename Codes::Mask byte_mask,
                                                     __mmask8 scale_mask, __m512 (&acc)[RB][MB]) {
  constexpr int64_t row_bytes = kGemvLevels * 2 * kChunkBytes;
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
    for (int64_t line = 0; line < Codes::kRowChunk; line += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(qc[r] + ahead + line), _MM_HINT_T1);
    }
    __m512i lo, hi;
    Codes::template load<Tail>(qc[r], byte_mask, lo, hi);
    // up to 4 scales from the chunk's first group, spread to the lanes of their blocks
    const __m128 s4 = load4(sw[r] + g0, scale_mask, !Tail);
    const __m512 wscale = _mm512_permutexvar_ps(lane_group, _mm512_castps128_ps512(s4));
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) {
      __m512i dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xv[mb][0]);
      dots = _mm512_dpbusd_epi32(dots, hi, xv[mb][1]);
      // 256 * coarse + fine, exact in int32 (|.| < 2^22 for 4-bit codes, 2^26 for 8-bit) and in the fp32 conversion
      // for 4-bit codes (8-bit: rounded to 24 bits there, 6e-8 of the dot product)
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
template <typename Codes, int MB, int RB, typename PT>
TINYCHAT_AVX512_VNNI TINYCHAT_INLINE void vnni_rows(const VnniGemv& p, int64_t n, int64_t m0, const PT* const* sw,
                                                    const PT* const* mw) {
  const Int8Activations& a = *p.xq;
  constexpr int64_t row_bytes = kGemvLevels * 2 * kChunkBytes;
  const int64_t ng = p.ng, chunks = a.chunks, full = a.full_chunks;
  const int64_t x_stride = p.M * row_bytes, s_stride = p.M * 16;  // from one chunk of x's rows to the next
  const int8_t* xq = a.q8.data() + m0 * row_bytes;
  const float* xs = a.lane_scales.data() + m0 * 16;
  const int32_t* chunk_group = a.chunk_group.data();
  const __m512i lane_group = _mm512_loadu_si512(a.lane_group.data());
  const int64_t ahead = kPrefetchUnits * RB * p.row_bytes;
  const uint8_t* qc[RB];
  __m512 acc[RB][MB];
  #pragma GCC unroll 4
  for (int r = 0; r < RB; ++r) {
    qc[r] = p.q + (n + r) * p.row_bytes;
    #pragma GCC unroll 8
    for (int mb = 0; mb < MB; ++mb) acc[r][mb] = _mm512_setzero_ps();
  }
  int64_t c = 0;
  for (; c < full; ++c) {
    vnni_chunk<Codes, MB, RB, false>(qc, sw, chunk_group[c], xq, xs, ahead, lane_group, {}, 0, acc);
    #pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) qc[r] += Codes::kRowChunk;
    xq += x_stride;
    xs += s_stride;
  }
  for (; c < chunks; ++c) {
    const auto byte_mask = Codes::tail_mask(p.row_bytes - c * Codes::kRowChunk);  // a row's bytes from here on
    vnni_chunk<Codes, MB, RB, true>(qc, sw, chunk_group[c], xq, xs, ahead, lane_group, byte_mask,
                                    a.group_mask[c], acc);
    #pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) qc[r] += Codes::kRowChunk;
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
      const __m512 mv = Codes::offsets(mw[r], sw[r], p.w.default_offset, g, live);
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
// with their parameters rp (row_params), or (Half) read straight from the fp16 scales and offsets (or none).
using VnniFn = void (*)(const VnniGemv&, int64_t n, int64_t m0, const RowParams* rp);

template <typename Codes, int MB, int RB, bool Half>
TINYCHAT_AVX512_VNNI void gemv_vnni(const VnniGemv& p, int64_t n, int64_t m0, const RowParams* rp) {
  if constexpr (Half) {
    const at::Half* sw[RB];
    const at::Half* mw[RB];
    for (int r = 0; r < RB; ++r) {
      sw[r] = static_cast<const at::Half*>(p.w.scales) + (n + r) * p.ng;
      mw[r] = p.w.offsets == nullptr ? nullptr : static_cast<const at::Half*>(p.w.offsets) + (n + r) * p.ng;
    }
    vnni_rows<Codes, MB, RB>(p, n, m0, sw, mw);
  } else {
    const float* sw[RB];
    const float* mw[RB];
    for (int r = 0; r < RB; ++r) {
      sw[r] = rp[r].s;
      mw[r] = rp[r].m;
    }
    vnni_rows<Codes, MB, RB>(p, n, m0, sw, mw);
  }
}

template <typename Codes, int RB, bool Half>
VnniFn vnni_fn(int64_t mb) {
  static_assert(kMaxMBVnni == 8, "vnni_fn instantiates MB = 1..8");
  if constexpr (RB == 4) {  // decode steps only (kQuadRowsMaxM): 4 x MB accumulators
    return mb == 1 ? gemv_vnni<Codes, 1, RB, Half> : gemv_vnni<Codes, 2, RB, Half>;
  } else {
    switch (mb) {
      case 1: return gemv_vnni<Codes, 1, RB, Half>;
      case 2: return gemv_vnni<Codes, 2, RB, Half>;
      case 3: return gemv_vnni<Codes, 3, RB, Half>;
      case 4: return gemv_vnni<Codes, 4, RB, Half>;
      case 5: return gemv_vnni<Codes, 5, RB, Half>;
      case 6: return gemv_vnni<Codes, 6, RB, Half>;
      case 7: return gemv_vnni<Codes, 7, RB, Half>;
      default: return gemv_vnni<Codes, 8, RB, Half>;
    }
  }
}

// The VNNI path's driver: rows of W RB at a time (4 for up to kQuadRowsMaxM rows of x, else 2; the last N % RB rows
// alone), split over threads, each unit against every chunk of kMaxMBVnni rows of x; x's codes and scales are loaded
// once for the unit's rows (vnni_rows). fp16 scales, with fp16 offsets or none (Q4_1; Q4_0 and Q8_0, m = default_offset
// * s in the kernel), are read as stored; other forms are widened a row at a time (row_params).
template <typename Codes, bool Half, int RB>
void run_vnni_units(const VnniGemv& p) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (RB * p.K * p.M));
  const int64_t full_mb = std::min<int64_t>(kMaxMBVnni, p.M), tail_mb = p.M % kMaxMBVnni;
  const VnniFn unit_full = vnni_fn<Codes, RB, Half>(full_mb), unit_tail = vnni_fn<Codes, RB, Half>(tail_mb);
  const VnniFn one_full = vnni_fn<Codes, 1, Half>(full_mb), one_tail = vnni_fn<Codes, 1, Half>(tail_mb);
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

template <typename Codes, bool Half>
void run_vnni(const VnniGemv& p) {
  p.M <= kQuadRowsMaxM ? run_vnni_units<Codes, Half, 4>(p) : run_vnni_units<Codes, Half, 2>(p);
}

// The VNNI GEMV for up to kFineRows rows of x (two int8 levels), into y: fp16 scales (with fp16 offsets or none) read
// as stored, other forms widened a row at a time.
template <typename Codes>
void vnni_gemv(const float* x, const uint8_t* q, int64_t row_bytes, const GroupParams& w, float* y, int64_t M,
               int64_t N, int64_t K, int64_t G) {
  const Int8Activations xq = quantize_activations(x, M, K, G, kGemvLevels);
  const VnniGemv p{q, row_bytes, w, y, M, N, K, K / G, &xq};
  w.kind == GroupParams::Kind::kHalf ? run_vnni<Codes, true>(p) : run_vnni<Codes, false>(p);
}

#pragma GCC diagnostic pop
#endif  // TINYCHAT_X86

}  // namespace tinychat::vnni
