// CPU kernels of int4_linear (schema in csrc/ops.cpp; weight layout in tinychat/int4_layout.py).
//
// y[m, n] = sum_k x[m, k] * W[n, k], W[n, k] = q[n, k] * s + m with s, m the scale and offset of group (n, k/G)
// (fp32 or fp16 as stored, widened exactly; m = -8 s without offsets), fp32 math, each output rounded to x's dtype
// once.
//
// Layout: qweight uint8 [N, K/2] in blocks of 32 input channels; byte j (0..15) of block b holds channel 32b + j in
// its low nibble and channel 32b + 16 + j in its high nibble. One 16-byte load thus gives 32 weights as two
// contiguous runs of 16 (mask, shift), which widen straight to fp32 lanes with no shuffle.
//
// One GEMV-style kernel over rows of W for every M (decode and prefill alike; on AVX-512 VNNI a GEMM past kExactRows
// rows of x, below): per row and group it accumulates
// sum_k q[k] * x[m, k] in SIMD registers for up to kMaxMB rows of x at once, then applies the group's scale; the
// offset term m * sum_{k in g} x[m, k] uses per-group sums of x computed once per call. Each weight byte is read
// from memory once per kMaxMB rows of x; x stays in L1. On the fp32 paths each output row is computed the same way
// whatever M is (batch-invariant), so a prompt prefilled in parts gives the logits of one whole prefill (VNNI rounds
// x by M: see there). (A dequantize + torch GEMM path for M >= 16 was faster only from about 256 rows on, and broke
// that invariance: measured on an EPYC, 2 threads, SmolLM2's MLP, the kernel took 0.61 / 2.39 / 7.61 ms at
// M = 16 / 64 / 256 against 1.16 / 2.17 / 7.60 for the GEMM (AVX-512; AVX2 0.63 / 2.88 / 12.09 against 2.54 / 5.07 /
// 10.45).)
//
// Instruction sets: AVX-512 with VNNI (x rounded to int8 by M: up to 8 rows of x and 2 or 4 rows of W a pass in
// the GEMV, tiles of 6 rows of x by 32 rows of W in the GEMM; see "AVX-512 VNNI" below), AVX-512 (F/BW/VL/DQ),
// AVX2 + FMA, and portable C++ (which the compiler vectorizes as it can; NEON on ARM through that path), picked at
// run time (isa.h).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/checks.h"
#include "isa.h"
#include "kernels.h"
#include "linear.h"
#include "vec.h"
#include "vnni_gemv.h"

