// The tinychat op registry: every schema of torch.ops.tinychat lives here.
// Kernels register themselves per device (csrc/cpu/*.cpp, csrc/cuda/*.cu) with
// TORCH_LIBRARY_IMPL; loading the shared object (`import tinychat._C`) registers everything.

#include <Python.h>
#include <torch/library.h>

#include "cpu/isa.h"

TORCH_LIBRARY(tinychat, m) {
  // out = x * rsqrt(mean(x^2, -1) + eps) * weight, in fp32, cast once to x.dtype.
  // x [..., H] (last dim contiguous), weight [H] (x.dtype). Returns a new contiguous tensor.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // r = (x + residual) rounded to x.dtype; returns (rms_norm(r, weight, eps), r).
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  // Rotate-half (GPT-NeoX / Hugging Face Llama) rotary embedding.
  // x [B, T, nH, D] (last dim contiguous, any strides on dims 0-2), positions int64 [B, T] or [T],
  // cos_sin fp32 [max_pos, D] = [cos | sin]. Returns a new contiguous [B, T, nH, D] tensor.
  m.def("rotary_embedding(Tensor x, Tensor positions, Tensor cos_sin) -> Tensor");
  // y = x @ W.T with 4-bit weights, fp32 accumulation, cast once to x.dtype.
  // x [..., K] (fp32/bf16/fp16, any strides; K % 32 == 0); qweight uint8 [N, K/2] in blocks of 32 input channels
  // (byte j of block b: low nibble = channel 32b + j, high nibble = channel 32b + 16 + j); scales, zeros fp32
  // [N, K/G]; W[n, k] = (q[n, k] - zeros[n, k/G]) * scales[n, k/G]; G % 32 == 0, K % G == 0.
  // Layout: tinychat/quant/pack.py. Returns a new contiguous [..., N] tensor.
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor");
  // Attention of one new query per sequence over the KV cache (decode), softmax in fp32, cast once to q.dtype.
  // q [B, H, D]; k_cache, v_cache [B, Hkv, S, D] (H % Hkv == 0: query head h reads kv head h / (H / Hkv));
  // attends to cache positions 0..length-1 (1 <= length <= S); scores scaled by `scale`. Returns [B, H, D].
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, int length, float scale) -> Tensor");
  // The instruction set the CPU kernels use: the best this CPU has ("avx512", "avx2", "scalar"), or the lower
  // one the environment variable TINYCHAT_CPU_ISA names.
  m.def("cpu_isa() -> str", &tinychat::cpu_isa_name);
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
