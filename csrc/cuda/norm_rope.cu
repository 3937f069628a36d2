// CUDA kernels for rms_norm, add_rms_norm and rotary_embedding (schemas in csrc/ops.cpp).
//
// Norms: one block per row; each thread strides over the row, a warp-shuffle block
// reduction gives the sum of squares. Rotary: one thread per (x1, x2) pair.
// Math is fp32 (no fast-math), each output rounded to the input dtype once.
// rotary_embedding does NOT check positions against cos_sin on the GPU (that would need a
// device sync); a position outside [0, max_pos) yields NaN outputs instead of a bad read.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/checks.h"

namespace tinychat {

namespace {

constexpr int kWarp = 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

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

// One thread per pair (x[..., i], x[..., i + half]); out is contiguous [B, T, nH, D].
template <typename scalar_t>
__global__ void rotary_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ pos,
                              const float* __restrict__ cos_sin, scalar_t* __restrict__ out,
                              int64_t n_pairs, int64_t T, int64_t nH, int64_t half, int64_t sx0,
                              int64_t sx1, int64_t sx2, int64_t pos_sb, int64_t pos_st, int64_t max_pos) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_pairs) return;
  const int64_t i = idx % half;
  const int64_t row = idx / half;  // (b * T + t) * nH + h
  const int64_t h = row % nH;
  const int64_t t = (row / nH) % T;
  const int64_t b = row / (nH * T);
  scalar_t* o = out + row * 2 * half;
  const int64_t p = pos[b * pos_sb + t * pos_st];
  if (p < 0 || p >= max_pos) {  // not checked on the host: poison the output instead
    o[i] = o[i + half] = static_cast<scalar_t>(__int_as_float(0x7fc00000));
    return;
  }
  const scalar_t* xr = x + b * sx0 + t * sx1 + h * sx2;
  const float c = cos_sin[p * 2 * half + i];
  const float s = cos_sin[p * 2 * half + half + i];
  const float x1 = static_cast<float>(xr[i]);
  const float x2 = static_cast<float>(xr[i + half]);
  o[i] = static_cast<scalar_t>(x1 * c - x2 * s);
  o[i + half] = static_cast<scalar_t>(x2 * c + x1 * s);
}

at::Tensor rotary_embedding_cuda(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos_sin) {
  check_rotary_args(x, positions, cos_sin, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), nH = x.size(2), D = x.size(3);
  at::Tensor out = at::empty({B, T, nH, D}, x.options());
  const int64_t n_pairs = B * T * nH * (D / 2);
  if (n_pairs == 0) return out;
  const int threads = 256;
  const int64_t blocks = (n_pairs + threads - 1) / threads;
  TORCH_CHECK(blocks <= INT32_MAX, "rotary_embedding: x is too large: ", x.sizes());
  const int64_t pos_sb = positions.dim() == 2 ? positions.stride(0) : 0;  // [T] broadcasts over B
  const int64_t pos_st = positions.stride(-1);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tinychat_rotary_cuda", [&] {
    rotary_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), positions.const_data_ptr<int64_t>(), cos_sin.const_data_ptr<float>(),
        out.data_ptr<scalar_t>(), n_pairs, T, nH, D / 2, x.stride(0), x.stride(1), x.stride(2), pos_sb,
        pos_st, cos_sin.size(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CUDA, m) {
  m.impl("rms_norm", &tinychat::rms_norm_cuda);
  m.impl("add_rms_norm", &tinychat::add_rms_norm_cuda);
  m.impl("rotary_embedding", &tinychat::rotary_embedding_cuda);
}
