// CUDA kernels of rms_norm and add_rms_norm (schemas in csrc/ops.cpp; the CPU twin is csrc/cpu/norm.cpp).
//
// Norms: one block per row; each thread strides over the row, a warp-shuffle block
// reduction gives the sum of squares. Math is fp32 (no fast-math), each output rounded to
// the input dtype once.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "helpers.cuh"

namespace tinychat {

namespace {

// Sum of v over the block, returned to every thread. blockDim.x: a multiple of 32, <= 1024.
// Call at most once per kernel (it reuses one shared buffer).
__device__ float block_sum(float v) {
  __shared__ float partial[kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / kWarp) ? partial[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) partial[0] = v;
  }
  __syncthreads();
  return partial[0];
}

// One block per row of H elements. With kAdd, r = round(x + res) is written to r_out and normalized.
template <typename scalar_t, bool kAdd>
__global__ void rms_norm_kernel(const scalar_t* __restrict__ x, int64_t x_stride,
                                const scalar_t* __restrict__ res, int64_t res_stride,
                                const scalar_t* __restrict__ weight, scalar_t* __restrict__ out,
                                scalar_t* r_out, int H, float eps) {
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * x_stride;
  scalar_t* o = out + row * H;
  float sum_sq = 0.f;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    float v;
    if constexpr (kAdd) {
      const scalar_t r =
          static_cast<scalar_t>(static_cast<float>(xr[i]) + static_cast<float>(res[row * res_stride + i]));
      r_out[row * H + i] = r;
      v = static_cast<float>(r);
    } else {
      v = static_cast<float>(xr[i]);
    }
    sum_sq += v * v;
  }
  const float inv_rms = 1.0f / sqrtf(block_sum(sum_sq) / static_cast<float>(H) + eps);
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    // Each thread re-reads only the elements it wrote itself above.
    const float v = kAdd ? static_cast<float>(r_out[row * H + i]) : static_cast<float>(xr[i]);
    o[i] = static_cast<scalar_t>(v * inv_rms * static_cast<float>(weight[i]));
  }
}

std::tuple<at::Tensor, at::Tensor> norm_cuda(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                             const at::Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t H = x.size(-1);
  TORCH_CHECK(H <= INT32_MAX, "rms_norm: hidden size too large: ", H);
  const at::Tensor x2 = x.reshape({-1, H});  // a view when rows are evenly strided, else a copy
  const int64_t rows = x2.size(0);
  const bool add = residual.has_value();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor r_out = add ? at::empty(x.sizes(), x.options()) : at::Tensor();
  const at::Tensor res2 = add ? residual->reshape({-1, H}) : at::Tensor();
  const at::Tensor w = weight.contiguous();
  if (rows == 0) return {out, r_out};
  TORCH_CHECK(rows <= INT32_MAX, "rms_norm: too many rows: ", rows);

  const int threads = static_cast<int>(std::min<int64_t>(1024, (H + kWarp - 1) / kWarp * kWarp));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tinychat_rms_norm_cuda", [&] {
    if (add) {
      rms_norm_kernel<scalar_t, true><<<rows, threads, 0, stream>>>(
          x2.const_data_ptr<scalar_t>(), x2.stride(0), res2.const_data_ptr<scalar_t>(), res2.stride(0),
          w.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), r_out.data_ptr<scalar_t>(),
          static_cast<int>(H), static_cast<float>(eps));
    } else {
      rms_norm_kernel<scalar_t, false><<<rows, threads, 0, stream>>>(
          x2.const_data_ptr<scalar_t>(), x2.stride(0), nullptr, 0, w.const_data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), nullptr, static_cast<int>(H), static_cast<float>(eps));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, r_out};
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight, eps, c10::DeviceType::CUDA, "rms_norm");
  return std::get<0>(norm_cuda(x, c10::nullopt, weight, eps));
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& x, const at::Tensor& residual,
                                                     const at::Tensor& weight, double eps) {
  check_norm_args(x, weight, eps, c10::DeviceType::CUDA, "add_rms_norm");
  check_residual_arg(x, residual, c10::DeviceType::CUDA, "add_rms_norm");
  return norm_cuda(x, residual, weight, eps);
}

}  // namespace
}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CUDA, m) {
  m.impl("rms_norm", &tinychat::rms_norm_cuda);
  m.impl("add_rms_norm", &tinychat::add_rms_norm_cuda);
}
