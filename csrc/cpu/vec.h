// Small fp32 routines shared by the CPU kernels, written so that gcc vectorizes the loops that call them at -O3
// without -ffast-math (no calls into libm, no data-dependent branches). Inlined into a target-attributed kernel
// (isa.h), they vectorize for that instruction set.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <c10/util/Half.h>

#include "isa.h"

namespace tinychat {

// fp16 -> fp32 for `count` values, exactly: F16C 16 or 8 at a time on the x86 paths (isa), else one by one.
#ifdef TINYCHAT_X86
TINYCHAT_AVX512 inline void widen_halves_avx512(const at::Half* src, float* dst, int64_t count) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  }
  if (i < count) {  // the last count % 16 values masked (a row's 18 group scales: one call per row of W)
    const __mmask16 live = static_cast<__mmask16>((1u << (count - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, live, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, src + i)));
  }
}

TINYCHAT_AVX2 inline void widen_halves_avx2(const at::Half* src, float* dst, int64_t count) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < count; ++i) dst[i] = static_cast<float>(src[i]);
}
#endif

inline void widen_halves(const at::Half* src, float* dst, int64_t count, Isa isa) {
#ifdef TINYCHAT_X86
  if (isa >= Isa::kAvx512) return widen_halves_avx512(src, dst, count);
  if (isa == Isa::kAvx2) return widen_halves_avx2(src, dst, count);
#endif
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<float>(src[i]);
}

constexpr int kDotLanes = 16;

// The sum of kDotLanes partial sums as a tree, halves added to halves (vector adds, not a chain of 16 scalar ones).
inline __attribute__((always_inline)) float sum_lanes(const float* lanes) {
  static_assert(kDotLanes == 16, "a tree of 16");
  float h8[8], h4[4];
  for (int j = 0; j < 8; ++j) h8[j] = lanes[j] + lanes[j + 8];
  for (int j = 0; j < 4; ++j) h4[j] = h8[j] + h8[j + 4];
  return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

// sum(a[i] * b[i]) in fp32 with kDotLanes independent partial sums (which is what lets it vectorize).
inline __attribute__((always_inline)) float dot(const float* a, const float* b, int64_t n) {
  float acc[kDotLanes] = {};
  int64_t i = 0;
  for (; i + kDotLanes <= n; i += kDotLanes) {
    for (int j = 0; j < kDotLanes; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float s = sum_lanes(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// exp(x) within a few ulp of std::exp for x in [-87, 88] (clamped there: exp(-inf) gives ~1e-38, not 0). Loops
// calling it vectorize (min/max, no branches) when their pointers are __restrict.
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, and the Cephes expf polynomial for exp(r).
inline __attribute__((always_inline)) float exp_approx(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float n = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round(x / ln2): 12582912 = 1.5 * 2^23
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 = 0.693359375 - 2.12194440e-4
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

#ifdef TINYCHAT_X86
// The sum of the 8 lanes of v.
TINYCHAT_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

}  // namespace tinychat
