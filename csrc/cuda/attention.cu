// CUDA kernels of attention (schema in csrc/ops.cpp): causal attention of T queries over the KV cache, optionally
// within a sliding window, out[b, t, h] = softmax_j(scale * q[b, t, h] . k[b, h / G, j % S], lo_t <= j <= p_t)
// @ v[b, h / G, j % S], G = H / Hkv, p_t = positions[t], lo_t = max(0, p_t - window + 1) (window 0: 0), S the cache
// rows (a ring when shorter than the positions: position j at row j % S).
//
// Positions are read on the device only (never on the host), so a decode step can be captured in a CUDA graph with
// positions in a static buffer; query t sees the positions of attention_plan.h's visible_range (at most S of them:
// the latest S where a query would see more), key i of them at row ring_row(first % S, i, S), keys in ascending
// position. The host picks a path from shapes alone:
//
// * split-KV ("flash-decoding"), for T <= kDecodeMaxT, for every T in float32, and as the fallback: the cache is cut
//   into `splits` chunks (decode_plan: from the allocated size S, never the runtime length, so the launch is
//   graph-stable); one block per (query token, kv head, chunk) serves every query head of the GQA group, so each
//   key/value row is loaded once for the group. Threads read 16-byte vectors of K and V straight from global
//   memory (a key row is spread over D / (16 / sizeof(T)) lanes, each warp takes a few keys at a time, several
//   keys unrolled per step to keep loads in flight) and keep an online softmax (running max, sum, fp32
//   accumulator) per lane group, merged over the block at the end. Blocks whose chunk starts past the query's last
//   visible key exit at once (a window's query: all but the first ceil(window / chunk) splits). A second kernel
//   combines the partials (skipped when there is one split).
// * prefill (fp16/bf16, T > kDecodeMaxT): FlashAttention-2 style on tensor cores. A block owns 64 query rows of one
//   head (4 warps x 16 rows); K/V tiles of 64 keys go to shared memory by cp.async, double buffered (Q, read into
//   registers at the first tile, shares stage 1's K slot: attention_plan.h, prefill_smem_bytes); S = Q K^T and
//   O += P V by mma.sync m16n8k16 with fp32 accumulators, operands by ldmatrix (.trans for V); online softmax in
//   registers, P reused from the S accumulators as the A operand. Tiles run over positions, from the smallest first
//   visible position among the block's rows to their largest position (each key loaded from its ring row): a warp
//   skips the math of tiles outside its rows' positions, and only tiles straddling a row's window are masked. Works
//   for a fresh prompt and for a chunk on top of an existing cache alike.
//
// Softmax runs in the log2 domain (scores scaled by scale * log2(e), exp2f). Head dims 64 and 128; any other head dim
// runs the same function by ATen ops on the device (attention_any_head_dim: correct, not tuned).

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <cstdint>
#include <type_traits>

#include "../common/attention_plan.h"
#include "../common/checks.h"
#include "helpers.cuh"

