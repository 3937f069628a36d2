// CPU kernel of rope_kv_write (schema in csrc/ops.cpp; the CUDA twin is csrc/cuda/rope.cu): the rotary embedding
// of q and k fused with the KV-cache write.
//
// Head rows are split over threads with at::parallel_for. All math is fp32; each output is rounded once, to the
// input dtype (q) or the caches' (k, v; float16 or bfloat16 below a float32 qkv: checks.h). Position p is written at
// cache row p % S (row p of a cache longer than every position; a ring otherwise). Positions are checked on the host
// first: one outside cos_sin's rows raises.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../common/checks.h"
#include "kernels.h"

namespace tinychat {

namespace {

// One head row of D: rotate-half rotary embedding by the table row cs = [cos | sin] of its position.
template <typename in_t, typename out_t>
inline void rotate_row(const in_t* x, const float* cs, out_t* out, int64_t D) {
  const int64_t half = D / 2;
  const float* sn = cs + half;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = static_cast<float>(x[i]);
    const float x2 = static_cast<float>(x[i + half]);
    out[i] = static_cast<out_t>(x1 * cs[i] - x2 * sn[i]);
    out[i + half] = static_cast<out_t>(x2 * cs[i] + x1 * sn[i]);
  }
}

template <typename scalar_t, typename cache_t>
void rope_kv_rows(const at::Tensor& qkv, const int64_t* pos, const float* cs, at::Tensor& q, at::Tensor& k_cache,
                  at::Tensor& v_cache) {
  const int64_t B = qkv.size(0), T = qkv.size(1), heads = qkv.size(2), D = qkv.size(3);
  const int64_t Hkv = k_cache.size(1), S = k_cache.size(2), H = heads - 2 * Hkv;
  const int64_t xs0 = qkv.stride(0), xs1 = qkv.stride(1), xs2 = qkv.stride(2);
  const scalar_t* x = qkv.const_data_ptr<scalar_t>();
  scalar_t* qo = q.data_ptr<scalar_t>();
  cache_t* kc = k_cache.data_ptr<cache_t>();
  cache_t* vc = v_cache.data_ptr<cache_t>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / D);
  at::parallel_for(0, B * T * heads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = (b * T + t) * heads + head
      const int64_t head = row % heads, t = (row / heads) % T, b = row / (heads * T);
      const scalar_t* xr = x + b * xs0 + t * xs1 + head * xs2;
      const float* c = cs + pos[t] * D;
      const int64_t cache_row = pos[t] % S;
      if (head < H) {
        rotate_row(xr, c, qo + ((b * T + t) * H + head) * D, D);
      } else if (head < H + Hkv) {
        rotate_row(xr, c, kc + ((b * Hkv + head - H) * S + cache_row) * D, D);
      } else {
        cache_t* vr = vc + ((b * Hkv + head - H - Hkv) * S + cache_row) * D;
        for (int64_t i = 0; i < D; ++i) {
          if constexpr (std::is_same_v<scalar_t, cache_t>) {
            vr[i] = xr[i];
          } else {
            vr[i] = static_cast<cache_t>(static_cast<float>(xr[i]));
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor rope_kv_write_cpu(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos_sin,
                             at::Tensor& k_cache, at::Tensor& v_cache) {
  check_rope_kv_args(qkv, positions, cos_sin, k_cache, v_cache, c10::DeviceType::CPU);
  const int64_t B = qkv.size(0), T = qkv.size(1), D = qkv.size(3);
  const int64_t H = qkv.size(2) - 2 * k_cache.size(1);
  const int64_t max_pos = cos_sin.size(0);
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "rope_kv_write: positions must be in [0, ", max_pos,
                ") (the rows of cos_sin), got ", pos[t]);
  }
  at::Tensor q = at::empty({B, T, H, D}, qkv.options());
  if (qkv.numel() == 0) return q;
  const float* cs = cos_sin.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "tinychat_rope_kv_write_cpu", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "tinychat_rope_kv_write_cache",
                                    [&] { rope_kv_rows<x_t, scalar_t>(qkv, pos, cs, q, k_cache, v_cache); });
  });
  return q;
}

}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CPU, m) {
  m.impl("rope_kv_write", &tinychat::rope_kv_write_cpu);
}
