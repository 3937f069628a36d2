// CPU kernel of int8_linear (schema in csrc/ops.cpp): y = x @ W.T with 8-bit weights in groups of G input channels,
// W[n, k] = q[n, k] * s + m with s, m the scale and offset of group (n, k/G) (fp32 or fp16 as stored, widened
// exactly; m = 0 without offsets), fp32 math, each output rounded to x's dtype once. It runs GGUF's 8-, 6- and 5-bit
// blocks (Q8_0, Q6_K, Q5_x: tinychat/io/gguf_blocks.py) and the CPU backend's int8 output projection (one group per
// row, G = K).
//
// Small M: rows of W split over threads; each row is read once for up to kMaxMB rows of x, its int8 values widened
// to fp32 lanes and summed per group in SIMD registers, which the group's scale multiplies (AVX-512, AVX2 + FMA, or
// portable C++ that the compiler vectorizes; picked at run time, isa.h); the offset term m * sum_{k in g} x[m, k]
// uses per-group sums of x computed once per call. On AVX-512 VNNI, calls of up to vnni::kMaxMBVnni rows (decode
// steps) with groups of 32 or more run int4_linear's GEMV instead (vnni_gemv.h, Bytes): x rounded to int8 at two
// levels, the same error bound as there (the widening had made this GEMV compute-bound: SmolLM2's 28 MB output
// projection at 30 GB/s on 2 threads). Large M: chunks of W dequantized to fp32 and multiplied with torch's GEMM.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/checks.h"
#include "isa.h"
#include "kernels.h"
#include "linear.h"
#include "vec.h"
#include "vnni_gemv.h"

namespace tinychat {

namespace {

constexpr int kMaxMB = 4;  // rows of x a GEMV pass handles together

struct Problem {
  const float* x;     // [M, K], rows contiguous
  const float* xsum;  // [M, K/G]: the sum of x over each group (nullptr without offsets)
  const int8_t* q;    // [N, K]
  GroupParams w;      // scales, offsets [N, K/G]
  float* y;           // fp32 [M, N]
  int64_t M, N, K, G, ng;
};

// sum_k q[k] * x[k] over k in [k0, k1), scalar (the part of a group past the SIMD lanes).
TINYCHAT_INLINE float tail_dot(const int8_t* q, const float* x, int64_t k0, int64_t k1) {
  float s = 0.f;
  for (int64_t k = k0; k < k1; ++k) s += static_cast<float>(q[k]) * x[k];
  return s;
}

// The offset term of output row n for row m of x: sum_g m[g] * xsum[m, g], mw the row's offsets (0 without offsets).
TINYCHAT_INLINE float offset_term(const Problem& p, const float* mw, int64_t m) {
  if (p.xsum == nullptr) return 0.f;
  float s = 0.f;
  for (int64_t g = 0; g < p.ng; ++g) s += mw[g] * p.xsum[m * p.ng + g];
  return s;
}

// Each GEMV kernel computes y[m0 .. m0+MB, n] for one row n of W and one instruction set, from the row's group
// parameters sw, mw (fp32 [K/G], row_params).
template <int MB>
void gemv_scalar(const Problem& p, int64_t n, int64_t m0, const float* sw, const float* mw) {
  const int64_t K = p.K, G = p.G, g_main = G - G % kDotLanes;
  const float* x = p.x + m0 * K;
  const int8_t* q = p.q + n * K;
  float acc[MB] = {};
  for (int64_t g = 0; g < p.ng; ++g) {
    const int64_t k0 = g * G;
    float gacc[MB][kDotLanes] = {};
    for (int64_t k = k0; k < k0 + g_main; k += kDotLanes) {
      #pragma GCC unroll 8  // keep the MB accumulators in registers
      for (int mb = 0; mb < MB; ++mb) {
        for (int j = 0; j < kDotLanes; ++j) gacc[mb][j] += static_cast<float>(q[k + j]) * x[mb * K + k + j];
      }
    }
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) {
      float d = tail_dot(q, x + mb * K, k0 + g_main, k0 + G);
      for (int j = 0; j < kDotLanes; ++j) d += gacc[mb][j];
      acc[mb] += sw[g] * d;
    }
  }
  #pragma GCC unroll 8  // keep the MB accumulators in registers
  for (int mb = 0; mb < MB; ++mb) p.y[(m0 + mb) * p.N + n] = acc[mb] + offset_term(p, mw, m0 + mb);
}

#ifdef TINYCHAT_X86
template <int MB>
TINYCHAT_AVX2 void gemv_avx2(const Problem& p, int64_t n, int64_t m0, const float* sw, const float* mw) {
  const int64_t K = p.K, G = p.G, g_main = G - G % 8;
  const float* x = p.x + m0 * K;
  const int8_t* q = p.q + n * K;
  __m256 acc[MB];
  float tails[MB] = {};
  #pragma GCC unroll 8  // keep the MB accumulators in registers
  for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm256_setzero_ps();
  for (int64_t g = 0; g < p.ng; ++g) {
    const int64_t k0 = g * G;
    __m256 gacc[MB];
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) gacc[mb] = _mm256_setzero_ps();
    for (int64_t k = k0; k < k0 + g_main; k += 8) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k));
      const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
      #pragma GCC unroll 8  // keep the MB accumulators in registers
      for (int mb = 0; mb < MB; ++mb) gacc[mb] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + mb * K + k), gacc[mb]);
    }
    const __m256 vs = _mm256_set1_ps(sw[g]);
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) {
      acc[mb] = _mm256_fmadd_ps(vs, gacc[mb], acc[mb]);
      if (g_main < G) tails[mb] += sw[g] * tail_dot(q, x + mb * K, k0 + g_main, k0 + G);
    }
  }
  #pragma GCC unroll 8  // keep the MB accumulators in registers
  for (int mb = 0; mb < MB; ++mb) {
    p.y[(m0 + mb) * p.N + n] = hsum_avx2(acc[mb]) + tails[mb] + offset_term(p, mw, m0 + mb);
  }
}