namespace tinychat {

namespace {

using namespace attn;

constexpr int kDecodeMaxT = 4;  // T up to this takes the split-KV path (fp16/bf16); larger T the tensor-core path
constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;

// ---- element types ----

template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// The 16 / sizeof(T) elements of a 16-byte vector, as floats.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& u, float* f) {
  if constexpr (std::is_same_v<T, float>) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  } else {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 p;
      if constexpr (std::is_same_v<T, __half>) {
        __half2 h;
        memcpy(&h, &w[i], 4);
        p = __half22float2(h);
      } else {
        __nv_bfloat162 h;
        memcpy(&h, &w[i], 4);
        p = __bfloat1622float2(h);
      }
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
}

// exp2(x - m) where m may be -inf (nothing seen yet): then every x is -inf as well and the result is 0.
__device__ __forceinline__ float safe_max_base(float m) { return m == -INFINITY ? 0.f : m; }

// ---- split-KV kernel (decode) ----

struct SplitParams {
  const void* q;  // [B, T, H, D], strides q_sb, q_st, q_sh (elements), last dim contiguous
  const void* k;  // [B, Hkv, S, D]
  const void* v;
  const int64_t* pos;  // [T]
  void* out;           // [B, T, H, D] contiguous: written directly when splits == 1
  float* part_acc;     // [B * T, H, splits, D]: unnormalized accumulators of each split
  float* part_ml;      // [B * T, H, splits, 2]: (max, sum) of each split, log2 domain
  int64_t q_sb, q_st, q_sh, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss;
  int64_t S, chunk, window;
  int T, H, Hkv, group, head_blocks, splits;
  float scale_log2;  // scale * log2(e)
};

// Grid (B * T, Hkv * head_blocks, splits), kDecodeThreads threads. GB: query heads per block.
template <typename T, int D, int GB>
__global__ void __launch_bounds__(kDecodeThreads) split_kv_kernel(const SplitParams p) {
  constexpr int VEC = 16 / sizeof(T);  // elements per 16-byte vector
  constexpr int LPK = D / VEC;         // lanes per key row
  static_assert(LPK >= 1 && LPK <= 32 && 32 % LPK == 0, "unsupported head dim for this dtype");
  constexpr int KPW = 32 / LPK;                      // keys a warp takes at once
  constexpr int NG = kDecodeWarps * KPW;             // lane groups in the block
  constexpr int U = (GB * VEC >= 64) ? 2 : 4;        // keys per lane group per step
  constexpr int STEP = NG * U;                       // keys per block per step

  const int row = blockIdx.x;  // b * T + t
  const int t = row % p.T;
  const int b = row / p.T;
  const int kvh = blockIdx.y / p.head_blocks;
  const int h0 = kvh * p.group + (blockIdx.y % p.head_blocks) * GB;  // first query head of this block
  const int h_end = min(h0 + GB, (kvh + 1) * p.group);
  const int split = blockIdx.z;

  const KeyRange range = visible_range(p.pos[t], p.window, p.S);  // keys i in [0, n): position range.first + i
  const int64_t n = range.count;
  const int64_t kb = split_begin(split, p.chunk);
  if (kb >= n) return;  // chunk past the last visible key (block-uniform exit)
  const int64_t ke = split_end(split, p.chunk, n);
  const int64_t row0 = cache_row(range.first, p.S);  // key i at cache row ring_row(row0, i, S)

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int lig = lane % LPK;                // lane in its group: elements [lig * VEC, lig * VEC + VEC)
  const int gid = warp * KPW + lane / LPK;   // lane group in the block

  // Queries (pre-scaled into the log2 domain); heads past the group's end get zeros and are never written.
  float qf[GB][VEC];
#pragma unroll
  for (int j = 0; j < GB; ++j) {
    if (h0 + j < h_end) {
      const T* qp = static_cast<const T*>(p.q) + b * p.q_sb + t * p.q_st + (h0 + j) * p.q_sh + lig * VEC;
      unpack16<T>(*reinterpret_cast<const uint4*>(qp), qf[j]);
#pragma unroll
      for (int e = 0; e < VEC; ++e) qf[j][e] *= p.scale_log2;
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) qf[j][e] = 0.f;
    }
  }

  const T* kbase = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh + lig * VEC;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh + lig * VEC;

  float m[GB], l[GB], acc[GB][VEC];
#pragma unroll
  for (int j = 0; j < GB; ++j) {
    m[j] = -INFINITY;
    l[j] = 0.f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[j][e] = 0.f;
  }

