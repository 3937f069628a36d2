// CPU kernels for rms_norm, add_rms_norm, rope_kv_write and silu_and_mul (schemas in csrc/ops.cpp).
//
// Rows are split over threads with at::parallel_for. All math is fp32; each output is
// rounded to the input dtype once. The inner loops are plain indexed loops over fp32
// buffers so that gcc auto-vectorizes them at -O3 (the sum of squares is vec.h's dot, which
// keeps independent partial sums and so vectorizes without -ffast-math; silu's exp is vec.h's exp_approx).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common/checks.h"
#include "isa.h"
#include "vec.h"

namespace tinychat {

namespace {

// Normalizes `rows` rows of H elements. x rows are x_stride apart; out (and r_out) are contiguous.
// With res != nullptr, each row is first r = round(x + res), written to r_out and normalized.
template <typename scalar_t>
void norm_rows(const scalar_t* x, int64_t x_stride, const scalar_t* res, int64_t res_stride,
               const float* w, scalar_t* out, scalar_t* r_out, int64_t rows, int64_t H, float eps) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / H);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(H);  // this row in fp32
    float* v = buf.data();
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* xr = x + row * x_stride;
      if (res != nullptr) {
        const scalar_t* rr = res + row * res_stride;
        scalar_t* ro = r_out + row * H;
        for (int64_t i = 0; i < H; ++i) {
          const scalar_t r = static_cast<scalar_t>(static_cast<float>(xr[i]) + static_cast<float>(rr[i]));
          ro[i] = r;
          v[i] = static_cast<float>(r);
        }
      } else {
        for (int64_t i = 0; i < H; ++i) v[i] = static_cast<float>(xr[i]);
      }
      const float inv_rms = 1.0f / std::sqrt(dot(v, v, H) / static_cast<float>(H) + eps);
      scalar_t* o = out + row * H;
      for (int64_t i = 0; i < H; ++i) o[i] = static_cast<scalar_t>(v[i] * inv_rms * w[i]);
    }
  });
}

// Shared by rms_norm (residual undefined) and add_rms_norm.
std::tuple<at::Tensor, at::Tensor> norm_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, double eps) {
  const int64_t H = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, H});  // a view when rows are evenly strided, else a copy
  const int64_t rows = x2.size(0);
  const std::vector<float> w = [&] {
    const at::Tensor wf = weight.to(at::kFloat).contiguous();
    return std::vector<float>(wf.data_ptr<float>(), wf.data_ptr<float>() + H);
  }();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor r_out;
  at::Tensor res2;
  if (residual.has_value()) {
    r_out = at::empty(x.sizes(), x.options());
    res2 = residual->reshape({-1, H});
  }
  if (rows == 0) return {out, r_out};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tinychat_rms_norm_cpu", [&] {
    norm_rows<scalar_t>(x2.const_data_ptr<scalar_t>(), x2.stride(0),
                        res2.defined() ? res2.const_data_ptr<scalar_t>() : nullptr,
                        res2.defined() ? res2.stride(0) : 0, w.data(), out.data_ptr<scalar_t>(),
                        r_out.defined() ? r_out.data_ptr<scalar_t>() : nullptr, rows, H,
                        static_cast<float>(eps));
  });
  return {out, r_out};
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight, eps, c10::DeviceType::CPU, "rms_norm");
  return std::get<0>(norm_cpu(x, c10::nullopt, weight, eps));
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& weight, double eps) {
  check_norm_args(x, weight, eps, c10::DeviceType::CPU, "add_rms_norm");
  check_residual_arg(x, residual, c10::DeviceType::CPU, "add_rms_norm");
  return norm_cpu(x, residual, weight, eps);
}

// One head row of D: rotate-half rotary embedding by the table row cs = [cos | sin] of its position.
template <typename scalar_t>
inline void rotate_row(const scalar_t* x, const float* cs, scalar_t* out, int64_t D) {
  const int64_t half = D / 2;
  const float* sn = cs + half;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = static_cast<float>(x[i]);
    const float x2 = static_cast<float>(x[i + half]);
    out[i] = static_cast<scalar_t>(x1 * cs[i] - x2 * sn[i]);
    out[i + half] = static_cast<scalar_t>(x2 * cs[i] + x1 * sn[i]);
  }
}

at::Tensor rope_kv_write_cpu(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos_sin,
                             at::Tensor& k_cache, at::Tensor& v_cache) {
  check_rope_kv_args(qkv, positions, cos_sin, k_cache, v_cache, c10::DeviceType::CPU);
  const int64_t B = qkv.size(0), T = qkv.size(1), heads = qkv.size(2), D = qkv.size(3);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2), H = heads - 2 * Hkv;
  const int64_t limit = std::min(S, cos_sin.size(0));
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < limit, "rope_kv_write: positions must be in [0, ", limit,
                ") (the cache size and the rows of cos_sin), got ", pos[t]);
  }
  at::Tensor q = at::empty({B, T, H, D}, qkv.options());
  if (qkv.numel() == 0) return q;
  const int64_t xs0 = qkv.stride(0), xs1 = qkv.stride(1), xs2 = qkv.stride(2);
  const float* cs = cos_sin.const_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / D);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "tinychat_rope_kv_write_cpu", [&] {
    const scalar_t* x = qkv.const_data_ptr<scalar_t>();
    scalar_t* qo = q.data_ptr<scalar_t>();
    scalar_t* kc = k_cache.data_ptr<scalar_t>();
    scalar_t* vc = v_cache.data_ptr<scalar_t>();
    at::parallel_for(0, B * T * heads, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {  // row = (b * T + t) * heads + head
        const int64_t head = row % heads, t = (row / heads) % T, b = row / (heads * T);
        const scalar_t* xr = x + b * xs0 + t * xs1 + head * xs2;
        const float* c = cs + pos[t] * D;
        if (head < H) {
          rotate_row(xr, c, qo + ((b * T + t) * H + head) * D, D);
        } else if (head < H + Hkv) {
          rotate_row(xr, c, kc + ((b * Hkv + head - H) * S + pos[t]) * D, D);
        } else {
          scalar_t* vr = vc + ((b * Hkv + head - H - Hkv) * S + pos[t]) * D;
          for (int64_t i = 0; i < D; ++i) vr[i] = xr[i];
        }
      }
    });
  });
  return q;
}

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

}  // namespace
}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CPU, m) {
  m.impl("rms_norm", &tinychat::rms_norm_cpu);
  m.impl("add_rms_norm", &tinychat::add_rms_norm_cpu);
  m.impl("rope_kv_write", &tinychat::rope_kv_write_cpu);
  m.impl("silu_and_mul", &tinychat::silu_and_mul_cpu);
}
