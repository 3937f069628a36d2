// Argument checks shared by the CPU and CUDA launchers of the norm and rotary ops.
#pragma once

#include <ATen/ATen.h>

namespace tinychat {

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op, ": ", name,
              " must be float32, bfloat16 or float16, got ", dt);
}

inline void check_device(const at::Tensor& t, const at::Tensor& x, c10::DeviceType type,
                         const char* op, const char* name) {
  TORCH_CHECK(t.device().type() == type, op, ": ", name, " must be a ", c10::DeviceTypeName(type),
              " tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(),
              " but x is on ", x.device());
}

// x [..., H] last-dim contiguous, weight [H] contiguous with x's dtype, eps > 0.
inline void check_norm_args(const at::Tensor& x, const at::Tensor& weight, double eps,
                     c10::DeviceType type, const char* op) {
  check_device(x, x, type, op, "x");
  check_device(weight, x, type, op, "weight");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension, got a 0-dim tensor");
  const int64_t H = x.size(-1);
  TORCH_CHECK(H > 0, op, ": x's last dimension (hidden size) must be > 0");
  TORCH_CHECK(x.stride(-1) == 1 || H == 1, op, ": x must be contiguous in its last dimension, got strides ",
              x.strides());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H, op, ": weight must have shape [", H,
              "] (the hidden size of x), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " must match x dtype ", x.scalar_type());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  TORCH_CHECK(eps > 0, op, ": eps must be > 0, got ", eps);
}

inline void check_residual_arg(const at::Tensor& x, const at::Tensor& residual, c10::DeviceType type,
                        const char* op) {
  check_device(residual, x, type, op, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual shape ", residual.sizes(),
              " must match x shape ", x.sizes());
  TORCH_CHECK(residual.scalar_type() == x.scalar_type(), op, ": residual dtype ",
              residual.scalar_type(), " must match x dtype ", x.scalar_type());
  TORCH_CHECK(residual.stride(-1) == 1 || x.size(-1) == 1, op,
              ": residual must be contiguous in its last dimension, got strides ", residual.strides());
}

// x [B, T, nH, D] last-dim contiguous, positions int64 [B, T] or [T], cos_sin fp32 [max_pos, D].
inline void check_rotary_args(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos_sin,
                       c10::DeviceType type) {
  const char* op = "rotary_embedding";
  check_device(x, x, type, op, "x");
  check_device(positions, x, type, op, "positions");
  check_device(cos_sin, x, type, op, "cos_sin");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": x must have shape [B, T, n_heads, head_dim], got ", x.sizes());
  const int64_t D = x.size(3);
  TORCH_CHECK(D > 0 && D % 2 == 0, op, ": head_dim (x.size(3)) must be even and > 0, got ", D);
  TORCH_CHECK(x.stride(3) == 1, op, ": x must be contiguous in its last dimension, got strides ",
              x.strides());
  TORCH_CHECK(positions.scalar_type() == at::kLong, op, ": positions must be int64, got ",
              positions.scalar_type());
  const bool pos_ok = (positions.dim() == 1 && positions.size(0) == x.size(1)) ||
                      (positions.dim() == 2 && positions.size(0) == x.size(0) &&
                       positions.size(1) == x.size(1));
  TORCH_CHECK(pos_ok, op, ": positions must have shape [T] or [B, T] = [", x.size(0), ", ", x.size(1),
              "], got ", positions.sizes());
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat, op, ": cos_sin must be float32, got ",
              cos_sin.scalar_type());
  TORCH_CHECK(cos_sin.dim() == 2 && cos_sin.size(1) == D, op, ": cos_sin must have shape [max_pos, ",
              D, "] (head_dim of x), got ", cos_sin.sizes());
  TORCH_CHECK(cos_sin.is_contiguous(), op, ": cos_sin must be contiguous");
}

}  // namespace tinychat