  // Warp-uniform trip count (the shuffles below need every lane); keys past ke are masked.
  for (int64_t base = kb; base < ke; base += STEP) {
    uint4 kr[U], vr[U];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t key = base + gid + u * NG;
      ok[u] = key < ke;
      if (ok[u]) {
        const int64_t crow = ring_row(row0, key, p.S);
        kr[u] = __ldg(reinterpret_cast<const uint4*>(kbase + crow * p.k_ss));
        vr[u] = __ldg(reinterpret_cast<const uint4*>(vbase + crow * p.v_ss));
      } else {
        kr[u] = make_uint4(0, 0, 0, 0);
        vr[u] = make_uint4(0, 0, 0, 0);
      }
    }
    float s[U][GB];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[VEC];
      unpack16<T>(kr[u], kf);
#pragma unroll
      for (int j = 0; j < GB; ++j) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) d = fmaf(qf[j][e], kf[e], d);
#pragma unroll
        for (int off = LPK / 2; off > 0; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
        s[u][j] = ok[u] ? d : -INFINITY;
      }
    }
    float vf[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) unpack16<T>(vr[u], vf[u]);
#pragma unroll
    for (int j = 0; j < GB; ++j) {
      float mx = m[j];
#pragma unroll
      for (int u = 0; u < U; ++u) mx = fmaxf(mx, s[u][j]);
      const float mb = safe_max_base(mx);
      const float corr = exp2f(m[j] - mb);
      m[j] = mx;
      l[j] *= corr;
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[j][e] *= corr;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float pr = exp2f(s[u][j] - mb);
        l[j] += pr;
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[j][e] = fmaf(pr, vf[u][e], acc[j][e]);
      }
    }
  }

  // Merge the lane groups of each warp (lanes differing in the bits above LPK).
#pragma unroll
  for (int off = LPK; off < 32; off <<= 1) {
#pragma unroll
    for (int j = 0; j < GB; ++j) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[j], off);
      const float lo = __shfl_xor_sync(0xffffffffu, l[j], off);
      const float mx = fmaxf(m[j], mo);
      const float mb = safe_max_base(mx);
      const float a = exp2f(m[j] - mb), c = exp2f(mo - mb);
      m[j] = mx;
      l[j] = l[j] * a + lo * c;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float ao = __shfl_xor_sync(0xffffffffu, acc[j][e], off);
        acc[j][e] = acc[j][e] * a + ao * c;
      }
    }
  }

  // Merge the warps through shared memory.
  __shared__ float sm_m[kDecodeWarps][GB], sm_l[kDecodeWarps][GB];
  __shared__ float sm_acc[kDecodeWarps][GB][D];
  if (lane < LPK) {
#pragma unroll
    for (int j = 0; j < GB; ++j) {
      if (lig == 0) {
        sm_m[warp][j] = m[j];
        sm_l[warp][j] = l[j];
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) sm_acc[warp][j][lig * VEC + e] = acc[j][e];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < GB * D; idx += kDecodeThreads) {
    const int j = idx / D, d = idx % D;
    const int h = h0 + j;
    if (h >= h_end) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, sm_m[w][j]);
    const float mb = safe_max_base(mx);
    float L = 0.f, A = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float c = exp2f(sm_m[w][j] - mb);
      L += sm_l[w][j] * c;
      A += sm_acc[w][j][d] * c;
    }
    const int64_t orow = static_cast<int64_t>(row) * p.H + h;  // (b * T + t) * H + h
    if (p.splits == 1) {
      static_cast<T*>(p.out)[orow * D + d] = from_float<T>(A / L);
    } else {
      const int64_t part = orow * p.splits + split;
      p.part_acc[part * D + d] = A;
      if (d == 0) {
        p.part_ml[part * 2] = mx;
        p.part_ml[part * 2 + 1] = L;
      }
    }
  }
}

