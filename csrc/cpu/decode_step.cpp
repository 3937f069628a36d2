// CpuDecoder (decode_step.h): the decoder's forward in one C++ call, the CPU kernels called directly (kernels.h).
// It mirrors tinychat/model.py's Transformer.forward op for op; tests/test_decode_step.py holds the two equal.

#include "decode_step.h"

#include <utility>

#include "kernels.h"

namespace tinychat {

at::Tensor DecoderLinear::operator()(const at::Tensor& x) const {
  if (bits == 0) return at::linear(x, weight, bias);
  at::Tensor y = bits == 4 ? int4_linear_cpu(x, weight, scales, offsets, group_size)
                           : int8_linear_cpu(x, weight, scales, offsets, group_size);
  return bias.has_value() ? y + *bias : y;
}

namespace {

// Reads the linears and layers of the constructor's flat lists in order, checking that they are all there.
class Reader {
 public:
  Reader(std::vector<at::Tensor> tensors, std::vector<int64_t> spec)
      : tensors_(std::move(tensors)), spec_(std::move(spec)) {}

  at::Tensor tensor() {
    TORCH_CHECK(t_ < tensors_.size(), "CpuDecoder: fewer tensors than the spec describes (", tensors_.size(), ")");
    return tensors_[t_++];
  }
  int64_t number() {
    TORCH_CHECK(s_ < spec_.size(), "CpuDecoder: the spec is too short (", spec_.size(), " numbers)");
    return spec_[s_++];
  }
  DecoderLinear linear() {
    DecoderLinear l;
    l.bits = number();
    TORCH_CHECK(l.bits == 0 || l.bits == 4 || l.bits == 8, "CpuDecoder: a linear's bits must be 0, 4 or 8, got ",
                l.bits);
    l.group_size = number();
    const bool has_offsets = number() != 0, has_bias = number() != 0;
    l.weight = tensor();
    TORCH_CHECK(l.weight.device().is_cpu(), "CpuDecoder: every tensor must be on the CPU");
    if (l.bits != 0) l.scales = tensor();
    TORCH_CHECK(l.bits != 0 || !has_offsets, "CpuDecoder: a float linear has no offsets");
    if (has_offsets) l.offsets = tensor();
    if (has_bias) l.bias = tensor();
    return l;
  }
  void check_done() const {
    TORCH_CHECK(t_ == tensors_.size() && s_ == spec_.size(), "CpuDecoder: ", tensors_.size() - t_, " tensors and ",
                spec_.size() - s_, " spec numbers left over");
  }

 private:
  std::vector<at::Tensor> tensors_;
  std::vector<int64_t> spec_;
  size_t t_ = 0, s_ = 0;
};

}  // namespace

CpuDecoder::CpuDecoder(std::vector<at::Tensor> tensors, std::vector<int64_t> spec, double eps, double scale)
    : eps_(eps), scale_(scale) {
  Reader r(std::move(tensors), std::move(spec));
  const int64_t n_layers = r.number();
  heads_ = r.number();
  kv_heads_ = r.number();
  head_dim_ = r.number();
  TORCH_CHECK(n_layers >= 0 && heads_ > 0 && kv_heads_ > 0 && head_dim_ > 0,
              "CpuDecoder: layers, heads, kv heads and head dim must be positive");
  const int64_t act = r.number();
  TORCH_CHECK(act == 0 || act == 1, "CpuDecoder: the activation must be 0 (silu) or 1 (GELU-tanh), got ", act);
  gelu_ = act == 1;
  const bool qk_norm = r.number() != 0, post_norms = r.number() != 0;
  norm_ = r.tensor();
  for (int64_t i = 0; i < n_layers; ++i) {
    DecoderLayerTensors l;
    l.window = r.number();
    TORCH_CHECK(l.window >= 0, "CpuDecoder: a layer's window must be >= 0, got ", l.window);
    l.local_rope = r.number() != 0;
    l.attn_norm = r.tensor();
    l.mlp_norm = r.tensor();
    if (post_norms) {
      l.post_attn_norm = r.tensor();
      l.post_mlp_norm = r.tensor();
    }
    if (qk_norm) {
      l.q_norm = r.tensor();
      l.k_norm = r.tensor();
    }
    l.k_cache = r.tensor();
    l.v_cache = r.tensor();
    l.wqkv = r.linear();
    l.wo = r.linear();
    l.w13 = r.linear();
    l.w2 = r.linear();
    layers_.push_back(std::move(l));
  }
  head_ = r.linear();
  r.check_done();
}

at::Tensor CpuDecoder::forward(const at::Tensor& x_in, const at::Tensor& positions, const at::Tensor& cos_sin,
                               const c10::optional<at::Tensor>& cos_sin_local, bool last_only) {
  TORCH_CHECK(x_in.dim() == 3 && x_in.device().is_cpu(), "CpuDecoder: x must be a CPU tensor [B, T, C], got ",
              x_in.sizes());
  const int64_t B = x_in.size(0), T = x_in.size(1);
  const int64_t H = heads_, Hkv = kv_heads_, D = head_dim_;
  at::Tensor x = x_in, residual;
  for (auto& l : layers_) {
    if (!residual.defined()) {
      residual = x;
      x = rms_norm_cpu(x, l.attn_norm, eps_);
    } else {
      std::tie(x, residual) = add_rms_norm_cpu(x, residual, l.attn_norm, eps_);
    }
    at::Tensor qkv = l.wqkv(x).view({B, T, H + 2 * Hkv, D});
    if (l.q_norm.defined()) {
      const auto parts = qkv.split_with_sizes({H, Hkv, Hkv}, 2);  // q | k | v [B, T, *, D]
      qkv = at::cat({rms_norm_cpu(parts[0], l.q_norm, eps_), rms_norm_cpu(parts[1], l.k_norm, eps_), parts[2]}, 2);
    }
    TORCH_CHECK(!l.local_rope || cos_sin_local.has_value(), "CpuDecoder: a layer needs cos_sin_local");
    const at::Tensor& table = l.local_rope ? *cos_sin_local : cos_sin;
    const at::Tensor q = rope_kv_write_cpu(qkv, positions, table, l.k_cache, l.v_cache);    // [B, T, H, D]
    const at::Tensor y = attention_cpu(q, l.k_cache, l.v_cache, positions, scale_, l.window);  // [B, T, H, D]
    x = l.wo(y.view({B, T, H * D}));
    if (l.post_attn_norm.defined()) x = rms_norm_cpu(x, l.post_attn_norm, eps_);
    std::tie(x, residual) = add_rms_norm_cpu(x, residual, l.mlp_norm, eps_);
    const at::Tensor h = l.w13(x);  // [B, T, 2I] = gate | up
    x = l.w2(gelu_ ? gelu_tanh_and_mul_cpu(h) : silu_and_mul_cpu(h));
    if (l.post_mlp_norm.defined()) x = rms_norm_cpu(x, l.post_mlp_norm, eps_);
  }
  x = residual.defined() ? std::get<0>(add_rms_norm_cpu(x, residual, norm_, eps_)) : rms_norm_cpu(x, norm_, eps_);
  if (last_only) x = x.narrow(1, T - 1, 1);
  return head_(x);
}

}  // namespace tinychat
