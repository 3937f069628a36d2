// Argument checks shared by the CPU and CUDA launchers of the ops.
#pragma once

#include <ATen/ATen.h>

#include "kquant.h"

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

inline void check_positions(const at::Tensor& positions, const at::Tensor& x, int64_t T, c10::DeviceType type,
                            const char* op) {
  check_device(positions, x, type, op, "positions");
  TORCH_CHECK(positions.scalar_type() == at::kLong, op, ": positions must be int64, got ", positions.scalar_type());
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == T && positions.is_contiguous(), op,
              ": positions must be a contiguous [T] = [", T, "] tensor, got ", positions.sizes());
}

// k_cache, v_cache [B, Hkv, S, D]: x's device, same shape and dtype, last dim contiguous (contiguous if `whole`). The
// dtype is x's; on the CPU also float16 or bfloat16 below a float32 x (a half-size cache, converted as it is read).
inline void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& x, int64_t B,
                         int64_t D, bool whole, c10::DeviceType type, const char* op) {
  check_device(k_cache, x, type, op, "k_cache");
  check_device(v_cache, x, type, op, "v_cache");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), op,
              ": k_cache and v_cache must have the same shape [B, Hkv, S, D], got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(3) == D, op, ": the caches' shape ", k_cache.sizes(),
              " must be [", B, ", Hkv, S, ", D, "]");
  TORCH_CHECK(k_cache.size(1) > 0 && k_cache.size(2) > 0, op, ": the caches must have Hkv > 0 and S > 0, got ",
              k_cache.sizes());
  const at::ScalarType kv = k_cache.scalar_type();
  const bool half_below_float = type == c10::DeviceType::CPU && x.scalar_type() == at::kFloat &&
                                (kv == at::kHalf || kv == at::kBFloat16);
  TORCH_CHECK(v_cache.scalar_type() == kv && (kv == x.scalar_type() || half_below_float), op,
              ": the caches' dtype must be ", x.scalar_type(),
              (type == c10::DeviceType::CPU && x.scalar_type() == at::kFloat ? " (or float16 / bfloat16)" : ""),
              " and the same for both, got ", kv, " and ", v_cache.scalar_type());
  if (whole) {
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": the caches must be contiguous");
  } else {
    TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, op,
                ": the caches must be contiguous in their last dimension");
  }
}

// rope_kv_write: qkv [B, T, H + 2 Hkv, D] last-dim contiguous, positions int64 [T], cos_sin fp32 [max_pos, D]
// contiguous, contiguous caches [B, Hkv, S, D].
inline void check_rope_kv_args(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos_sin,
                               const at::Tensor& k_cache, const at::Tensor& v_cache, c10::DeviceType type) {
  const char* op = "rope_kv_write";
  check_device(qkv, qkv, type, op, "qkv");
  check_float_dtype(qkv, op, "qkv");
  TORCH_CHECK(qkv.dim() == 4, op, ": qkv must have shape [B, T, n_heads + 2 n_kv_heads, head_dim], got ",
              qkv.sizes());
  const int64_t D = qkv.size(3);
  TORCH_CHECK(D > 0 && D % 2 == 0, op, ": head_dim (qkv.size(3)) must be even and > 0, got ", D);
  TORCH_CHECK(qkv.stride(3) == 1, op, ": qkv must be contiguous in its last dimension, got strides ",
              qkv.strides());
  check_positions(positions, qkv, qkv.size(1), type, op);
  check_device(cos_sin, qkv, type, op, "cos_sin");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat, op, ": cos_sin must be float32, got ", cos_sin.scalar_type());
  TORCH_CHECK(cos_sin.dim() == 2 && cos_sin.size(1) == D && cos_sin.is_contiguous(), op,
              ": cos_sin must be a contiguous [max_pos, ", D, "] tensor (head_dim of qkv), got ", cos_sin.sizes());
  check_caches(k_cache, v_cache, qkv, qkv.size(0), D, true, type, op);
  const int64_t Hkv = k_cache.size(1);
  TORCH_CHECK(qkv.size(2) > 2 * Hkv && (qkv.size(2) - 2 * Hkv) % Hkv == 0, op, ": qkv's ", qkv.size(2),
              " heads must be H + 2 Hkv with Hkv = ", Hkv, " (the caches' heads) and H a positive multiple of Hkv");
}

