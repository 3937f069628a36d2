// CPU kernel of decode_attention (schema in csrc/ops.cpp): one new query per sequence against the KV cache.
//
// out[b, h] = softmax(scale * q[b, h] . k[b, h / (H / Hkv), j] for j < length) @ v[b, h / (H / Hkv), :length]
//
// (b, kv head) pairs are split over threads; each handles the H / Hkv query heads that share a kv head, so every key
// and value row is read once for the whole group (grouped-query attention). The softmax is online: keys are taken
// in blocks of kBlock, the running max and sum rescale the fp32 accumulators, so one pass reads the cache once.
// Plain indexed loops over fp32 buffers; gcc vectorizes the dot products and the value update at -O3.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/checks.h"
#include "vec.h"

namespace tinychat {

namespace {

constexpr int64_t kBlock = 64;  // keys per online-softmax step
template <typename scalar_t>
inline void to_float(const scalar_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename scalar_t>
void decode_attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                             int64_t length, float scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1);
  const int64_t rep = H / Hkv;
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, length * D * rep));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(rep * D), acc(rep * D), kf(D), vf(D), scores(rep * kBlock), m(rep), l(rep);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, hk = bh % Hkv;
      for (int64_t r = 0; r < rep; ++r) {
        to_float(qp + b * qs0 + (hk * rep + r) * qs1, qf.data() + r * D, D);
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] *= scale;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      const scalar_t* kb = kp + b * ks0 + hk * ks1;
      const scalar_t* vb = vp + b * vs0 + hk * vs1;
      for (int64_t j0 = 0; j0 < length; j0 += kBlock) {
        const int64_t n = std::min(kBlock, length - j0);
        for (int64_t j = 0; j < n; ++j) {  // scores of this block, for every query head of the group
          to_float(kb + (j0 + j) * ks2, kf.data(), D);
          for (int64_t r = 0; r < rep; ++r) scores[r * kBlock + j] = dot(qf.data() + r * D, kf.data(), D);
        }
        for (int64_t r = 0; r < rep; ++r) {  // online softmax: rescale what came before to the new max
          float* s = scores.data() + r * kBlock;
          const float block_max = *std::max_element(s, s + n);
          const float new_max = std::max(m[r], block_max);
          const float correction = std::exp(m[r] - new_max);  // exp(-inf) = 0 on the first block
          float sum = 0.f;
          for (int64_t j = 0; j < n; ++j) {
            s[j] = std::exp(s[j] - new_max);
            sum += s[j];
          }
          l[r] = l[r] * correction + sum;
          m[r] = new_max;
          float* a = acc.data() + r * D;
          for (int64_t d = 0; d < D; ++d) a[d] *= correction;
        }
        for (int64_t j = 0; j < n; ++j) {
          to_float(vb + (j0 + j) * vs2, vf.data(), D);
          for (int64_t r = 0; r < rep; ++r) {
            const float p = scores[r * kBlock + j];
            float* a = acc.data() + r * D;
            for (int64_t d = 0; d < D; ++d) a[d] += p * vf[d];
          }
        }
      }
      for (int64_t r = 0; r < rep; ++r) {
        const float inv = 1.f / l[r];
        scalar_t* o = op + (b * H + hk * rep + r) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[r * D + d] * inv);
      }
    }
  });
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                int64_t length, double scale) {
  const char* op = "decode_attention";
  check_device(q, q, c10::DeviceType::CPU, op, "q");
  check_device(k_cache, q, c10::DeviceType::CPU, op, "k_cache");
  check_device(v_cache, q, c10::DeviceType::CPU, op, "v_cache");
  check_float_dtype(q, op, "q");
  TORCH_CHECK(q.dim() == 3, op, ": q must have shape [B, H, D], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), op,
              ": k_cache and v_cache must have the same shape [B, Hkv, S, D], got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), op,
              ": the caches' dtype must match q's (", q.scalar_type(), ")");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(3) == D, op, ": caches [B, Hkv, S, D] = ", k_cache.sizes(),
              " do not match q [B, H, D] = ", q.sizes());
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": q's heads (", H, ") must be a multiple of the caches' (", Hkv, ")");
  TORCH_CHECK(length >= 1 && length <= k_cache.size(2), op, ": length must be in [1, ", k_cache.size(2),
              "] (the cache size), got ", length);
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1, op,
              ": q and the caches must be contiguous in their last dimension");
  at::Tensor out = at::empty({B, H, D}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "tinychat_decode_attention_cpu", [&] {
    decode_attention_kernel<scalar_t>(q, k_cache, v_cache, out, length, static_cast<float>(scale));
  });
  return out;
}

}  // namespace
}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CPU, m) {
  m.impl("decode_attention", &tinychat::decode_attention_cpu);
}
