// CPU kernels of silu_and_mul and gelu_tanh_and_mul (schemas in csrc/ops.cpp; the CUDA twins are in
// csrc/cuda/activation.cu): the gated MLP's activation act(gate) * up, with act = silu (Llama) or GELU with the tanh
// approximation (Gemma).
//
// Rows are split over threads with at::parallel_for. All math is fp32; each output is rounded to the input dtype
// once. The row loop is one body per activation compiled per instruction set (isa.h) that gcc auto-vectorizes at -O3
// (the exp is vec.h's exp_approx; gelu_tanh(g) = 0.5 g (1 + tanh(u)) = g / (1 + exp(-2u)), tanh written with it).

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

// The activations, act(g) in fp32.
struct Silu {
  static TINYCHAT_INLINE float act(float g) { return g / (1.f + exp_approx(-g)); }
};
// gelu_tanh(g) = 0.5 g (1 + tanh(u)), u = sqrt(2 / pi) (g + 0.044715 g^3), written as g / (1 + exp(-2u)) (the same
// value, without 1 + tanh's cancellation for negative g; exp_approx clamps its argument, so a large |g| gives g or a
// value within 1e-35 of 0, never NaN).
struct GeluTanh {
  static TINYCHAT_INLINE float act(float g) {
    constexpr float kTwoSqrt2OverPi = 1.5957691216057308f;  // 2 sqrt(2 / pi)
    return g / (1.f + exp_approx(-kTwoSqrt2OverPi * (g + 0.044715f * g * g * g)));
  }
};

// o[i] = Act::act(g[i]) * u[i] for i < n: one body, compiled per instruction set (isa.h).
template <class Act>
TINYCHAT_INLINE void gated_body(const float* __restrict g, const float* __restrict u, float* __restrict o,
                                int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = Act::act(g[i]) * u[i];
}

using RowFn = void (*)(const float* gate, const float* up, float* out, int64_t n);

template <class Act>
void gated_scalar(const float* g, const float* u, float* o, int64_t n) { gated_body<Act>(g, u, o, n); }
#ifdef TINYCHAT_X86
template <class Act>
TINYCHAT_AVX2 void gated_avx2(const float* g, const float* u, float* o, int64_t n) { gated_body<Act>(g, u, o, n); }
template <class Act>
TINYCHAT_AVX512 void gated_avx512(const float* g, const float* u, float* o, int64_t n) {
  gated_body<Act>(g, u, o, n);
}
#endif

// The row function of activation Act for the current instruction set.
template <class Act>
RowFn gated_rows() {
#ifdef TINYCHAT_X86
  const Isa isa = current_isa();
  if (isa >= Isa::kAvx512) return gated_avx512<Act>;
  if (isa == Isa::kAvx2) return gated_avx2<Act>;
#endif
  return gated_scalar<Act>;
}

// act(x[..., :I]) * x[..., I:], row_fn computing one row of it; op names the op in errors.
at::Tensor gated_activation(const at::Tensor& x, RowFn row_fn, const char* op) {
  check_gated_act_args(x, c10::DeviceType::CPU, op);
  const int64_t I = x.size(-1) / 2;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = I;
  at::Tensor out = at::empty(out_shape, x.options());
  if (out.numel() == 0) return out;
  // fp32 rows: gate | up; other dtypes are widened once (the activation reads each value once anyway)
  const at::Tensor x2 = x.reshape({-1, 2 * I}).to(at::kFloat).contiguous();  // [rows, 2I]
  at::Tensor out2 = out.scalar_type() == at::kFloat ? out.view({-1, I}) : at::empty({x2.size(0), I}, x2.options());
  const float* xp = x2.const_data_ptr<float>();
  float* op_out = out2.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (4 * I));
  at::parallel_for(0, x2.size(0), grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row_fn(xp + r * 2 * I, xp + r * 2 * I + I, op_out + r * I, I);
  });
  if (out2.data_ptr() != out.data_ptr()) out.view({-1, I}).copy_(out2);
  return out;
}

}  // namespace

at::Tensor silu_and_mul_cpu(const at::Tensor& x) {
  return gated_activation(x, gated_rows<Silu>(), "silu_and_mul");
}

at::Tensor gelu_tanh_and_mul_cpu(const at::Tensor& x) {
  return gated_activation(x, gated_rows<GeluTanh>(), "gelu_tanh_and_mul");
}

}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CPU, m) {
  m.impl("silu_and_mul", &tinychat::silu_and_mul_cpu);
  m.impl("gelu_tanh_and_mul", &tinychat::gelu_tanh_and_mul_cpu);
}
