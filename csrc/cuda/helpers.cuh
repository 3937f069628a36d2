// Helpers shared by the CUDA kernel files (csrc/cuda/*.cu), kept here once instead of copied into each.
//
// Host: check_sm80 (the compute-capability check of every CUDA op), kElementwiseThreads and grid_for (the launch
// shape of the grid-stride elementwise kernels of rope.cu and activation.cu), rows_aligned16 and aligned_rows16 (the
// inputs of kernels that load 16 bytes at a time).
// Device: from_float (fp32 -> the kernel's element type, round to nearest), kWarp and warp_sum (warp-shuffle sum),
// and the sm_80 PTX wrappers of the tensor-core kernels (attention.cu, int4_linear.cu): smem_addr, cp_async16,
// cp_async_commit, cp_async_wait, ldmatrix_x4, mma_m16n8k16.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace tinychat {

// ---- host: launch ----

// Raises unless the current device is sm_80 (Ampere) or newer. `op` names the op in the message.
inline void check_sm80(const char* op) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, op, ": the CUDA kernels need compute capability 8.0 (Ampere) or newer; ",
              prop->name, " is ", prop->major, ".", prop->minor);
}

constexpr int kElementwiseThreads = 256;  // threads per block of the grid-stride elementwise kernels

// Blocks for a grid-stride loop over n items with kElementwiseThreads threads each: enough for one item per thread,
// at most 32 blocks per SM, at least 1.
inline int grid_for(int64_t n) {
  const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>((n + kElementwiseThreads - 1) / kElementwiseThreads, max_blocks)));
}

// Whether t suits 16-byte vector loads of its rows: the data pointer 16-byte aligned, every stride but the last
// (of a dimension longer than 1) and the row length multiples of 16 bytes.
inline bool rows_aligned16(const at::Tensor& t) {
  const int64_t vec = 16 / static_cast<int64_t>(t.element_size());
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    if (t.size(i) > 1 && t.stride(i) % vec != 0) return false;
  return t.size(-1) % vec == 0;
}

// t itself when rows_aligned16(t), else a contiguous copy in a fresh allocation (the caching allocator's blocks are
// aligned far beyond 16 bytes). contiguous() alone is not enough: a contiguous view can start at any element.
inline at::Tensor aligned_rows16(const at::Tensor& t) {
  return rows_aligned16(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

// ---- device: conversions and reductions ----

// fp32 -> float / __half / __nv_bfloat16, round to nearest (torch builds with __CUDA_NO_HALF_CONVERSIONS__: the
// intrinsics, not the conversion operators).
template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

constexpr int kWarp = 32;

// Sum of v over the 32 lanes of the warp, returned to every lane.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ---- device: sm_80 PTX wrappers (cp.async, ldmatrix, mma.sync) ----

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-filled (nothing read) when !ok (src must still be a valid address).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(ok ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N of this thread's cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8 x 8 b16 matrices from shared memory (each lane addresses one row), one register of each per lane.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// c (16 x 8, fp32) += a (16 x 16) * b (16 x 8, registers b0, b1); T = __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "mma_m16n8k16: T must be __half or __nv_bfloat16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

}  // namespace tinychat
