// CPU kernels of int4_linear (schema in csrc/ops.cpp; weight layout in tinychat/quant/pack.py).
//
// y[m, n] = sum_k x[m, k] * W[n, k], W[n, k] = (q[n, k] - zeros[n, k/G]) * scales[n, k/G], fp32 math, each output
// rounded to x's dtype once.
//
// Layout: qweight uint8 [N, K/2] in blocks of 32 input channels; byte j (0..15) of block b holds channel 32b + j in
// its low nibble and channel 32b + 16 + j in its high nibble. One 16-byte load thus gives 32 weights as two
// contiguous runs of 16 (mask, shift), which widen straight to fp32 lanes with no shuffle.
//
// Two paths, picked per call:
//  * small M (decode, short prompts): a GEMV-style kernel over rows of W. Per row and group it accumulates
//    sum_k q[k] * x[m, k] in SIMD registers for up to kMaxMB rows of x at once, then applies the group's scale;
//    the zero term s * z * sum_{k in g} x[m, k] uses per-group sums of x computed once per call. Each weight byte
//    is read from memory once; x stays in L1.
//  * large M (prefill): W is dequantized to fp32 in chunks of rows and multiplied with torch's own GEMM (oneDNN /
//    MKL), whose blocking no hand-written loop here would beat; the dequantization is amortized over M rows.
//
// Instruction sets: AVX-512 (F/BW/VL/DQ), AVX2 + FMA, and portable C++ (which the compiler vectorizes as it can;
// NEON on ARM through that path), picked at run time (isa.h).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/checks.h"
#include "isa.h"
#include "vec.h"

namespace tinychat {

namespace {

constexpr int64_t kBlock = 32;            // input channels per 16 bytes of qweight
constexpr int kMaxMB = 4;                 // rows of x a GEMV pass handles together
constexpr int64_t kGemmMinRows = 16;      // from this M on, dequantize + GEMM
constexpr int64_t kGemmChunkBytes = 8 << 20;  // fp32 weights dequantized at a time on the GEMM path

// Every argument of int4_linear; shared by any device's launcher (pass its device type).
void check_int4_linear_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& zeros, int64_t group_size, c10::DeviceType type) {
  const char* op = "int4_linear";
  check_device(x, x, type, op, "x");
  check_device(qweight, x, type, op, "qweight");
  check_device(scales, x, type, op, "scales");
  check_device(zeros, x, type, op, "zeros");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape [..., K], got a 0-dim tensor");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K > 0 && K % kBlock == 0, op, ": x's last dimension K (in_features) must be a positive multiple of ",
              kBlock, ", got ", K);
  TORCH_CHECK(group_size > 0, op, ": group_size must be > 0, got ", group_size);
  TORCH_CHECK(K % group_size == 0, op, ": group_size ", group_size, " must divide x's last dimension K = ", K);
  TORCH_CHECK(group_size % kBlock == 0, op, ": group_size must be a multiple of ", kBlock, ", got ", group_size);
  TORCH_CHECK(qweight.scalar_type() == at::kByte, op,
              ": qweight must be uint8 (two 4-bit weights per byte), got ", qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) * 2 == K, op, ": qweight must have shape [N, K/2] = [N, ",
              K / 2, "] for x's K = ", K, ", got ", qweight.sizes());
  TORCH_CHECK(qweight.is_contiguous(), op, ": qweight must be contiguous");
  const int64_t N = qweight.size(0);
  const int64_t n_groups = K / group_size;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"scales", scales},
                                std::pair<const char*, const at::Tensor&>{"zeros", zeros}}) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == n_groups, op, ": ", name,
                " must have shape [N, K/group_size] = [", N, ", ", n_groups, "], got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  }
}

// The problem, as raw pointers. x fp32 [M, K] (rows contiguous); xsum fp32 [M, K/G] (sum of x over each group).
struct Problem {
  const float* x;
  const float* xsum;
  const uint8_t* q;       // [N, K/2]
  const float* scales;    // [N, K/G]
  const float* zeros;     // [N, K/G]
  float* y;               // fp32 [M, N]
  int64_t M, N, K, G;
};