namespace tinychat {

namespace {

constexpr int64_t kBlock = 32;            // input channels per 16 bytes of qweight
constexpr int kMaxMB = 4;                 // rows of x a GEMV pass handles together
constexpr int64_t kFineRows = vnni::kMaxMBVnni;  // the VNNI GEMV (two int8 levels) takes calls of up to this many
                                                 // rows of x
constexpr int kGemmLevels = 1;   // the VNNI GEMM past kExactRows rows rounds x at one level
constexpr int64_t kExactRows = 64;  // and fp32 x (the AVX-512 kernels) runs calls of up to this many

// The problem, as raw pointers. x fp32 [M, K] (rows contiguous); xsum fp32 [M, K/G] (sum of x over each group).
struct Problem {
  const float* x;
  const float* xsum;
  const uint8_t* q;       // [N, K/2]
  GroupParams w;          // scales, offsets [N, K/G]
  float* y;               // fp32 [M, N]
  int64_t M, N, K, G;
  int64_t ng;                 // K / G
  const vnni::Int8Activations* xq;  // the VNNI GEMM's x, rounded to int8 (else nullptr)
};

// ---- portable path ----

// y[m, n] for MB rows of x from m0, one row n of W.
template <int MB>
void gemv_row_scalar(const Problem& p, int64_t n, int64_t m0, const float* sw, const float* mw) {
  const uint8_t* qrow = p.q + n * (p.K / 2);
  const int64_t ng = p.ng;
  float acc[MB] = {};
  for (int64_t g = 0; g < ng; ++g) {
    float gacc[MB] = {};
    for (int64_t b = g * p.G; b < (g + 1) * p.G; b += kBlock) {
      const uint8_t* qb = qrow + b / 2;
      #pragma GCC unroll 8  // keep the MB accumulators in registers
      for (int mb = 0; mb < MB; ++mb) {
        const float* xb = p.x + (m0 + mb) * p.K + b;
        float s = 0.f;
        for (int j = 0; j < 16; ++j) {
          s += static_cast<float>(qb[j] & 0xF) * xb[j] + static_cast<float>(qb[j] >> 4) * xb[16 + j];
        }
        gacc[mb] += s;
      }
    }
    const float sc = sw[g], off = mw[g];
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) acc[mb] += sc * gacc[mb] + off * p.xsum[(m0 + mb) * ng + g];
  }
  #pragma GCC unroll 8  // keep the MB accumulators in registers
  for (int mb = 0; mb < MB; ++mb) p.y[(m0 + mb) * p.N + n] = acc[mb];
}

#ifdef TINYCHAT_X86

// ---- AVX2 + FMA ----

template <int MB>
TINYCHAT_AVX2 void gemv_row_avx2(const Problem& p, int64_t n, int64_t m0, const float* sw, const float* mw) {
  const uint8_t* qrow = p.q + n * (p.K / 2);
  const int64_t ng = p.ng;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m256 acc[MB];
  #pragma GCC unroll 8  // keep the MB accumulators in registers
  for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm256_setzero_ps();
  float off_term[MB] = {};  // the offset terms
  for (int64_t g = 0; g < ng; ++g) {
    __m256 gacc[MB];
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) gacc[mb] = _mm256_setzero_ps();
    for (int64_t b = g * p.G; b < (g + 1) * p.G; b += kBlock) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + b / 2));
      const __m128i lo = _mm_and_si128(bytes, low4);                       // channels b .. b+15
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);    // channels b+16 .. b+31
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
      const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
      const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
      #pragma GCC unroll 8  // keep the MB accumulators in registers
      for (int mb = 0; mb < MB; ++mb) {
        const float* xb = p.x + (m0 + mb) * p.K + b;
        gacc[mb] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), gacc[mb]);
        gacc[mb] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), gacc[mb]);
        gacc[mb] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), gacc[mb]);
        gacc[mb] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), gacc[mb]);
      }
    }
    const float sc = sw[g], off = mw[g];
    const __m256 vs = _mm256_set1_ps(sc);
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) {
      acc[mb] = _mm256_fmadd_ps(vs, gacc[mb], acc[mb]);
      off_term[mb] += off * p.xsum[(m0 + mb) * ng + g];
    }
  }
  #pragma GCC unroll 8  // keep the MB accumulators in registers
  for (int mb = 0; mb < MB; ++mb) p.y[(m0 + mb) * p.N + n] = hsum_avx2(acc[mb]) + off_term[mb];
}

// ---- AVX-512 ----

// gcc 12's AVX-512 intrinsics start from _mm512_undefined_*() and trip its own uninitialized-value warnings
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

template <int MB>
TINYCHAT_AVX512 void gemv_row_avx512(const Problem& p, int64_t n, int64_t m0, const float* sw, const float* mw) {
  const uint8_t* qrow = p.q + n * (p.K / 2);
  const int64_t ng = p.ng;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  __m512 acc[MB];
  #pragma GCC unroll 8  // keep the MB accumulators in registers
  for (int mb = 0; mb < MB; ++mb) acc[mb] = _mm512_setzero_ps();
  float off_term[MB] = {};  // the offset terms
  for (int64_t g = 0; g < ng; ++g) {
    __m512 gacc[MB];
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) gacc[mb] = _mm512_setzero_ps();
    for (int64_t b = g * p.G; b < (g + 1) * p.G; b += kBlock) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + b / 2));
      const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, low4)));
      const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4)));
      #pragma GCC unroll 8  // keep the MB accumulators in registers
      for (int mb = 0; mb < MB; ++mb) {
        const float* xb = p.x + (m0 + mb) * p.K + b;
        gacc[mb] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), gacc[mb]);
        gacc[mb] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), gacc[mb]);
      }
    }
    const float sc = sw[g], off = mw[g];
    const __m512 vs = _mm512_set1_ps(sc);
    #pragma GCC unroll 8  // keep the MB accumulators in registers
    for (int mb = 0; mb < MB; ++mb) {
      acc[mb] = _mm512_fmadd_ps(vs, gacc[mb], acc[mb]);
      off_term[mb] += off * p.xsum[(m0 + mb) * ng + g];
    }
  }
  #pragma GCC unroll 8  // keep the MB accumulators in registers
  for (int mb = 0; mb < MB; ++mb) p.y[(m0 + mb) * p.N + n] = _mm512_reduce_add_ps(acc[mb]) + off_term[mb];
}

