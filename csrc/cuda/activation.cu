// CUDA kernels of silu_and_mul and gelu_tanh_and_mul (schemas in csrc/ops.cpp; the CPU twins are in
// csrc/cpu/activation.cpp): the gated MLP's activation act(gate) * up, act = silu (Llama) or GELU with the tanh
// approximation (Gemma). fp32 math, each result rounded to the input dtype once.
//
// One thread per 16-byte vector of the output (scalar fallback for odd sizes or misaligned rows).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../common/checks.h"
#include "helpers.cuh"

namespace tinychat {

namespace {

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

struct Silu {
  __device__ __forceinline__ float operator()(float g) const { return g / (1.0f + expf(-g)); }
};

// gelu_tanh(g) = 0.5 g (1 + tanh(u)), u = sqrt(2 / pi) (g + 0.044715 g^3), as g / (1 + exp(-2u)): the same value
// without 1 + tanh's cancellation for negative g (the CPU kernel's form; expf saturates to 0 or inf, never NaN).
struct GeluTanh {
  __device__ __forceinline__ float operator()(float g) const {
    return g / (1.0f + expf(-1.5957691216057308f * (g + 0.044715f * g * g * g)));  // 2 sqrt(2 / pi)
  }
};

// x rows of stride x_stride: [gate (I) | up (I)]; out [rows, I] contiguous. One thread per VEC outputs.
template <typename scalar_t, int VEC, typename Act>
__global__ void gated_act_kernel(const scalar_t* __restrict__ x, int64_t x_stride, scalar_t* __restrict__ out,
                                    int64_t rows, int64_t I) {
  const int64_t per_row = I / VEC;
  const int64_t n = rows * per_row;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / per_row, c = (idx % per_row) * VEC;
    const scalar_t* xr = x + r * x_stride + c;
    const Pack<scalar_t, VEC> g = *reinterpret_cast<const Pack<scalar_t, VEC>*>(xr);
    const Pack<scalar_t, VEC> u = *reinterpret_cast<const Pack<scalar_t, VEC>*>(xr + I);
    Pack<scalar_t, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      o.v[e] = static_cast<scalar_t>(Act()(static_cast<float>(g.v[e])) * static_cast<float>(u.v[e]));
    *reinterpret_cast<Pack<scalar_t, VEC>*>(out + r * I + c) = o;
  }
}

// act(x[..., :I]) * x[..., I:] on the current stream; op names the op in errors.
template <typename Act>
at::Tensor gated_act_cuda(const at::Tensor& x, const char* op) {
  check_gated_act_args(x, c10::DeviceType::CUDA, op);
  const c10::cuda::CUDAGuard guard(x.device());
  check_sm80(op);
  const int64_t I = x.size(-1) / 2;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = I;
  at::Tensor out = at::empty(out_shape, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor x2 = x.reshape({-1, 2 * I});  // a view when rows are evenly strided, else a copy
  const int64_t rows = x2.size(0);
  const int64_t x_stride = x2.size(0) > 1 ? x2.stride(0) : 2 * I;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tinychat_gated_act_cuda", [&] {
    constexpr int VEC = 16 / sizeof(scalar_t);
    const bool vec_ok = I % VEC == 0 && x_stride % VEC == 0 &&
                        reinterpret_cast<uintptr_t>(x2.const_data_ptr()) % 16 == 0;
    if (vec_ok) {
      gated_act_kernel<scalar_t, VEC, Act><<<grid_for(rows * (I / VEC)), kElementwiseThreads, 0, stream>>>(
          x2.const_data_ptr<scalar_t>(), x_stride, out.data_ptr<scalar_t>(), rows, I);
    } else {
      gated_act_kernel<scalar_t, 1, Act><<<grid_for(rows * I), kElementwiseThreads, 0, stream>>>(
          x2.const_data_ptr<scalar_t>(), x_stride, out.data_ptr<scalar_t>(), rows, I);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor silu_and_mul_cuda(const at::Tensor& x) { return gated_act_cuda<Silu>(x, "silu_and_mul"); }

at::Tensor gelu_tanh_and_mul_cuda(const at::Tensor& x) { return gated_act_cuda<GeluTanh>(x, "gelu_tanh_and_mul"); }

}  // namespace
}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CUDA, m) {
  m.impl("silu_and_mul", &tinychat::silu_and_mul_cuda);
  m.impl("gelu_tanh_and_mul", &tinychat::gelu_tanh_and_mul_cuda);
}