// ---- portable path ----

// y[m, n] for MB rows of x from m0, one row n of W.
template <int MB>
void gemv_row_scalar(const Problem& p, int64_t n, int64_t m0) {
  const uint8_t* qrow = p.q + n * (p.K / 2);
  const int64_t ng = p.K / p.G;
  float acc[MB] = {};
  for (int64_t g = 0; g < ng; ++g) {
    float gacc[MB] = {};
    for (int64_t b = g * p.G; b < (g + 1) * p.G; b += kBlock) {
      const uint8_t* qb = qrow + b / 2;
      for (int mb = 0; mb < MB; ++mb) {
        const float* xb = p.x + (m0 + mb) * p.K + b;
        float s = 0.f;
        for (int j = 0; j < 16; ++j) {
          s += static_cast<float>(qb[j] & 0xF) * xb[j] + static_cast<float>(qb[j] >> 4) * xb[16 + j];
        }
        gacc[mb] += s;
      }
    }
    const float sc = p.scales[n * ng + g], sz = sc * p.zeros[n * ng + g];
    for (int mb = 0; mb < MB; ++mb) acc[mb] += sc * gacc[mb] - sz * p.xsum[(m0 + mb) * ng + g];
  }
  for (int mb = 0; mb < MB; ++mb) p.y[(m0 + mb) * p.N + n] = acc[mb];
}

// Rows n0..n0+rows of W in fp32 into w [rows, K].
void dequantize_scalar(const Problem& p, int64_t n0, int64_t rows, float* w) {
  const int64_t ng = p.K / p.G;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* qrow = p.q + (n0 + r) * (p.K / 2);
    float* wr = w + r * p.K;
    for (int64_t b = 0; b < p.K; b += kBlock) {
      const int64_t g = (n0 + r) * ng + b / p.G;
      const float sc = p.scales[g], z = p.zeros[g];
      for (int j = 0; j < 16; ++j) {
        wr[b + j] = (static_cast<float>(qrow[b / 2 + j] & 0xF) - z) * sc;
        wr[b + 16 + j] = (static_cast<float>(qrow[b / 2 + j] >> 4) - z) * sc;
      }
    }
  }
}

#ifdef TINYCHAT_X86

// ---- AVX2 + FMA ----

template <int MB>
TINYCHAT_AVX2 void gemv_row_avx2(const Problem& p, int64_t n, int64_t m0) {
  const uint8_t* qrow = p.q + n * (p.K / 2);
  const int64_t ng = p.K / p.G;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m256 acc[MB];
  for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm256_setzero_ps();
  float zterm[MB] = {};
  for (int64_t g = 0; g < ng; ++g) {
    __m256 gacc[MB];
    for (int mb = 0; mb < MB; ++mb) gacc[mb] = _mm256_setzero_ps();
    for (int64_t b = g * p.G; b < (g + 1) * p.G; b += kBlock) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + b / 2));
      const __m128i lo = _mm_and_si128(bytes, low4);                       // channels b .. b+15
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);    // channels b+16 .. b+31
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
      const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
      const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
      for (int mb = 0; mb < MB; ++mb) {
        const float* xb = p.x + (m0 + mb) * p.K + b;
        gacc[mb] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), gacc[mb]);
        gacc[mb] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), gacc[mb]);
        gacc[mb] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), gacc[mb]);
        gacc[mb] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), gacc[mb]);
      }
    }
    const float sc = p.scales[n * ng + g], sz = sc * p.zeros[n * ng + g];
    const __m256 vs = _mm256_set1_ps(sc);
    for (int mb = 0; mb < MB; ++mb) {
      acc[mb] = _mm256_fmadd_ps(vs, gacc[mb], acc[mb]);
      zterm[mb] += sz * p.xsum[(m0 + mb) * ng + g];
    }
  }
  for (int mb = 0; mb < MB; ++mb) p.y[(m0 + mb) * p.N + n] = hsum_avx2(acc[mb]) - zterm[mb];
}

