// The CPU kernels' entry points (schemas in csrc/ops.cpp), for callers inside the library that run several in a row
// without the dispatcher: the one-call decode step (decode_step.cpp). Each checks its arguments as the op does.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace tinychat {

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& weight, double eps);
at::Tensor rope_kv_write_cpu(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos_sin,
                             at::Tensor& k_cache, at::Tensor& v_cache);
at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& positions, double scale, int64_t window);
at::Tensor silu_and_mul_cpu(const at::Tensor& x);
at::Tensor gelu_tanh_and_mul_cpu(const at::Tensor& x);
at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& offsets, int64_t group_size);
at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& offsets, int64_t group_size);

}  // namespace tinychat