// One block of D threads per (b * T + t, h): combines the active splits' partials.
template <typename T, int D>
__global__ void __launch_bounds__(D) combine_kernel(const SplitParams p) {
  const int64_t orow = blockIdx.x;  // (b * T + t) * H + h
  const int t = static_cast<int>((orow / p.H) % p.T);
  const int d = threadIdx.x;
  const int64_t active = decode_active_splits(visible_range(p.pos[t], p.window, p.S).count, p.chunk);
  const float* ml = p.part_ml + orow * p.splits * 2;
  const float* acc = p.part_acc + orow * p.splits * D;
  float mx = -INFINITY;
  for (int64_t s = 0; s < active; ++s) mx = fmaxf(mx, ml[2 * s]);
  const float mb = safe_max_base(mx);
  float L = 0.f, A = 0.f;
  for (int64_t s = 0; s < active; ++s) {
    const float c = exp2f(ml[2 * s] - mb);
    L += ml[2 * s + 1] * c;
    A += acc[s * D + d] * c;
  }
  static_cast<T*>(p.out)[orow * D + d] = from_float<T>(A / L);
}

template <typename T, int D, int GB>
void launch_split(const SplitParams& p, int rows, cudaStream_t stream) {
  const dim3 grid(rows, p.Hkv * p.head_blocks, p.splits);
  split_kv_kernel<T, D, GB><<<grid, kDecodeThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.splits > 1) {
    combine_kernel<T, D><<<static_cast<unsigned>(static_cast<int64_t>(rows) * p.H), D, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int D>
void dispatch_split(const SplitParams& p, int heads_per_block, int rows, cudaStream_t stream) {
  switch (heads_per_block) {
    case 1: return launch_split<T, D, 1>(p, rows, stream);
    case 2: return launch_split<T, D, 2>(p, rows, stream);
    case 4: return launch_split<T, D, 4>(p, rows, stream);
    default: return launch_split<T, D, 8>(p, rows, stream);
  }
}

// ---- tensor-core prefill kernel ----

struct PrefillParams {
  const void* q;  // [B, T, H, D], strides q_sb, q_st, q_sh
  const void* k;  // [B, Hkv, S, D]
  const void* v;
  const int64_t* pos;  // [T]
  void* out;           // [B, T, H, D] contiguous
  int64_t q_sb, q_st, q_sh, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss;
  int64_t S, window;
  int T, H, group;
  float scale_log2;
};

// cp.async, ldmatrix.x4 and mma.sync m16n8k16 wrappers: helpers.cuh. The transposed ldmatrix (V as the B operand)
// is this file's alone.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(lo, hi);
    memcpy(&r, &h, 4);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    memcpy(&r, &h, 4);
  }
  return r;
}