TINYCHAT_AVX2 void dequantize_avx2(const Problem& p, int64_t n0, int64_t rows, float* w) {
  const int64_t ng = p.K / p.G;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* qrow = p.q + (n0 + r) * (p.K / 2);
    float* wr = w + r * p.K;
    for (int64_t b = 0; b < p.K; b += kBlock) {
      const int64_t g = (n0 + r) * ng + b / p.G;
      const __m256 vs = _mm256_set1_ps(p.scales[g]);
      const __m256 vz = _mm256_set1_ps(-p.zeros[g] * p.scales[g]);
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + b / 2));
      const __m128i lo = _mm_and_si128(bytes, low4);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
      const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
      for (int i = 0; i < 4; ++i) {
        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]));
        _mm256_storeu_ps(wr + b + 8 * i, _mm256_fmadd_ps(q, vs, vz));
      }
    }
  }
}

// ---- AVX-512 ----

// gcc 12's AVX-512 intrinsics start from _mm512_undefined_*() and trip its own uninitialized-value warnings
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"


template <int MB>
TINYCHAT_AVX512 void gemv_row_avx512(const Problem& p, int64_t n, int64_t m0) {
  const uint8_t* qrow = p.q + n * (p.K / 2);
  const int64_t ng = p.K / p.G;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m512 acc[MB];
  for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm512_setzero_ps();
  float zterm[MB] = {};
  for (int64_t g = 0; g < ng; ++g) {
    __m512 gacc[MB];
    for (int mb = 0; mb < MB; ++mb) gacc[mb] = _mm512_setzero_ps();
    for (int64_t b = g * p.G; b < (g + 1) * p.G; b += kBlock) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + b / 2));
      const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, low4)));
      const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4)));
      for (int mb = 0; mb < MB; ++mb) {
        const float* xb = p.x + (m0 + mb) * p.K + b;
        gacc[mb] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), gacc[mb]);
        gacc[mb] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), gacc[mb]);
      }
    }
    const float sc = p.scales[n * ng + g], sz = sc * p.zeros[n * ng + g];
    const __m512 vs = _mm512_set1_ps(sc);
    for (int mb = 0; mb < MB; ++mb) {
      acc[mb] = _mm512_fmadd_ps(vs, gacc[mb], acc[mb]);
      zterm[mb] += sz * p.xsum[(m0 + mb) * ng + g];
    }
  }
  for (int mb = 0; mb < MB; ++mb) p.y[(m0 + mb) * p.N + n] = _mm512_reduce_add_ps(acc[mb]) - zterm[mb];
}

TINYCHAT_AVX512 void dequantize_avx512(const Problem& p, int64_t n0, int64_t rows, float* w) {
  const int64_t ng = p.K / p.G;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* qrow = p.q + (n0 + r) * (p.K / 2);
    float* wr = w + r * p.K;
    for (int64_t b = 0; b < p.K; b += kBlock) {
      const int64_t g = (n0 + r) * ng + b / p.G;
      const __m512 vs = _mm512_set1_ps(p.scales[g]);
      const __m512 vz = _mm512_set1_ps(-p.zeros[g] * p.scales[g]);
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + b / 2));
      const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, low4)));
      const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4)));
      _mm512_storeu_ps(wr + b, _mm512_fmadd_ps(q0, vs, vz));
      _mm512_storeu_ps(wr + b + 16, _mm512_fmadd_ps(q1, vs, vz));
    }
  }
}

#pragma GCC diagnostic pop

#endif  // TINYCHAT_X86

// ---- dispatch ----

using GemvRowFn = void (*)(const Problem&, int64_t, int64_t);
using DequantFn = void (*)(const Problem&, int64_t, int64_t, float*);

// The GEMV kernel for `isa` and MB rows of x.
template <int MB>
GemvRowFn gemv_row_for(Isa isa) {
#ifdef TINYCHAT_X86
  if (isa == Isa::kAvx512) return gemv_row_avx512<MB>;
  if (isa == Isa::kAvx2) return gemv_row_avx2<MB>;
#endif
  return gemv_row_scalar<MB>;
}