// attention: q [B, T, H, D] last-dim contiguous, caches [B, Hkv, S, D] last-dim contiguous, H % Hkv == 0,
// positions int64 [T], window >= 0.
inline void check_attention_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                 const at::Tensor& positions, int64_t window, c10::DeviceType type) {
  const char* op = "attention";
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0: no sliding window), got ", window);
  check_device(q, q, type, op, "q");
  check_float_dtype(q, op, "q");
  TORCH_CHECK(q.dim() == 4, op, ": q must have shape [B, T, n_heads, head_dim], got ", q.sizes());
  TORCH_CHECK(q.size(3) > 0 && q.stride(3) == 1, op, ": q must have head_dim > 0 and be contiguous in it, got ",
              q.sizes(), " with strides ", q.strides());
  check_caches(k_cache, v_cache, q, q.size(0), q.size(3), false, type, op);
  TORCH_CHECK(q.size(2) % k_cache.size(1) == 0, op, ": q's heads (", q.size(2),
              ") must be a multiple of the caches' (", k_cache.size(1), ")");
  check_positions(positions, q, q.size(1), type, op);
}

// silu_and_mul, gelu_tanh_and_mul (op): x [..., 2I] with float dtype, last dim contiguous.
inline void check_gated_act_args(const at::Tensor& x, c10::DeviceType type, const char* op) {
  check_device(x, x, type, op, "x");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape [..., 2 I], got a 0-dim tensor");
  TORCH_CHECK(x.size(-1) % 2 == 0, op, ": x's last dimension must be even ([gate | up]), got ", x.size(-1));
  TORCH_CHECK(x.stride(-1) == 1 || x.size(-1) <= 2, op, ": x must be contiguous in its last dimension, got strides ",
              x.strides());
}

// Group parameters of int4_linear / int8_linear: scales [N, K/G] fp32 or fp16, contiguous; offsets undefined (None)
// or of the scales' shape and dtype, contiguous. Or ggml's K-quant superblocks (kquant.h): scales uint8
// [N, K/256, kq::kSuperBytes] contiguous, no offsets, G = 32.
inline void check_group_params(const at::Tensor& x, const at::Tensor& scales, const c10::optional<at::Tensor>& offsets,
                               int64_t N, int64_t group_size, c10::DeviceType type, const char* op) {
  const int64_t n_groups = x.size(-1) / group_size;
  check_device(scales, x, type, op, "scales");
  if (scales.scalar_type() == at::kByte) {
    TORCH_CHECK(group_size == kq::kGroup && n_groups % kq::kSuperGroups == 0, op,
                ": uint8 scales (K-quant superblocks) need group_size 32 and K a multiple of 256, got group_size ",
                group_size, " and K = ", x.size(-1));
    TORCH_CHECK(scales.dim() == 3 && scales.size(0) == N && scales.size(1) == n_groups / kq::kSuperGroups &&
                    scales.size(2) == kq::kSuperBytes,
                op, ": uint8 scales (K-quant superblocks) must have shape [N, K/256, ", kq::kSuperBytes, "] = [", N,
                ", ", n_groups / kq::kSuperGroups, ", ", kq::kSuperBytes, "], got ", scales.sizes());
    TORCH_CHECK(scales.is_contiguous(), op, ": scales must be contiguous");
    TORCH_CHECK(!offsets.has_value(), op, ": uint8 scales (K-quant superblocks) carry their offsets: offsets must be "
                "None");
    return;
  }
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf, op,
              ": scales must be float32, float16 or uint8 (K-quant superblocks), got ", scales.scalar_type());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == n_groups, op,
              ": scales must have shape [N, K/group_size] = [", N, ", ", n_groups, "], got ", scales.sizes());
  TORCH_CHECK(scales.is_contiguous(), op, ": scales must be contiguous");
  if (!offsets.has_value()) return;
  const at::Tensor& m = *offsets;
  check_device(m, x, type, op, "offsets");
  TORCH_CHECK(m.scalar_type() == scales.scalar_type(), op, ": offsets must have the scales' dtype ",
              scales.scalar_type(), ", got ", m.scalar_type());
  TORCH_CHECK(m.sizes() == scales.sizes(), op, ": offsets must have the scales' shape ", scales.sizes(), ", got ",
              m.sizes());
  TORCH_CHECK(m.is_contiguous(), op, ": offsets must be contiguous");
}

