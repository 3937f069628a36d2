// Pieces of the CPU kernels of the quantized linears (int4_linear.cpp, int8_linear.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/kquant.h"
#include "isa.h"
#include "vec.h"

namespace tinychat {

// The group parameters of int4_linear / int8_linear (csrc/common/checks.h): scales [N, K/G] fp32 or fp16, offsets of
// the same dtype or none, read as stored (fp16 widened exactly; the GEMVs take a row at a time, row_params).
// W = q * s + m; without offsets m = default_offset * s (int4_linear: -8, ggml's Q4_0; int8_linear: 0). Or K-quant
// superblocks (kquant.h): s and m formed per group from the superblock's fp16 d, dmin and 6-bit sc, mn, exactly.
struct GroupParams {
  enum class Kind { kFloat, kHalf, kSuper };
  const void* scales;
  const void* offsets;  // nullptr: m = default_offset * s (or the superblock's min)
  Kind kind;
  float default_offset;

  TINYCHAT_INLINE float load(const void* base, int64_t i) const {
    return kind == Kind::kHalf ? static_cast<float>(static_cast<const at::Half*>(base)[i])
                               : static_cast<const float*>(base)[i];
  }
  // the superblock of flat group index i, and the fp16 at byte `at` of it
  TINYCHAT_INLINE const uint8_t* super(int64_t i) const {
    return static_cast<const uint8_t*>(scales) + (i / kq::kSuperGroups) * kq::kSuperBytes;
  }
  static TINYCHAT_INLINE float half_at(const uint8_t* p) {
    at::Half h;
    std::memcpy(&h, p, sizeof(h));
    return static_cast<float>(h);
  }
  TINYCHAT_INLINE float scale(int64_t i) const {
    if (kind != Kind::kSuper) return load(scales, i);
    const uint8_t* sb = super(i);
    return half_at(sb) * static_cast<float>(sb[kq::kScaleAt + i % kq::kSuperGroups]);
  }
  // whether any group may have a nonzero offset (else the offset term of int8_linear is 0)
  bool has_offsets() const { return offsets != nullptr || kind == Kind::kSuper || default_offset != 0.f; }
  TINYCHAT_INLINE float offset(int64_t i) const {
    if (kind == Kind::kSuper) {
      const uint8_t* sb = super(i);
      return -(half_at(sb + kq::kDminAt) * static_cast<float>(sb[kq::kMinAt + i % kq::kSuperGroups]));
    }
    return offsets == nullptr ? default_offset * scale(i) : load(offsets, i);
  }
};

// Row n's group parameters as fp32 arrays [ng]: pointers into the tensors where they are fp32 (no copy), else into a
// caller's buffer of 2 ng floats (fp16 widened 8 or 16 at a time, superblocks decoded, m = default_offset * s without
// offsets). Kernels then read plain floats, once per row, whatever the form.
struct RowParams {
  const float* s;
  const float* m;
};

inline GroupParams group_params(const at::Tensor& scales, const c10::optional<at::Tensor>& offsets,
                                float default_offset) {
  const auto dt = scales.scalar_type();
  const auto kind = dt == at::kByte ? GroupParams::Kind::kSuper
                    : dt == at::kHalf ? GroupParams::Kind::kHalf : GroupParams::Kind::kFloat;
  return {scales.const_data_ptr(), offsets.has_value() ? offsets->const_data_ptr() : nullptr, kind, default_offset};
}

// The sum of x fp32 [M, K] (rows contiguous) over each group of G channels -> [M, K/G]: the offset term's factor
// (a plain loop: cheaper than a torch op at decode sizes).
inline std::vector<float> group_sums(const float* x, int64_t M, int64_t K, int64_t G) {
  std::vector<float> sums(M * (K / G));
  for (size_t i = 0; i < sums.size(); ++i) {
    const float* xg = x + i * G;
    float s = 0.f;
    for (int64_t k = 0; k < G; ++k) s += xg[k];
    sums[i] = s;
  }
  return sums;
}

inline RowParams row_params(const GroupParams& w, int64_t n, int64_t ng, float* buf, Isa isa) {
  const int64_t first = n * ng;
  const bool fp32 = w.kind == GroupParams::Kind::kFloat;
  const float* s = fp32 ? static_cast<const float*>(w.scales) + first : buf;
  if (fp32 && w.offsets != nullptr) return {s, static_cast<const float*>(w.offsets) + first};
  float* m = buf + ng;
  if (w.kind == GroupParams::Kind::kHalf) {
    widen_halves(static_cast<const at::Half*>(w.scales) + first, buf, ng, isa);
    if (w.offsets != nullptr) widen_halves(static_cast<const at::Half*>(w.offsets) + first, m, ng, isa);
  } else if (w.kind == GroupParams::Kind::kSuper) {
    for (int64_t g = 0; g < ng; ++g) buf[g] = w.scale(first + g);
    for (int64_t g = 0; g < ng; ++g) m[g] = w.offset(first + g);  // the superblock's min
  }
  if (w.offsets == nullptr && w.kind != GroupParams::Kind::kSuper) {
    for (int64_t g = 0; g < ng; ++g) m[g] = w.default_offset * s[g];
  }
  return {s, m};
}

// The GEMV driver both ops share: rows of W split over threads; each row's group parameters widened to fp32 once
// (row_params), then the row runs against every chunk of max_mb rows of x (the row from cache after the first).
// row_fn(isa, mb) is the op's kernel for mb rows of x: kernel(p, n, m0, s, m). P: the op's problem (x, W, y, sizes,
// group parameters w).
template <typename P, typename RowFn>
void run_rows(const P& p, Isa isa, int64_t max_mb, RowFn (*row_fn)(Isa, int)) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (p.K * p.M));
  const RowFn full = row_fn(isa, static_cast<int>(std::min(max_mb, p.M)));
  const RowFn tail = row_fn(isa, static_cast<int>(p.M % max_mb == 0 ? max_mb : p.M % max_mb));
  at::parallel_for(0, p.N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(2 * p.ng);  // [2, K/G]: a row's parameters when they must be widened
    for (int64_t n = begin; n < end; ++n) {
      const RowParams rp = row_params(p.w, n, p.ng, buf.data(), isa);
      for (int64_t m0 = 0; m0 < p.M; m0 += max_mb) (p.M - m0 >= max_mb ? full : tail)(p, n, m0, rp.s, rp.m);
    }
  });
}

