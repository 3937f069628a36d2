// CpuDecoder: the whole decoder in one call on the CPU (registered in csrc/ops.cpp; used by tinychat/model.py).
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <vector>

namespace tinychat {

// One decoder linear as the model stores it: float weights (at::linear, bits 0) or a 4- or 8-bit group form
// (int4_linear / int8_linear), and an optional bias added after, as tinychat/linear.py's modules do.
struct DecoderLinear {
  int64_t bits;                       // 0, 4 or 8
  at::Tensor weight;                  // float [N, K], or the codes: uint8 [N, K/2] (4) or int8 [N, K] (8)
  at::Tensor scales;                  // [N, K/G] (or K-quant superblocks); undefined for bits 0
  c10::optional<at::Tensor> offsets;  // [N, K/G] or none
  int64_t group_size;
  c10::optional<at::Tensor> bias;     // [N] or none

  at::Tensor operator()(const at::Tensor& x) const;  // x [..., K] -> [..., N]
};

struct DecoderLayerTensors {
  at::Tensor attn_norm, mlp_norm;            // [C]
  at::Tensor post_attn_norm, post_mlp_norm;  // [C]: the attention's and MLP's output norms (Gemma 3), or undefined
  at::Tensor q_norm, k_norm;                 // [D]: each query and key head's norm (Qwen3, Gemma 3), or undefined
  at::Tensor k_cache, v_cache;               // [B, Hkv, S, D], written in place (a ring where S < the context)
  int64_t window;                            // the sliding window; 0: every position
  bool local_rope;                           // rotary table: forward's cos_sin_local, else cos_sin
  DecoderLinear wqkv, wo, w13, w2;
};

// Built once per KV cache from the model's own tensors (no copy). forward(x, positions, cos_sin, last_only) runs
// what Transformer.forward runs after the embedding, op for op with the same kernels in the same order (so the
// logits are the same bit for bit), without Python or the dispatcher between the ops.
//
// tensors: the final norm [C], then per layer attn_norm, mlp_norm, post_attn_norm and post_mlp_norm (with post
// norms), q_norm and k_norm (with q/k norms), k_cache, v_cache and the tensors of wqkv, wo, w13, w2 in turn, then
// those of the output projection; a linear's tensors are its weight, then its scales (bits 4 or 8), offsets and
// bias where it has them. spec: layers, heads, kv heads, head dim, the activation (0 silu, 1 GELU-tanh), whether
// layers have q/k norms and post norms, then per layer its window and whether it uses the local rotary table,
// and per linear in the same order its bits, group size, whether it has offsets and a bias.
class CpuDecoder : public torch::CustomClassHolder {
 public:
  CpuDecoder(std::vector<at::Tensor> tensors, std::vector<int64_t> spec, double eps, double scale);

  // x [B, T, C] (the embedded tokens), positions int64 [T], cos_sin fp32 [max_pos, D] (and cos_sin_local, the
  // sliding layers' where they have their own) -> logits [B, T, V] ([B, 1, V] with last_only)
  at::Tensor forward(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& cos_sin,
                     const c10::optional<at::Tensor>& cos_sin_local, bool last_only);

 private:
  std::vector<DecoderLayerTensors> layers_;
  at::Tensor norm_;
  DecoderLinear head_;
  int64_t heads_, kv_heads_, head_dim_;
  bool gelu_;
  double eps_, scale_;
};

}  // namespace tinychat
