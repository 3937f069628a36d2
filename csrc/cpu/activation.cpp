// CPU kernel of silu_and_mul (schema in csrc/ops.cpp; the CUDA twin is csrc/cuda/activation.cu): the gated MLP's
// activation silu(gate) * up.
//
// Rows are split over threads with at::parallel_for. All math is fp32; each output is rounded to the input dtype
// once. The row loop is one body compiled per instruction set (isa.h) that gcc auto-vectorizes at -O3 (silu's exp
// is vec.h's exp_approx).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common/checks.h"
#include "isa.h"
#include "kernels.h"
#include "vec.h"

namespace tinychat {

namespace {

// o[i] = silu(g[i]) * u[i] for i < n, in fp32: one body, compiled per instruction set (isa.h).
TINYCHAT_INLINE void silu_mul_body(const float* __restrict g, const float* __restrict u, float* __restrict o,
                                   int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = g[i] / (1.f + exp_approx(-g[i])) * u[i];
}
void silu_mul_scalar(const float* g, const float* u, float* o, int64_t n) { silu_mul_body(g, u, o, n); }
#ifdef TINYCHAT_X86
TINYCHAT_AVX2 void silu_mul_avx2(const float* g, const float* u, float* o, int64_t n) { silu_mul_body(g, u, o, n); }
TINYCHAT_AVX512 void silu_mul_avx512(const float* g, const float* u, float* o, int64_t n) {
  silu_mul_body(g, u, o, n);
}
#endif

}  // namespace

at::Tensor silu_and_mul_cpu(const at::Tensor& x) {
  check_silu_and_mul_args(x, c10::DeviceType::CPU);
  const int64_t I = x.size(-1) / 2;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = I;
  at::Tensor out = at::empty(out_shape, x.options());
  if (out.numel() == 0) return out;
  // fp32 rows: gate | up; other dtypes are widened once (the activation reads each value once anyway)
  const at::Tensor x2 = x.reshape({-1, 2 * I}).to(at::kFloat).contiguous();  // [rows, 2I]
  at::Tensor out2 = out.scalar_type() == at::kFloat ? out.view({-1, I}) : at::empty({x2.size(0), I}, x2.options());
  auto row_fn = silu_mul_scalar;
#ifdef TINYCHAT_X86
  const Isa isa = current_isa();
  if (isa >= Isa::kAvx512) row_fn = silu_mul_avx512;
  if (isa == Isa::kAvx2) row_fn = silu_mul_avx2;
#endif
  const float* xp = x2.const_data_ptr<float>();
  float* op = out2.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (4 * I));
  at::parallel_for(0, x2.size(0), grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row_fn(xp + r * 2 * I, xp + r * 2 * I + I, op + r * I, I);
  });
  if (out2.data_ptr() != out.data_ptr()) out.view({-1, I}).copy_(out2);
  return out;
}

}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CPU, m) {
  m.impl("silu_and_mul", &tinychat::silu_and_mul_cpu);
}