// Grid (ceil(T / 64), H, B), 128 threads.
template <typename T, int D>
__global__ void __launch_bounds__(kPrefillWarps * 32) prefill_kernel(const PrefillParams p) {
  static_assert(D % 16 == 0 && D <= 256, "head dim");
  constexpr int NT_S = kPrefillKeys / 8;  // n-tiles of the score accumulator per warp (8 keys each)
  constexpr int NT_O = D / 8;             // n-tiles of the output accumulator
  constexpr int KS_Q = D / 16;            // k-steps of Q K^T
  constexpr int KS_P = kPrefillKeys / 16; // k-steps of P V
  constexpr int CHUNKS = D / 8;           // 16-byte chunks per row
  constexpr int LD = D + kSmemPad;        // shared-memory row length (elements)
  constexpr int kThreads = kPrefillWarps * 32;

  // Shared memory (prefill_smem_bytes): K and V tiles of stages 0 and 1, Q in stage 1's K slot until tile 0 is read.
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const smem = reinterpret_cast<T*>(smem_raw);
  T* const sQ = smem + prefill_q_row() * LD;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int t0 = blockIdx.x * kPrefillRows;
  const int h = blockIdx.y, b = blockIdx.z;
  const int kvh = h / p.group;

  // Visible positions [first, last] of this thread's two accumulator rows (lane / 4 and lane / 4 + 8 of its warp's
  // 16); a row past T sees none (first > last, neutral in the reductions below).
  constexpr long long kNone = INT64_MAX;
  const int tr0 = t0 + warp * 16 + (lane >> 2), tr1 = tr0 + 8;
  long long first0 = kNone, last0 = -kNone, first1 = kNone, last1 = -kNone;
  if (tr0 < p.T) {
    const KeyRange r = visible_range(p.pos[tr0], p.window, p.S);
    first0 = r.first, last0 = r.first + r.count - 1;
  }
  if (tr1 < p.T) {
    const KeyRange r = visible_range(p.pos[tr1], p.window, p.S);
    first1 = r.first, last1 = r.first + r.count - 1;
  }
  // Over the warp's valid rows: the span of their positions (tile skipping) and the positions all of them see
  // (mask-free tiles: [wfirst_max, wlast_min]); then the block's span (tiles to load).
  long long wfirst_min = min(first0, first1), wlast_max = max(last0, last1);
  long long wfirst_max = max(tr0 < p.T ? first0 : -kNone, tr1 < p.T ? first1 : -kNone);
  long long wlast_min = min(tr0 < p.T ? last0 : kNone, tr1 < p.T ? last1 : kNone);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    wfirst_min = min(wfirst_min, __shfl_xor_sync(0xffffffffu, wfirst_min, off));
    wlast_max = max(wlast_max, __shfl_xor_sync(0xffffffffu, wlast_max, off));
    wfirst_max = max(wfirst_max, __shfl_xor_sync(0xffffffffu, wfirst_max, off));
    wlast_min = min(wlast_min, __shfl_xor_sync(0xffffffffu, wlast_min, off));
  }
  __shared__ long long sm_first[kPrefillWarps], sm_last[kPrefillWarps];
  if (lane == 0) {
    sm_first[warp] = wfirst_min;
    sm_last[warp] = wlast_max;
  }
  __syncthreads();
  long long bfirst = kNone, blast = -kNone;
#pragma unroll
  for (int w = 0; w < kPrefillWarps; ++w) {
    bfirst = min(bfirst, sm_first[w]);
    blast = max(blast, sm_last[w]);
  }
  const int n_tiles = static_cast<int>(prefill_key_tiles(bfirst, blast));  // >= 1: row t0 is valid
  const int64_t brow0 = cache_row(bfirst, p.S);  // the cache row of position bfirst

  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;

  // Q tile (rows past T zero-filled).
  for (int c = tid; c < kPrefillRows * CHUNKS; c += kThreads) {
    const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
    const bool ok = t0 + r < p.T;
    cp_async16(sQ + smem_offset(r, col, D), ok ? qg + (t0 + r) * p.q_st + col : qg, ok);
  }
  // K/V tile `tile` (positions bfirst + 64 tile ..) into stage `st`; positions past blast zero-filled (never reading
  // unwritten cache rows, whose contents could be NaN and would poison P V through 0 * NaN). A block's span of
  // positions exceeds S only where its rows' windows lie apart (scattered positions): a row then sees no position
  // twice, as each row sees at most S.
  auto load_kv = [&](int tile, int st) {
    T* dk = smem + prefill_k_row(st) * LD;
    T* dv = smem + prefill_v_row(st) * LD;
    for (int c = tid; c < kPrefillKeys * CHUNKS; c += kThreads) {
      const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
      const int64_t key = static_cast<int64_t>(tile) * kPrefillKeys + r;  // position bfirst + key
      const bool ok = key <= blast - bfirst;
      const int64_t crow = ok ? cache_row(brow0 + key, p.S) : 0;
      cp_async16(dk + smem_offset(r, col, D), kg + crow * p.k_ss + col, ok);
      cp_async16(dv + smem_offset(r, col, D), vg + crow * p.v_ss + col, ok);
    }
  };
  load_kv(0, 0);
  cp_async_commit();

  uint32_t qa[KS_Q][4];
  float o[NT_O][4];