// From this many rows of x on, int8_linear (the lm head, whose rows are never reused piecewise) dequantizes W and
// uses torch's GEMM.
constexpr int64_t kGemmMinRows = 16;

// x [..., K] as fp32 rows [M, K], rows contiguous (no copy for a contiguous fp32 x): small next to the weights.
inline at::Tensor float_rows(const at::Tensor& x) { return x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous(); }

// The shape of y for x [..., K] and N outputs: [..., N].
inline std::vector<int64_t> linear_out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

// y2d [M, N] = x2d [M, K] @ W.T (fp32): W dequantized to fp32 a chunk of rows at a time, in parallel, by
// dequant(n0, rows, w) writing rows n0 .. n0+rows of W into w [rows, K]; each chunk multiplied with torch's GEMM
// (oneDNN / MKL), whose blocking no hand-written loop here would beat; the dequantization is amortized over M rows.
template <typename Dequant>
void dequantized_gemm(const at::Tensor& x2d, at::Tensor& y2d, int64_t N, const Dequant& dequant) {
  constexpr int64_t kChunkBytes = 8 << 20;  // fp32 weights dequantized at a time
  const int64_t M = x2d.size(0), K = x2d.size(1);
  const int64_t chunk = std::max<int64_t>(16, std::min<int64_t>(N, kChunkBytes / (4 * K)));
  at::Tensor w = at::empty({chunk, K}, x2d.options());  // fp32 [chunk, K]
  at::Tensor part = at::empty({M, chunk}, x2d.options());
  float* wp = w.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t rows = std::min(chunk, N - n0);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) { dequant(n0 + begin, end - begin, wp + begin * K); });
    at::Tensor out_rows = part.narrow(1, 0, rows);
    at::mm_out(out_rows, x2d, w.narrow(0, 0, rows).t());
    y2d.narrow(1, n0, rows).copy_(out_rows);
  }
}

}  // namespace tinychat