GemvRowFn gemv_row_fn(Isa isa, int mb) {
  static_assert(kMaxMB == 4, "gemv_row_fn instantiates MB = 1..4");
  switch (mb) {
    case 1: return gemv_row_for<1>(isa);
    case 2: return gemv_row_for<2>(isa);
    case 3: return gemv_row_for<3>(isa);
    default: return gemv_row_for<4>(isa);
  }
}

DequantFn dequant_fn(Isa isa) {
#ifdef TINYCHAT_X86
  if (isa == Isa::kAvx512) return dequantize_avx512;
  if (isa == Isa::kAvx2) return dequantize_avx2;
#endif
  return dequantize_scalar;
}

// Small M: rows of W split over threads; every row of W is read once per chunk of kMaxMB rows of x (from cache
// after the first).
void run_gemv(const Problem& p, Isa isa) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (p.K * p.M));
  at::parallel_for(0, p.N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < p.M; m0 += kMaxMB) {
      const int mb = static_cast<int>(std::min<int64_t>(kMaxMB, p.M - m0));
      const GemvRowFn row = gemv_row_fn(isa, mb);
      for (int64_t n = begin; n < end; ++n) row(p, n, m0);
    }
  });
}

// Large M: dequantize chunks of W's rows to fp32 (in parallel), multiply each with torch's GEMM.
void run_gemm(const Problem& p, Isa isa, const at::Tensor& x2d, at::Tensor& y2d) {
  const DequantFn dequant = dequant_fn(isa);
  const int64_t chunk = std::max<int64_t>(16, std::min<int64_t>(p.N, kGemmChunkBytes / (4 * p.K)));
  at::Tensor w = at::empty({chunk, p.K}, x2d.options());  // fp32 [chunk, K]
  at::Tensor part = at::empty({p.M, chunk}, x2d.options());
  for (int64_t n0 = 0; n0 < p.N; n0 += chunk) {
    const int64_t rows = std::min(chunk, p.N - n0);
    float* wp = w.data_ptr<float>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      dequant(p, n0 + begin, end - begin, wp + begin * p.K);
    });
    at::Tensor out_rows = part.narrow(1, 0, rows);
    at::mm_out(out_rows, x2d, w.narrow(0, 0, rows).t());
    y2d.narrow(1, n0, rows).copy_(out_rows);
  }
}

at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t group_size) {
  check_int4_linear_args(x, qweight, scales, zeros, group_size, c10::DeviceType::CPU);
  const Isa isa = current_isa();
  const int64_t K = x.size(-1);
  const int64_t N = qweight.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  if (x.numel() == 0 || N == 0) return at::zeros(out_shape, x.options());
  // x in fp32, rows contiguous (no copy for a contiguous fp32 x): M x K floats, small next to the weights.
  const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();  // [M, K]
  const int64_t M = xf.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());  // fp32 [M, N]
  Problem p{xf.const_data_ptr<float>(), nullptr, qweight.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(),
            zeros.const_data_ptr<float>(), y.data_ptr<float>(), M, N, K, group_size};
  if (M >= kGemmMinRows) {
    run_gemm(p, isa, xf, y);
  } else {
    const int64_t ng = K / group_size;
    std::vector<float> xsum(M * ng);  // [M, K/G]: a plain loop, cheaper here than a torch op's dispatch
    for (int64_t i = 0; i < M * ng; ++i) {
      const float* xg = p.x + i * group_size;
      float s = 0.f;
      for (int64_t k = 0; k < group_size; ++k) s += xg[k];
      xsum[i] = s;
    }
    p.xsum = xsum.data();
    run_gemv(p, isa);
  }
  return y.to(x.scalar_type()).view(out_shape);
}

}  // namespace
}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CPU, m) {
  m.impl("int4_linear", &tinychat::int4_linear_cpu);
}