#pragma unroll
  for (int i = 0; i < NT_O; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows lane/4 and lane/4 + 8 (l: this lane's part)

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int st = tile & 1;
    if (tile == 0) {
      cp_async_wait<0>();  // Q and tile 0
      __syncthreads();
#pragma unroll
      for (int ks = 0; ks < KS_Q; ++ks)
        ldmatrix_x4(qa[ks], sQ + smem_offset(warp * 16 + ldsm_a_row(lane), ks * 16 + ldsm_a_col(lane), D));
      __syncthreads();  // every warp holds Q in registers: stage 1 (Q's slot) is free for tile 1
      if (n_tiles > 1) {
        load_kv(1, 1);
        cp_async_commit();
      }
    } else {
      if (tile + 1 < n_tiles) {
        load_kv(tile + 1, st ^ 1);  // its stage was last read in iteration tile - 1, before the closing barrier
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
    }
    const int64_t tile_first = bfirst + static_cast<int64_t>(tile) * kPrefillKeys;  // its first position
    if (!prefill_warp_skips_tile(tile_first, wfirst_min, wlast_max)) {
      const T* tk = smem + prefill_k_row(st) * LD;
      const T* tv = smem + prefill_v_row(st) * LD;
      float s[NT_S][4];
#pragma unroll
      for (int i = 0; i < NT_S; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < KS_Q; ++ks) {
#pragma unroll
        for (int np = 0; np < NT_S / 2; ++np) {
          uint32_t kb[4];
          ldmatrix_x4(kb, tk + smem_offset(np * 16 + ldsm_k_row(lane), ks * 16 + ldsm_k_col(lane), D));
          mma_m16n8k16<T>(s[2 * np], qa[ks], kb[0], kb[1]);
          mma_m16n8k16<T>(s[2 * np + 1], qa[ks], kb[2], kb[3]);
        }
      }
      const bool mask = prefill_tile_needs_mask(tile_first, wfirst_max, wlast_min);
      float mx0 = m0, mx1 = m1;
#pragma unroll
      for (int i = 0; i < NT_S; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[i][e] * p.scale_log2;
          if (mask) {
            const int64_t key = tile_first + i * 8 + mma_c_col(lane, e);  // its position
            if (e < 2 ? (key < first0 || key > last0) : (key < first1 || key > last1)) x = -INFINITY;
          }
          s[i][e] = x;
        }
        mx0 = fmaxf(mx0, fmaxf(s[i][0], s[i][1]));
        mx1 = fmaxf(mx1, fmaxf(s[i][2], s[i][3]));
      }
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {  // the 4 lanes holding a row
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
      }
      const float mb0 = safe_max_base(mx0), mb1 = safe_max_base(mx1);
      const float c0 = exp2f(m0 - mb0), c1 = exp2f(m1 - mb1);
      m0 = mx0;
      m1 = mx1;
      l0 *= c0;
      l1 *= c1;
#pragma unroll
      for (int i = 0; i < NT_O; ++i) {
        o[i][0] *= c0;
        o[i][1] *= c0;
        o[i][2] *= c1;
        o[i][3] *= c1;
      }
#pragma unroll
      for (int i = 0; i < NT_S; ++i) {
        s[i][0] = exp2f(s[i][0] - mb0);
        s[i][1] = exp2f(s[i][1] - mb0);
        s[i][2] = exp2f(s[i][2] - mb1);
        s[i][3] = exp2f(s[i][3] - mb1);
        l0 += s[i][0] + s[i][1];
        l1 += s[i][2] + s[i][3];
      }
      // O += P V: the accumulators of score n-tiles 2kk and 2kk + 1 are the A operand of key slice kk.
#pragma unroll
      for (int kk = 0; kk < KS_P; ++kk) {
        uint32_t pa[4];
        pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
        pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
        pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < NT_O / 2; ++dp) {
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, tv + smem_offset(kk * 16 + ldsm_v_row(lane), dp * 16 + ldsm_v_col(lane), D));
          mma_m16n8k16<T>(o[2 * dp], pa, vb[0], vb[1]);
          mma_m16n8k16<T>(o[2 * dp + 1], pa, vb[2], vb[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with stage st before the next iteration refills it
  }

#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  // One 4-byte store per pair of columns (col is even and out is contiguous: every pair is 4-byte aligned).
  T* out = static_cast<T*>(p.out);
  const int col = 2 * (lane & 3);
  if (tr0 < p.T) {
    const float inv = 1.f / l0;
    T* orow = out + ((static_cast<int64_t>(b) * p.T + tr0) * p.H + h) * D + col;
#pragma unroll
    for (int i = 0; i < NT_O; ++i) {
      *reinterpret_cast<uint32_t*>(orow + i * 8) = pack2<T>(o[i][0] * inv, o[i][1] * inv);
    }
  }
  if (tr1 < p.T) {
    const float inv = 1.f / l1;
    T* orow = out + ((static_cast<int64_t>(b) * p.T + tr1) * p.H + h) * D + col;
#pragma unroll
    for (int i = 0; i < NT_O; ++i) {
      *reinterpret_cast<uint32_t*>(orow + i * 8) = pack2<T>(o[i][2] * inv, o[i][3] * inv);
    }
  }
}

template <typename T, int D>
void launch_prefill(const PrefillParams& p, int B, cudaStream_t stream) {
  const int smem = prefill_smem_bytes(D);
  auto kernel = prefill_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.T + kPrefillRows - 1) / kPrefillRows, p.H, B);
  kernel<<<grid, kPrefillWarps * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- host ----

// Head dims without a tuned kernel (not 64 or 128; Gemma 3's 256, a test model's 16): the same function by ATen ops on
// the device, in fp32, rounded once to q's dtype. Positions stay on the device (no host sync: graph-safe). By rows, as
// tinychat.ops.attention_ref: for query t, row r holds position p_t - ((p_t - r) mod S), visible when in the window
// (visible_range: a negative position counts as 0; at most the latest S positions). Cache rows no query sees are
// zeroed before P V, as the kernels never read them (they may hold NaN).
at::Tensor attention_any_head_dim(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& positions, double scale, int64_t window) {
  const int64_t H = q.size(2), Hkv = k.size(1), S = k.size(2);
  const at::Tensor last = positions.clamp_min(0).unsqueeze(1);                    // [T, 1]
  const at::Tensor rows = at::arange(S, positions.options()).unsqueeze(0);        // [1, S]
  const at::Tensor held = last - at::remainder(last - rows, S);                   // [T, S]: the position at row r
  const at::Tensor visible = window > 0 ? held >= last - (window - 1) : held >= 0;  // [T, S]
  const at::Tensor unread = visible.any(0).logical_not().view({1, 1, S, 1});      // [1, 1, S, 1]
  const at::Tensor qf = q.transpose(1, 2).to(at::kFloat);                         // [B, H, T, D]
  const at::Tensor kf = k.to(at::kFloat).masked_fill(unread, 0).repeat_interleave(H / Hkv, 1);  // [B, H, S, D]
  const at::Tensor vf = v.to(at::kFloat).masked_fill(unread, 0).repeat_interleave(H / Hkv, 1);  // [B, H, S, D]
  const at::Tensor scores = at::matmul(qf, kf.transpose(-1, -2)).mul_(scale).masked_fill_(
      visible.logical_not(), -std::numeric_limits<float>::infinity());           // [B, H, T, S]
  return at::matmul(at::softmax(scores, -1), vf).transpose(1, 2).to(q.scalar_type()).contiguous();  // [B, T, H, D]
}

at::Tensor attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                          const at::Tensor& positions, double scale, int64_t window) {
  check_attention_args(q_in, k_in, v_in, positions, window, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(q_in.device());
  check_sm80("attention");
  const int64_t B = q_in.size(0), T = q_in.size(1), H = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = k_in.size(1), S = k_in.size(2);
  TORCH_CHECK(std::isfinite(scale), "attention: scale must be finite, got ", scale);
  if (D != 64 && D != 128) return attention_any_head_dim(q_in, k_in, v_in, positions, scale, window);
  TORCH_CHECK(S <= INT32_MAX / 2 && B * T <= INT32_MAX && H <= 65535 && B <= 65535,
              "attention: shapes too large for the CUDA kernels: q ", q_in.sizes(), ", caches ", k_in.sizes());
  at::Tensor out = at::empty({B, T, H, D}, q_in.options());
  if (out.numel() == 0) return out;
  // Misaligned views (never the model's own tensors) are copied to aligned buffers rather than refused.
  const at::Tensor q = aligned_rows16(q_in);
  const at::Tensor k = aligned_rows16(k_in);
  const at::Tensor v = aligned_rows16(v_in);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto dtype = q.scalar_type();
  const int group = static_cast<int>(H / Hkv);

  if (T > kDecodeMaxT && dtype != at::kFloat) {
    TORCH_CHECK((T + kPrefillRows - 1) / kPrefillRows <= INT32_MAX, "attention: T too large: ", T);
    PrefillParams p{};
    p.q = q.const_data_ptr();
    p.k = k.const_data_ptr();
    p.v = v.const_data_ptr();
    p.pos = positions.const_data_ptr<int64_t>();
    p.out = out.data_ptr();
    p.q_sb = q.stride(0), p.q_st = q.stride(1), p.q_sh = q.stride(2);
    p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_ss = k.stride(2);
    p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_ss = v.stride(2);
    p.T = static_cast<int>(T), p.H = static_cast<int>(H), p.group = group, p.S = S, p.window = window;
    p.scale_log2 = static_cast<float>(scale) * kLog2e;
    if (dtype == at::kHalf) {
      D == 64 ? launch_prefill<__half, 64>(p, B, stream) : launch_prefill<__half, 128>(p, B, stream);
    } else {
      D == 64 ? launch_prefill<__nv_bfloat16, 64>(p, B, stream) : launch_prefill<__nv_bfloat16, 128>(p, B, stream);
    }
    return out;
  }

  const int rows = static_cast<int>(B * T);
  const DecodePlan plan = decode_plan(rows, Hkv, group, S, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  TORCH_CHECK(Hkv * plan.head_blocks <= 65535, "attention: too many kv heads for the CUDA kernels: ", Hkv);
  SplitParams p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.pos = positions.const_data_ptr<int64_t>();
  p.out = out.data_ptr();
  at::Tensor part_acc, part_ml;
  if (plan.splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    part_acc = at::empty({rows * H * plan.splits * D}, f32);
    part_ml = at::empty({rows * H * plan.splits * 2}, f32);
    p.part_acc = part_acc.data_ptr<float>();
    p.part_ml = part_ml.data_ptr<float>();
  }
  p.q_sb = q.stride(0), p.q_st = q.stride(1), p.q_sh = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_ss = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_ss = v.stride(2);
  p.S = S, p.chunk = plan.chunk, p.window = window;
  p.T = static_cast<int>(T), p.H = static_cast<int>(H), p.Hkv = static_cast<int>(Hkv), p.group = group;
  p.head_blocks = plan.head_blocks, p.splits = plan.splits;
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  const int hpb = plan.heads_per_block;
  if (dtype == at::kHalf) {
    D == 64 ? dispatch_split<__half, 64>(p, hpb, rows, stream) : dispatch_split<__half, 128>(p, hpb, rows, stream);
  } else if (dtype == at::kBFloat16) {
    D == 64 ? dispatch_split<__nv_bfloat16, 64>(p, hpb, rows, stream)
            : dispatch_split<__nv_bfloat16, 128>(p, hpb, rows, stream);
  } else {
    D == 64 ? dispatch_split<float, 64>(p, hpb, rows, stream) : dispatch_split<float, 128>(p, hpb, rows, stream);
  }
  return out;
}

}  // namespace
}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CUDA, m) {
  m.impl("attention", &tinychat::attention_cuda);
}