// x [..., K] of a quantized linear: a float dtype, at least 1 dimension, on qweight's device of `type`.
inline void check_linear_x(const at::Tensor& x, const at::Tensor& qweight, c10::DeviceType type, const char* op) {
  check_device(x, x, type, op, "x");
  check_device(qweight, x, type, op, "qweight");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape [..., K], got a 0-dim tensor");
}

// int4_linear: x [..., K] (K % 32 == 0), qweight uint8 [N, K/2] contiguous, group parameters [N, K/G]
// (check_group_params), G % 32 == 0, K % G == 0.
inline void check_int4_linear_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                   const c10::optional<at::Tensor>& offsets, int64_t group_size,
                                   c10::DeviceType type) {
  const char* op = "int4_linear";
  check_linear_x(x, qweight, type, op);
  const int64_t K = x.size(-1);
  TORCH_CHECK(K > 0 && K % 32 == 0, op, ": x's last dimension K (in_features) must be a positive multiple of 32, got ",
              K);
  TORCH_CHECK(group_size > 0, op, ": group_size must be > 0, got ", group_size);
  TORCH_CHECK(K % group_size == 0, op, ": group_size ", group_size, " must divide x's last dimension K = ", K);
  TORCH_CHECK(group_size % 32 == 0, op, ": group_size must be a multiple of 32, got ", group_size);
  TORCH_CHECK(qweight.scalar_type() == at::kByte, op,
              ": qweight must be uint8 (two 4-bit weights per byte), got ", qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) * 2 == K, op, ": qweight must have shape [N, K/2] = [N, ",
              K / 2, "] for x's K = ", K, ", got ", qweight.sizes());
  TORCH_CHECK(qweight.is_contiguous(), op, ": qweight must be contiguous");
  check_group_params(x, scales, offsets, qweight.size(0), group_size, type, op);
}

// int8_linear: x [..., K] (K > 0), qweight int8 [N, K] contiguous, group parameters [N, K/G] (check_group_params),
// K % G == 0 and G % 16 == 0 or G == K.
inline void check_int8_linear_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                   const c10::optional<at::Tensor>& offsets, int64_t group_size,
                                   c10::DeviceType type) {
  const char* op = "int8_linear";
  check_linear_x(x, qweight, type, op);
  const int64_t K = x.size(-1);
  TORCH_CHECK(K > 0, op, ": x's last dimension K (in_features) must be > 0");
  TORCH_CHECK(group_size > 0 && K % group_size == 0, op, ": group_size ", group_size,
              " must be > 0 and divide x's last dimension K = ", K);
  TORCH_CHECK(group_size % 16 == 0 || group_size == K, op, ": group_size must be a multiple of 16 or K = ", K,
              ", got ", group_size);
  TORCH_CHECK(qweight.scalar_type() == at::kChar, op, ": qweight must be int8, got ", qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) == K && qweight.is_contiguous(), op,
              ": qweight must be a contiguous [N, K] = [N, ", K, "] tensor for x's K, got ", qweight.sizes());
  check_group_params(x, scales, offsets, qweight.size(0), group_size, type, op);
}

}  // namespace tinychat
