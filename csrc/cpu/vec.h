// Small fp32 routines shared by the CPU kernels, written so that gcc vectorizes the loops that call them at -O3
// without -ffast-math (no calls into libm, no data-dependent branches). Inlined into a target-attributed kernel
// (isa.h), they vectorize for that instruction set.
#pragma once

#include <cstdint>
#include <cstring>

#include "isa.h"

namespace tinychat {

constexpr int kDotLanes = 16;

// sum(a[i] * b[i]) in fp32 with kDotLanes independent partial sums (which is what lets it vectorize).
inline __attribute__((always_inline)) float dot(const float* a, const float* b, int64_t n) {
  float acc[kDotLanes] = {};
  int64_t i = 0;
  for (; i + kDotLanes <= n; i += kDotLanes) {
    for (int j = 0; j < kDotLanes; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int j = 0; j < kDotLanes; ++j) s += acc[j];
  return s;
}

// exp(x) within a few ulp of std::exp for x in [-87, 88] (clamped there: exp(-inf) gives ~1e-38, not 0).
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, and the Cephes expf polynomial for exp(r).
inline __attribute__((always_inline)) float exp_approx(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
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