#pragma GCC diagnostic pop

#endif  // TINYCHAT_X86

// ---- AVX-512 VNNI: int8 activations (vnni_gemv.h) ----
//
// How x is rounded depends on the rows of x in the call (the same for every row of a call):
// - up to kFineRows (decode steps): at two int8 levels (Int8Activations), step = s / 256: 1/256 of llama.cpp's
//   error at 1.1-1.3x the cost of one level here, and still faster than fp32 x. A sampled answer meets this error at
//   every token it decodes, and drifts from the file's own answer with it.
// - up to kExactRows (a chat turn's prompt): not at all, the AVX-512 kernels with fp32 x (1.4x one level's cost):
//   what a short prompt leaves in the KV cache is the file's own, at a cost of milliseconds.
// - more (a long prompt, where prefill speed is what users wait for): at one level, step = s, as llama.cpp, in the
//   GEMM below.

#ifdef TINYCHAT_X86
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// ---- AVX-512 VNNI GEMM (prefill: more than kExactRows rows of x) ----
//
// The GEMV (vnni_gemv.h) puts 128 channels of one row of W in a vector's lanes, so each of its vpdpbusd is followed
// by a conversion, a scale product and an FMA per 8 channels of a lane (three float instructions per two vpdpbusd:
// the vector units' bound at prefill). Here the lanes are 16 rows of W instead: lane i holds 4 bytes of row n + i (8
// weights: the low nibbles are channels 4q..4q+3 of a block, the high nibbles 16 + 4q..), and x's matching 4 int8
// codes are broadcast to every lane, so 8 vpdpbusd sum a whole block of 32 channels exactly in each lane's int32, and
// the float work (conversion, scale product, FMA) comes once per block: a fourth of the GEMV's. A thread copies
// a panel of kPanelRows rows of W into that order (a transpose of 4-byte words: the layout in memory stays the one
// every kernel reads) and their group parameters as fp32, then runs the panel against all of x, kGemmRowsX rows at a
// time. Per output, the arithmetic is the same whichever tile it lies in (batch-invariant, like the GEMV).

constexpr int kGemmVecs = 2;                      // vectors of 16 rows of W in a tile
constexpr int64_t kPanelRows = 16 * kGemmVecs;    // rows of W a panel holds
constexpr int kGemmRowsX = 6;                     // rows of x in a tile (2 x 6 int32 and 2 x 6 fp32 accumulators)

// A panel: rows n0 .. n0 + kPanelRows - 1 of W (rows past N are zeros), words[d * kPanelRows + r] = 4-byte word d
// of row n0 + r (word d = block d / 4's bytes 4 (d % 4) .. + 3); s, m [K/G, kPanelRows]: the rows' group parameters.
struct Panel {
  std::vector<uint32_t> words;
  std::vector<float> s, m;
  std::vector<float> buf;  // [2, K/G]: a row's parameters when widened
};

void pack_panel(const Problem& p, int64_t n0, Panel& panel) {
  const int64_t nwords = p.K / 8, rows = std::min(kPanelRows, p.N - n0);
  panel.words.assign(nwords * kPanelRows, 0u);
  panel.s.assign(p.ng * kPanelRows, 0.f);
  panel.m.assign(p.ng * kPanelRows, 0.f);
  panel.buf.resize(2 * p.ng);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = p.q + (n0 + r) * (p.K / 2);
    for (int64_t d = 0; d < nwords; ++d) std::memcpy(&panel.words[d * kPanelRows + r], row + 4 * d, 4);
    const RowParams rp = row_params(p.w, n0 + r, p.ng, panel.buf.data(), Isa::kAvx512Vnni);
    for (int64_t g = 0; g < p.ng; ++g) {
      panel.s[g * kPanelRows + r] = rp.s[g];
      panel.m[g * kPanelRows + r] = rp.m[g];
    }
  }
}

