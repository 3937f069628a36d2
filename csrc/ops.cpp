// The tinychat op registry: every schema of torch.ops.tinychat lives here.
// Kernels register themselves per device (csrc/cpu/*.cpp, csrc/cuda/*.cu) with
// TORCH_LIBRARY_IMPL; loading the shared object (`import tinychat._C`) registers everything.

#include <Python.h>
#include <torch/library.h>

#include "cpu/decode_step.h"
#include "cpu/isa.h"

TORCH_LIBRARY(tinychat, m) {
  // out = x * rsqrt(mean(x^2, -1) + eps) * weight, in fp32, cast once to x.dtype.
  // x [..., H] (last dim contiguous), weight [H] (x.dtype). Returns a new contiguous tensor.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // r = (x + residual) rounded to x.dtype; returns (rms_norm(r, weight, eps), r).
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  // Rotary embedding of q and k fused with the KV-cache write, in one pass over the fused q/k/v projection.
  // qkv [B, T, H + 2 Hkv, D] (last dim contiguous; heads q | k | v); positions int64 [T]: token t is rotated by
  // cos_sin[positions[t]] (fp32 [max_pos, D] = [cos | sin], rotate-half as GPT-NeoX / Hugging Face Llama) and its
  // key and value land at row positions[t] % S of k_cache, v_cache [B, Hkv, S, D] (contiguous, qkv's dtype), which
  // are written in place: row p for a cache longer than every position, a ring for a shorter one (a sliding-window
  // layer's). Returns the rotated queries, a new contiguous [B, T, H, D] tensor. Positions must lie in
  // [0, max_pos): the CPU kernel raises otherwise; CUDA kernels never sync to check (they skip such rows).
  m.def("rope_kv_write(Tensor qkv, Tensor positions, Tensor cos_sin, Tensor(a!) k_cache, Tensor(b!) v_cache) -> Tensor");
  // Causal attention of T queries over the KV cache, optionally within a sliding window: query t at position
  // p_t = positions[t] attends to the positions max(0, p_t - window + 1) .. p_t (window 0: 0 .. p_t), reading
  // position j at cache row j % S (S = the caches' rows). A cache longer than every position is the plain one (row j
  // = position j); a shorter one is a ring, which the caller keeps at S >= window + T - 1 rows (positions ascending
  // within a call) so that no position a query sees was overwritten by a later one of the same call. Keys are
  // summed in ascending position (a ring's: two contiguous runs of rows). Scores scaled by `scale`, softmax in fp32,
  // result cast once to q.dtype. Grouped-query attention: query head h reads kv head h / (H / Hkv). q [B, T, H, D];
  // k_cache, v_cache [B, Hkv, S, D] (last dim contiguous, q's dtype); positions int64 [T], >= 0; window >= 0.
  // The CPU kernel raises where a query would see more positions than the cache has rows (window 0: a position
  // >= S); the CUDA kernels never sync to check. Returns a new contiguous [B, T, H, D] tensor.
  // T = 1 is the decode step; T > 1 is a prefill, or a chunk of one on top of an existing cache.
  m.def("attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor positions, float scale, int window=0) -> Tensor");
  // silu(x[..., :I]) * x[..., I:] (the gated MLP's activation on the fused gate|up projection), fp32 math, cast
  // once to x.dtype. x [..., 2I] (last dim contiguous). Returns a new contiguous [..., I] tensor.
  m.def("silu_and_mul(Tensor x) -> Tensor");
  // gelu_tanh(x[..., :I]) * x[..., I:] (Gemma's gated MLP: GELU with the tanh approximation, as
  // torch.nn.functional.gelu(approximate="tanh")), fp32 math, cast once to x.dtype. x [..., 2I] (last dim
  // contiguous). Returns a new contiguous [..., I] tensor.
  m.def("gelu_tanh_and_mul(Tensor x) -> Tensor");
  // y = x @ W.T with 4-bit weights in groups of G input channels, fp32 accumulation, cast once to x.dtype.
  // x [..., K] (fp32/bf16/fp16, any strides; K % 32 == 0); qweight uint8 [N, K/2] in blocks of 32 input channels
  // (byte j of block b: low nibble = channel 32b + j, high nibble = channel 32b + 16 + j); scales [N, K/G] fp32 or
  // fp16; offsets [N, K/G] of the scales' dtype, or None. W[n, k] = q[n, k] * s + m with s, m the group's scale and
  // offset widened to fp32 (m = -8 s without offsets: ggml's Q4_0); G % 32 == 0, K % G == 0. Or scales uint8
  // [N, K/256, 20], ggml's K-quant superblocks (csrc/common/kquant.h: s = d * sc, m = -(dmin * mn)), G = 32, no
  // offsets.
  // Layout: tinychat/int4_layout.py. Returns a new contiguous [..., N] tensor.
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, int group_size) -> Tensor");
  // y = x @ W.T with 8-bit weights in groups of G input channels, fp32 accumulation, cast once to x.dtype.
  // x [..., K] (fp32/bf16/fp16, any strides); qweight int8 [N, K] contiguous; scales [N, K/G] fp32 or fp16; offsets
  // [N, K/G] of the scales' dtype, or None (or K-quant superblocks, as int4_linear). W[n, k] = q[n, k] * s + m
  // (m = 0 without offsets); K % G == 0 and
  // G % 16 == 0 or G == K (one scale per row). Returns a new contiguous [..., N] tensor. Runs GGUF's 5-, 6- and 8-bit
  // blocks (tinychat/int4_layout.py) and the CPU backend's int8 output projection (tinychat/linear.py).
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, int group_size) -> Tensor");
  // The instruction set the CPU kernels use: the best this CPU has ("avx512", "avx2", "scalar"), or the lower
  // one the environment variable TINYCHAT_CPU_ISA names.
  m.def("cpu_isa() -> str", &tinychat::cpu_isa_name);
  // The whole decoder in one call on the CPU (csrc/cpu/decode_step.h): built once per KV cache from the model's
  // tensors (a flat list, described by spec), forward(x, positions, cos_sin, cos_sin_local, last_only) -> logits.
  m.class_<tinychat::CpuDecoder>("CpuDecoder")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, double, double>())
      .def("forward", &tinychat::CpuDecoder::forward);
}

// A Python module with no functions: importing it loads the library above. Its one attribute,
// WITH_CUDA (0 or 1), says whether the CUDA kernels were built.
static struct PyModuleDef tinychat_module = {
    PyModuleDef_HEAD_INIT,
    "tinychat._C",
    "tinychat's compiled kernels, registered as torch.ops.tinychat.*",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&tinychat_module);
#ifdef TINYCHAT_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