// gcc 12's AVX-512 intrinsics start from _mm512_undefined_*() and trip its own uninitialized-value warnings
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <int MB>
TINYCHAT_AVX512 void gemv_avx512(const Problem& p, int64_t n, int64_t m0, const float* sw, const float* mw) {
  const int64_t K = p.K, G = p.G, g_main = G - G % 16;
  const float* x = p.x + m0 * K;
  const int8_t* q = p.q + n * K;
  // the row after next, which this thread most likely runs soon: streaming a matrix larger than the caches (the
  // output projection), the hardware prefetcher alone kept this GEMV at half the read bandwidth (prefetches never
  // fault past the end)
  for (int64_t k = 0; k < K; k += 64) _mm_prefetch(reinterpret_cast<const char*>(q + 2 * K + k), _MM_HINT_T0);
  __m512 acc[MB];
  float tails[MB] = {};
  #pragma GCC unroll 8  // keep the MB accumulators in registers
  for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.ng; ++g) {
    const int64_t k0 = g * G;
    __m512 gacc[MB];
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) gacc[mb] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k0 + g_main; k += 16) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k));
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
      #pragma GCC unroll 8  // keep the MB accumulators in registers
      for (int mb = 0; mb < MB; ++mb) gacc[mb] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + mb * K + k), gacc[mb]);
    }
    const __m512 vs = _mm512_set1_ps(sw[g]);
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) {
      acc[mb] = _mm512_fmadd_ps(vs, gacc[mb], acc[mb]);
      if (g_main < G) tails[mb] += sw[g] * tail_dot(q, x + mb * K, k0 + g_main, k0 + G);
    }
  }
  #pragma GCC unroll 8  // keep the MB accumulators in registers
  for (int mb = 0; mb < MB; ++mb) {
    p.y[(m0 + mb) * p.N + n] = _mm512_reduce_add_ps(acc[mb]) + tails[mb] + offset_term(p, mw, m0 + mb);
  }
}
#pragma GCC diagnostic pop
#endif

using GemvFn = void (*)(const Problem&, int64_t, int64_t, const float*, const float*);

template <int MB>
GemvFn gemv_for(Isa isa) {
#ifdef TINYCHAT_X86
  if (isa >= Isa::kAvx512) return gemv_avx512<MB>;
  if (isa == Isa::kAvx2) return gemv_avx2<MB>;
#endif
  return gemv_scalar<MB>;
}

GemvFn gemv_fn(Isa isa, int mb) {
  static_assert(kMaxMB == 4, "gemv_fn instantiates MB = 1..4");
  switch (mb) {
    case 1: return gemv_for<1>(isa);
    case 2: return gemv_for<2>(isa);
    case 3: return gemv_for<3>(isa);
    default: return gemv_for<4>(isa);
  }
}

}  // namespace

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& offsets, int64_t group_size) {
  check_int8_linear_args(x, qweight, scales, offsets, group_size, c10::DeviceType::CPU);
  const int64_t K = x.size(-1);
  const int64_t N = qweight.size(0);
  const std::vector<int64_t> out_shape = linear_out_shape(x, N);
  if (x.numel() == 0 || N == 0) return at::zeros(out_shape, x.options());
  const at::Tensor xf = float_rows(x);  // [M, K]
  const int64_t M = xf.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());  // fp32 [M, N]
  Problem p{xf.const_data_ptr<float>(), nullptr, qweight.const_data_ptr<int8_t>(),
                  group_params(scales, offsets, 0.f), y.data_ptr<float>(), M, N, K, group_size, K / group_size};
  if (M >= kGemmMinRows) {
    dequantized_gemm(xf, y, N, [&](int64_t n0, int64_t rows, float* w) {
      for (int64_t r = 0; r < rows; ++r) {
        const int8_t* q = p.q + (n0 + r) * K;
        for (int64_t g = 0; g < p.ng; ++g) {
          const float s = p.w.scale((n0 + r) * p.ng + g), m = p.w.offset((n0 + r) * p.ng + g);
          for (int64_t k = g * p.G; k < (g + 1) * p.G; ++k) w[r * K + k] = static_cast<float>(q[k]) * s + m;
        }
      }
    });
    return y.to(x.scalar_type()).view(out_shape);
  }
#ifdef TINYCHAT_X86
  if (current_isa() == Isa::kAvx512Vnni && M <= vnni::kMaxMBVnni && vnni::vnni_supports(group_size)) {
    vnni::vnni_gemv<vnni::Bytes>(p.x, reinterpret_cast<const uint8_t*>(p.q), K, p.w, p.y, M, N, K, group_size);
    return y.to(x.scalar_type()).view(out_shape);
  }
#endif
  std::vector<float> xsum;  // [M, K/G], the offset term's sums of x
  if (p.w.has_offsets()) {
    xsum = group_sums(p.x, M, K, group_size);
    p.xsum = xsum.data();
  }
  run_rows(p, current_isa(), kMaxMB, gemv_fn);
  return y.to(x.scalar_type()).view(out_shape);
}

}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CPU, m) {
  m.impl("int8_linear", &tinychat::int8_linear_cpu);
}
