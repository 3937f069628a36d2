// CPU kernels of rms_norm and add_rms_norm (schemas in csrc/ops.cpp; the CUDA twin is csrc/cuda/norm.cu).
//
// Rows are split over threads with at::parallel_for. All math is fp32; each output is
// rounded to the input dtype once. The inner loops are plain indexed loops over fp32
// buffers so that gcc auto-vectorizes them at -O3 (the sum of squares is vec.h's dot, which
// keeps independent partial sums and so vectorizes without -ffast-math).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common/checks.h"
#include "kernels.h"
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

}  // namespace

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

}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CPU, m) {
  m.impl("rms_norm", &tinychat::rms_norm_cpu);
  m.impl("add_rms_norm", &tinychat::add_rms_norm_cpu);
}
