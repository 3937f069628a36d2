// CUDA kernel of rope_kv_write (schema in csrc/ops.cpp; the CPU twin is csrc/cpu/rope.cpp): the rotary embedding of
// q and k fused with the KV-cache write. fp32 math, each result rounded to the input dtype once.
//
// One launch for q, k and v; one thread per (token, head, pair (i, i + D/2)) of qkv [B, T, H + 2 Hkv, D]. Query
// heads are rotated into the new [B, T, H, D] output, key heads rotated into k_cache[b, :, positions[t] % S], value
// heads copied into v_cache[b, :, positions[t] % S] (row p of a cache longer than every position; a ring's row
// otherwise). Positions are never read on the host (no device sync): a token whose position is outside [0, max_pos)
// writes no cache row and gets NaN queries (so the mistake shows instead of reading out of bounds).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../common/attention_plan.h"
#include "../common/checks.h"
#include "helpers.cuh"

namespace tinychat {

namespace {

struct RopeParams {
  int64_t n_pairs;         // B * T * heads * half
  int64_t T, H, Hkv, half, S, max_pos;
  int64_t s0, s1, s2;      // qkv strides of b, t, head (last dim contiguous)
  int64_t k0, k1, k2;      // k_cache strides of b, head, row
  int64_t v0, v1, v2;
};

template <typename scalar_t>
__global__ void rope_kv_write_kernel(const scalar_t* __restrict__ qkv, const int64_t* __restrict__ pos,
                                     const float* __restrict__ cos_sin, scalar_t* __restrict__ q_out,
                                     scalar_t* __restrict__ k_cache, scalar_t* __restrict__ v_cache,
                                     const RopeParams p) {
  const int64_t heads = p.H + 2 * p.Hkv;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < p.n_pairs;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % p.half;
    const int64_t row = idx / p.half;  // (b * T + t) * heads + hh
    const int64_t hh = row % heads;
    const int64_t bt = row / heads;
    const int64_t t = bt % p.T, b = bt / p.T;
    const int64_t pp = pos[t];
    const bool ok = attn::rope_position_ok(pp, p.max_pos);
    const int64_t crow = ok ? attn::cache_row(pp, p.S) : 0;  // the cache row of position pp
    const int kind = attn::qkv_head_kind(hh, p.H, p.Hkv);
    const scalar_t* x = qkv + b * p.s0 + t * p.s1 + hh * p.s2;
    if (kind == 2) {  // value: copied
      if (ok) {
        scalar_t* dst = v_cache + b * p.v0 + (hh - p.H - p.Hkv) * p.v1 + crow * p.v2;
        dst[i] = x[i];
        dst[i + p.half] = x[i + p.half];
      }
      continue;
    }
    scalar_t* dst = kind == 0 ? q_out + (bt * p.H + hh) * 2 * p.half
                              : k_cache + b * p.k0 + (hh - p.H) * p.k1 + crow * p.k2;
    if (!ok) {
      if (kind == 0) dst[i] = dst[i + p.half] = static_cast<scalar_t>(NAN);  // no cache row is written
      continue;
    }
    const float c = cos_sin[pp * 2 * p.half + i];
    const float s = cos_sin[pp * 2 * p.half + p.half + i];
    const float x1 = static_cast<float>(x[i]);
    const float x2 = static_cast<float>(x[i + p.half]);
    dst[i] = static_cast<scalar_t>(x1 * c - x2 * s);
    dst[i + p.half] = static_cast<scalar_t>(x2 * c + x1 * s);
  }
}

at::Tensor rope_kv_write_cuda(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos_sin,
                              at::Tensor& k_cache, at::Tensor& v_cache) {
  check_rope_kv_args(qkv, positions, cos_sin, k_cache, v_cache, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(qkv.device());
  check_sm80("rope_kv_write");
  const int64_t B = qkv.size(0), T = qkv.size(1), heads = qkv.size(2), D = qkv.size(3);
  const int64_t Hkv = k_cache.size(1), H = heads - 2 * Hkv;
  at::Tensor q_out = at::empty({B, T, H, D}, qkv.options());
  RopeParams p{};
  p.n_pairs = B * T * heads * (D / 2);
  if (p.n_pairs == 0) return q_out;
  p.T = T, p.H = H, p.Hkv = Hkv, p.half = D / 2, p.S = k_cache.size(2), p.max_pos = cos_sin.size(0);
  p.s0 = qkv.stride(0), p.s1 = qkv.stride(1), p.s2 = qkv.stride(2);
  p.k0 = k_cache.stride(0), p.k1 = k_cache.stride(1), p.k2 = k_cache.stride(2);
  p.v0 = v_cache.stride(0), p.v1 = v_cache.stride(1), p.v2 = v_cache.stride(2);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "tinychat_rope_kv_write_cuda", [&] {
    rope_kv_write_kernel<scalar_t><<<grid_for(p.n_pairs), kElementwiseThreads, 0, stream>>>(
        qkv.const_data_ptr<scalar_t>(), positions.const_data_ptr<int64_t>(), cos_sin.const_data_ptr<float>(),
        q_out.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return q_out;
}

}  // namespace
}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CUDA, m) {
  m.impl("rope_kv_write", &tinychat::rope_kv_write_cuda);
}
