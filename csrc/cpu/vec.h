// Small fp32 loops shared by the CPU kernels, written so that gcc vectorizes them at -O3 without -ffast-math.
#pragma once

#include <cstdint>

namespace tinychat {

constexpr int kDotLanes = 16;

// sum(a[i] * b[i]) in fp32 with kDotLanes independent partial sums (which is what lets it vectorize).
inline float dot(const float* a, const float* b, int64_t n) {
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

}  // namespace tinychat