// Rows m0 .. m0 + MB - 1 of x against the panel of rows n0.. into y.
template <int MB>
TINYCHAT_AVX512_VNNI void gemm_tile(const Problem& p, const Panel& panel, int64_t n0, int64_t m0) {
  constexpr int NV = kGemmVecs;
  constexpr int64_t NR = kPanelRows, row_bytes = kGemmLevels * 2 * vnni::kChunkBytes;  // a row of x in a chunk
  static_assert(kBlock == vnni::kBlock, "a block of qweight is a block of x's int8 scales");
  const vnni::Int8Activations& a = *p.xq;
  const int64_t blocks = p.K / kBlock, blocks_per_group = p.G / kBlock;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 facc[NV][MB];
  #pragma GCC unroll 8
  for (int mb = 0; mb < MB; ++mb) {
    #pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) facc[v][mb] = _mm512_setzero_ps();
  }
  const uint32_t* wb = panel.words.data();
  for (int64_t b = 0, g = 0, in_group = 0; b < blocks; ++b, wb += 4 * NR) {
    // block b of row m0 + mb of x: its codes at xb + mb * row_bytes (16 "lo", then 16 "hi" kChunkBytes further) and
    // its scale at xs[mb * 16]
    const int64_t at = ((b / 4) * p.M + m0);
    const int8_t* xb = a.q8.data() + at * row_bytes + (b % 4) * 16;
    const float* xs = a.lane_scales.data() + at * 16 + (b % 4) * 4;
    __m512i iacc[NV][MB];
    #pragma GCC unroll 8
    for (int mb = 0; mb < MB; ++mb) {
      #pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) iacc[v][mb] = _mm512_setzero_si512();
    }
    #pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      __m512i lo[NV], hi[NV];
      #pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __m512i w = _mm512_loadu_si512(wb + q * NR + v * 16);
        lo[v] = _mm512_and_si512(w, low4);
        hi[v] = _mm512_and_si512(_mm512_srli_epi16(w, 4), low4);
      }
      #pragma GCC unroll 8
      for (int mb = 0; mb < MB; ++mb) {
        int32_t xl, xh;
        std::memcpy(&xl, xb + mb * row_bytes + 4 * q, 4);
        std::memcpy(&xh, xb + mb * row_bytes + vnni::kChunkBytes + 4 * q, 4);
        const __m512i xlv = _mm512_set1_epi32(xl), xhv = _mm512_set1_epi32(xh);
        #pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) {
          iacc[v][mb] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(iacc[v][mb], lo[v], xlv), hi[v], xhv);
        }
      }
    }
    __m512 ws[NV];
    #pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) ws[v] = _mm512_loadu_ps(panel.s.data() + g * NR + v * 16);
    #pragma GCC unroll 8
    for (int mb = 0; mb < MB; ++mb) {
      const __m512 xsv = _mm512_set1_ps(xs[mb * 16]);
      #pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        facc[v][mb] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[v][mb]), _mm512_mul_ps(ws[v], xsv), facc[v][mb]);
      }
    }
    if (++in_group == blocks_per_group) {
      in_group = 0;
      ++g;
    }
  }
  // the offset terms m * sum(x) over the groups
  for (int64_t g = 0; g < p.ng; ++g) {
    #pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512 mv = _mm512_loadu_ps(panel.m.data() + g * NR + v * 16);
      #pragma GCC unroll 8
      for (int mb = 0; mb < MB; ++mb) {
        facc[v][mb] = _mm512_fmadd_ps(mv, _mm512_set1_ps(a.group_sums[(m0 + mb) * p.ng + g]), facc[v][mb]);
      }
    }
  }
  #pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t n = n0 + v * 16, left = p.N - n;
    if (left <= 0) break;
    const __mmask16 live = left >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << left) - 1);
    #pragma GCC unroll 8
    for (int mb = 0; mb < MB; ++mb) _mm512_mask_storeu_ps(p.y + (m0 + mb) * p.N + n, live, facc[v][mb]);
  }
}

using GemmTileFn = void (*)(const Problem&, const Panel&, int64_t, int64_t);

GemmTileFn gemm_tile_fn(int64_t mb) {
  static_assert(kGemmRowsX == 6, "gemm_tile_fn instantiates MB = 1..6");
  switch (mb) {
    case 1: return gemm_tile<1>;
    case 2: return gemm_tile<2>;
    case 3: return gemm_tile<3>;
    case 4: return gemm_tile<4>;
    case 5: return gemm_tile<5>;
    default: return gemm_tile<6>;
  }
}

