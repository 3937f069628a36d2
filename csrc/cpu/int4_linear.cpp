// CPU kernel of int4_linear (schema in csrc/ops.cpp; weight layout in tinychat/quant/pack.py).
//
// y[m, n] = sum_k x[m, k] * W[n, k], W[n, k] = (q[n, k] - zeros[n, k/G]) * scales[n, k/G], all in fp32,
// each output rounded to x's dtype once.
//
// Output channels are split over threads with at::parallel_for in tiles of kTileN weight rows. A thread
// dequantizes one tile to an fp32 buffer (K floats a row, in L1/L2), then computes the tile's kTileN dot products
// with every row of x, so each weight byte is read once whatever M is. The dot products keep kLanes independent
// partial sums per row: plain indexed loops that gcc auto-vectorizes at -O3 without -ffast-math. Simple on
// purpose; SIMD kernels for the decode (M = 1) and prefill shapes replace it later.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/checks.h"

namespace tinychat {

namespace {

constexpr int kLanes = 8;         // partial sums per dot product (one AVX2 register of fp32)
constexpr int64_t kTileN = 4;     // weight rows dequantized and multiplied together

// Every argument of int4_linear; shared by any device's launcher (pass its device type).
void check_int4_linear_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                            const at::Tensor& zeros, int64_t group_size, c10::DeviceType type) {
  const char* op = "int4_linear";
  check_device(x, x, type, op, "x");
  check_device(qweight, x, type, op, "qweight");
  check_device(scales, x, type, op, "scales");
  check_device(zeros, x, type, op, "zeros");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape [..., K], got a 0-dim tensor");
  const int64_t K = x.size(-1);
  TORCH_CHECK(K > 0 && K % 2 == 0, op, ": x's last dimension K (in_features) must be even and > 0, got ", K);
  TORCH_CHECK(group_size > 0, op, ": group_size must be > 0, got ", group_size);
  TORCH_CHECK(K % group_size == 0, op, ": group_size ", group_size, " must divide x's last dimension K = ", K);
  TORCH_CHECK(qweight.scalar_type() == at::kByte, op,
              ": qweight must be uint8 (two 4-bit weights per byte), got ", qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2 && qweight.size(1) * 2 == K, op, ": qweight must have shape [N, K/2] = [N, ",
              K / 2, "] for x's K = ", K, ", got ", qweight.sizes());
  TORCH_CHECK(qweight.is_contiguous(), op, ": qweight must be contiguous");
  const int64_t N = qweight.size(0);
  const int64_t n_groups = K / group_size;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"scales", scales},
                                std::pair<const char*, const at::Tensor&>{"zeros", zeros}}) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == n_groups, op, ": ", name,
                " must have shape [N, K/group_size] = [", N, ", ", n_groups, "], got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  }
}

// Rows n0..n0+rows of W in fp32 into w (rows x K, contiguous).
inline void dequantize_rows(const uint8_t* qweight, const float* scales, const float* zeros, int64_t n0,
                            int64_t rows, int64_t K, int64_t G, float* w) {
  const int64_t n_groups = K / G;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* qr = qweight + (n0 + r) * (K / 2);
    float* wr = w + r * K;
    for (int64_t j = 0; j < K / 2; ++j) {
      wr[2 * j] = static_cast<float>(qr[j] & 0xF);
      wr[2 * j + 1] = static_cast<float>(qr[j] >> 4);
    }
    const float* s = scales + (n0 + r) * n_groups;
    const float* z = zeros + (n0 + r) * n_groups;
    for (int64_t g = 0; g < n_groups; ++g) {
      const float sg = s[g], zg = z[g];
      float* wg = wr + g * G;
      for (int64_t i = 0; i < G; ++i) wg[i] = (wg[i] - zg) * sg;
    }
  }
}

// out[r] = dot(x, w + r * K) for the R (<= kTileN) rows of a tile.
template <int R>
inline void dot_rows(const float* x, const float* w, int64_t K, float* out) {
  float acc[R][kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int r = 0; r < R; ++r) {
      const float* wr = w + r * K + k;
      for (int l = 0; l < kLanes; ++l) acc[r][l] += x[k + l] * wr[l];
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = 0.f;
    for (int64_t i = k; i < K; ++i) s += x[i] * w[r * K + i];
    for (int l = 0; l < kLanes; ++l) s += acc[r][l];
    out[r] = s;
  }
}

template <typename scalar_t>
void int4_linear_rows(const float* x, const uint8_t* qweight, const float* scales, const float* zeros,
                      scalar_t* out, int64_t M, int64_t N, int64_t K, int64_t G) {
  const int64_t n_tiles = (N + kTileN - 1) / kTileN;
  const int64_t work_per_tile = kTileN * K * (M + 1);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / work_per_tile);
  at::parallel_for(0, n_tiles, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(kTileN * K);
    float* w = buf.data();
    float y[kTileN];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * kTileN;
      const int64_t rows = std::min(kTileN, N - n0);
      dequantize_rows(qweight, scales, zeros, n0, rows, K, G, w);
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = x + m * K;
        if (rows == kTileN) {
          dot_rows<kTileN>(xm, w, K, y);
        } else {
          for (int64_t r = 0; r < rows; ++r) dot_rows<1>(xm, w + r * K, K, y + r);
        }
        scalar_t* om = out + m * N + n0;
        for (int64_t r = 0; r < rows; ++r) om[r] = static_cast<scalar_t>(y[r]);
      }
    }
  });
}

at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t group_size) {
  check_int4_linear_args(x, qweight, scales, zeros, group_size, c10::DeviceType::CPU);
  const int64_t K = x.size(-1);
  const int64_t N = qweight.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, x.options());
  if (out.numel() == 0) return out;
  // x in fp32, rows contiguous (no copy for a contiguous fp32 x): M x K floats, small next to the weights.
  const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "tinychat_int4_linear_cpu", [&] {
    int4_linear_rows<scalar_t>(xf.const_data_ptr<float>(), qweight.const_data_ptr<uint8_t>(),
                               scales.const_data_ptr<float>(), zeros.const_data_ptr<float>(),
                               out.data_ptr<scalar_t>(), M, N, K, group_size);
  });
  return out;
}

}  // namespace
}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CPU, m) {
  m.impl("int4_linear", &tinychat::int4_linear_cpu);
}
