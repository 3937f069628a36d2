// CPU kernel of int8_linear (schema in csrc/ops.cpp): y = x @ W.T with W[n, k] = q[n, k] * scales[n], int8 weights
// with one fp32 scale per output row, fp32 math, each output rounded to x's dtype once. The CPU backend stores the
// output projection (lm_head) this way: it is the largest matrix of a small model, read whole for every token.
//
// Small M: rows of W split over threads; each row is read once for up to kMaxMB rows of x, its int8 values widened
// to fp32 lanes (AVX-512, AVX2 + FMA, or portable C++ that the compiler vectorizes; picked at run time, isa.h).
// Large M: chunks of W dequantized to fp32 and multiplied with torch's GEMM.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/checks.h"
#include "isa.h"
#include "linear.h"
#include "vec.h"

namespace tinychat {

namespace {

constexpr int kMaxMB = 4;                     // rows of x a GEMV pass handles together

struct Problem {
  const float* x;       // [M, K], rows contiguous
  const int8_t* q;      // [N, K]
  const float* scales;  // [N]
  float* y;             // fp32 [M, N]
  int64_t M, N, K;
};

// Each GEMV kernel computes y[m0 .. m0+MB, n] for rows n in [n_begin, n_end) and one instruction set; the dot
// products run over the first k_main channels in SIMD, the rest in the shared scalar tail.
TINYCHAT_INLINE float tail_dot(const int8_t* q, const float* x, int64_t k_main, int64_t K) {
  float s = 0.f;
  for (int64_t k = k_main; k < K; ++k) s += static_cast<float>(q[k]) * x[k];
  return s;
}

template <int MB>
void gemv_scalar(const Problem& p, int64_t n_begin, int64_t n_end, int64_t m0) {
  const int64_t K = p.K, k_main = K - K % kDotLanes;
  const float* x = p.x + m0 * K;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* q = p.q + n * K;
    float acc[MB][kDotLanes] = {};
    for (int64_t k = 0; k < k_main; k += kDotLanes) {
      #pragma GCC unroll 8  // keep the MB accumulators in registers
      for (int mb = 0; mb < MB; ++mb) {
        for (int j = 0; j < kDotLanes; ++j) acc[mb][j] += static_cast<float>(q[k + j]) * x[mb * K + k + j];
      }
    }
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) {
      float s = tail_dot(q, x + mb * K, k_main, K);
      for (int j = 0; j < kDotLanes; ++j) s += acc[mb][j];
      p.y[(m0 + mb) * p.N + n] = s * p.scales[n];
    }
  }
}

#ifdef TINYCHAT_X86
template <int MB>
TINYCHAT_AVX2 void gemv_avx2(const Problem& p, int64_t n_begin, int64_t n_end, int64_t m0) {
  const int64_t K = p.K, k_main = K - K % 8;
  const float* x = p.x + m0 * K;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* q = p.q + n * K;
    __m256 acc[MB];
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_main; k += 8) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k));
      const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
      #pragma GCC unroll 8  // keep the MB accumulators in registers
      for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + mb * K + k), acc[mb]);
    }
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) {
      p.y[(m0 + mb) * p.N + n] = (hsum_avx2(acc[mb]) + tail_dot(q, x + mb * K, k_main, K)) * p.scales[n];
    }
  }
}

// gcc 12's AVX-512 intrinsics start from _mm512_undefined_*() and trip its own uninitialized-value warnings
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <int MB>
TINYCHAT_AVX512 void gemv_avx512(const Problem& p, int64_t n_begin, int64_t n_end, int64_t m0) {
  const int64_t K = p.K, k_main = K - K % 16;
  const float* x = p.x + m0 * K;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* q = p.q + n * K;
    __m512 acc[MB];
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_main; k += 16) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k));
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
      #pragma GCC unroll 8  // keep the MB accumulators in registers
      for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + mb * K + k), acc[mb]);
    }
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) {
      p.y[(m0 + mb) * p.N + n] = (_mm512_reduce_add_ps(acc[mb]) + tail_dot(q, x + mb * K, k_main, K)) * p.scales[n];
    }
  }
}
#pragma GCC diagnostic pop
#endif

using GemvFn = void (*)(const Problem&, int64_t, int64_t, int64_t);

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

void run_gemv(const Problem& p, Isa isa) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (p.K * p.M));
  at::parallel_for(0, p.N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < p.M; m0 += kMaxMB) {
      const int mb = static_cast<int>(std::min<int64_t>(kMaxMB, p.M - m0));
      gemv_fn(isa, mb)(p, begin, end, m0);
    }
  });
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  const char* op = "int8_linear";
  check_device(x, x, c10::DeviceType::CPU, op, "x");
  check_device(qweight, x, c10::DeviceType::CPU, op, "qweight");
  check_device(scales, x, c10::DeviceType::CPU, op, "scales");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have shape [..., K] with K > 0, got ", x.sizes());
  const int64_t K = x.size(-1);
  TORCH_CHECK(qweight.scalar_type() == at::kChar, op, ": qweight must be int8, got ", qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) == K && qweight.is_contiguous(), op,
              ": qweight must be a contiguous [N, K] = [N, ", K, "] tensor for x's K, got ", qweight.sizes());
  const int64_t N = qweight.size(0);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.size(0) == N &&
                  scales.is_contiguous(),
              op, ": scales must be a contiguous float32 [N] = [", N, "] tensor, got ", scales.scalar_type(), " ",
              scales.sizes());
  const std::vector<int64_t> out_shape = linear_out_shape(x, N);
  if (x.numel() == 0 || N == 0) return at::zeros(out_shape, x.options());
  const at::Tensor xf = float_rows(x);  // [M, K]
  const int64_t M = xf.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());  // fp32 [M, N]
  const Problem p{xf.const_data_ptr<float>(), qweight.const_data_ptr<int8_t>(), scales.const_data_ptr<float>(),
                  y.data_ptr<float>(), M, N, K};
  if (M >= kGemmMinRows) {
    dequantized_gemm(xf, y, N, [&](int64_t n0, int64_t rows, float* w) {
      for (int64_t r = 0; r < rows; ++r) {
        const int8_t* q = p.q + (n0 + r) * K;
        const float s = p.scales[n0 + r];
        for (int64_t k = 0; k < K; ++k) w[r * K + k] = static_cast<float>(q[k]) * s;
      }
    });
  } else {
    run_gemv(p, current_isa());
  }
  return y.to(x.scalar_type()).view(out_shape);
}

}  // namespace
}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CPU, m) {
  m.impl("int8_linear", &tinychat::int8_linear_cpu);
}