// The GEMM's driver: panels of W split over threads, each against every tile of kGemmRowsX rows of x.
void run_vnni_gemm(const Problem& p) {
  const int64_t panels = (p.N + kPanelRows - 1) / kPanelRows, tail_mb = p.M % kGemmRowsX;
  const GemmTileFn full = gemm_tile_fn(kGemmRowsX), tail = gemm_tile_fn(tail_mb);
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    Panel panel;
    for (int64_t i = begin; i < end; ++i) {
      pack_panel(p, i * kPanelRows, panel);
      for (int64_t m0 = 0; m0 < p.M; m0 += kGemmRowsX) {
        (p.M - m0 >= kGemmRowsX ? full : tail)(p, panel, i * kPanelRows, m0);
      }
    }
  });
}

#pragma GCC diagnostic pop
#endif  // TINYCHAT_X86

// ---- dispatch ----

using GemvRowFn = void (*)(const Problem&, int64_t, int64_t, const float*, const float*);

// The GEMV kernel for `isa` and MB rows of x.
template <int MB>
GemvRowFn gemv_row_for(Isa isa) {
#ifdef TINYCHAT_X86
  if (isa >= Isa::kAvx512) return gemv_row_avx512<MB>;
  if (isa == Isa::kAvx2) return gemv_row_avx2<MB>;
#endif
  return gemv_row_scalar<MB>;
}

// The fp32 paths' GEMV kernel for `isa` and mb rows of x (the VNNI path has its own driver, run_vnni).
GemvRowFn gemv_row_fn(Isa isa, int mb) {
  static_assert(kMaxMB == 4, "gemv_row_fn instantiates MB = 1..4");
  switch (mb) {
    case 1: return gemv_row_for<1>(isa);
    case 2: return gemv_row_for<2>(isa);
    case 3: return gemv_row_for<3>(isa);
    default: return gemv_row_for<4>(isa);
  }
}

}  // namespace

at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& offsets, int64_t group_size) {
  check_int4_linear_args(x, qweight, scales, offsets, group_size, c10::DeviceType::CPU);
  const Isa isa = current_isa();
  const int64_t K = x.size(-1);
  const int64_t N = qweight.size(0);
  const std::vector<int64_t> out_shape = linear_out_shape(x, N);
  if (x.numel() == 0 || N == 0) return at::zeros(out_shape, x.options());
  const at::Tensor xf = float_rows(x);  // [M, K]
  const int64_t M = xf.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());  // fp32 [M, N]
  Problem p{xf.const_data_ptr<float>(), nullptr, qweight.const_data_ptr<uint8_t>(), group_params(scales, offsets, -8.f),
            y.data_ptr<float>(), M, N, K, group_size, K / group_size, nullptr};
#ifdef TINYCHAT_X86
  if (isa == Isa::kAvx512Vnni && M > kExactRows) {
    const vnni::Int8Activations xq = vnni::quantize_activations(p.x, M, K, group_size, kGemmLevels);
    p.xq = &xq;
    run_vnni_gemm(p);
    return y.to(x.scalar_type()).view(out_shape);
  }
#endif
  const bool int8_gemv = vnni::vnni_supports(group_size) && M <= kFineRows;
  const Isa gemv_isa = isa == Isa::kAvx512Vnni && !int8_gemv ? Isa::kAvx512 : isa;
#ifdef TINYCHAT_X86
  if (gemv_isa == Isa::kAvx512Vnni) {
    vnni::vnni_gemv<vnni::Nibbles>(p.x, p.q, K / 2, p.w, p.y, M, N, K, group_size);
    return y.to(x.scalar_type()).view(out_shape);
  }
#endif
  const std::vector<float> xsum = group_sums(p.x, M, K, group_size);  // [M, K/G], the offset term's factor
  p.xsum = xsum.data();
  run_rows(p, gemv_isa, kMaxMB, gemv_row_fn);
  return y.to(x.scalar_type()).view(out_shape);
}

}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CPU, m) {
  m.impl("int4_linear", &tinychat::int4_linear_cpu);
}
