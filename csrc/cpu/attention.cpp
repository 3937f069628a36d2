// CPU kernel of attention (schema in csrc/ops.cpp): causal attention of T queries over the KV cache, for the
// decode step (T = 1) and prefill alike.
//
// out[b, t, h] = softmax_j(scale * q[b, t, h] . k[b, h / rep, j], j <= positions[t]) @ v[b, h / rep, :]
//
// Work items are (b, kv head, tile of query tokens), split over threads (a decode step whose items do not spread
// evenly over the threads also cuts each item's keys into one run per thread, merged at the end). An item holds every
// query head that reads its kv head (the rep = H / Hkv heads of a grouped-query group) for up to kTileRows / rep
// tokens, so each key and value row is read once for the whole tile. Keys are taken kKeys at a time with an online
// softmax: the running max and sum of each query row rescale its fp32 accumulator, so one pass over the cache
// suffices. Scores come from dot products along the head dim for a few rows (decode), or from a transposed key block
// and a vector loop over keys for many (prefill), where each loaded key element serves kTileRows queries. Rows past
// their causal limit inside a block get probability 0. The body is written once and compiled per instruction set
// (isa.h).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "isa.h"
#include "vec.h"

namespace tinychat {

namespace {

constexpr int64_t kKeys = 64;      // keys per online-softmax step
constexpr int64_t kTileRows = 16;  // query rows (tokens x heads of a group) per work item, at least one token
constexpr int64_t kDotRows = 8;    // below this many rows, scores by dot products (no key transpose)

struct AttnProblem {
  const void* q;  // [B, T, H, D]
  const void* k;  // [B, Hkv, S, D]
  const void* v;
  void* out;      // [B, T, H, D], contiguous
  const int64_t* pos;  // [T]
  int64_t qs[3], ks[3], vs[3];  // strides of dims 0..2 (the last is 1)
  int64_t B, T, H, Hkv, D, rep, tile_tokens, n_tiles;
  float scale;
  // Decode with fewer (batch, kv head) items than threads can use: each item's keys are cut into `splits` runs of
  // split_keys (a multiple of kKeys), whose partial softmax state goes to `partial` and is merged at the end.
  int64_t splits, split_keys;
  float* partial;  // [items, splits, tile_tokens * rep, 2 + D]: running max, running sum, accumulator
};

// Per-thread fp32 scratch of one work item.
struct Scratch {
  std::vector<float> q, acc, kt, kv, s, m, l;
  std::vector<int64_t> limit;
  Scratch(int64_t rows, int64_t D)
      : q(rows * D), acc(rows * D), kt(D * kKeys), kv(kKeys * D), s(rows * kKeys), m(rows), l(rows), limit(rows) {}
};

template <typename scalar_t>
TINYCHAT_INLINE void to_float(const scalar_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Rows [0, n) of a cache block as fp32 rows of D: the cache itself for fp32, else converted into buf.
template <typename scalar_t>
TINYCHAT_INLINE const float* block_rows(const scalar_t* src, int64_t stride, int64_t n, int64_t D, float* buf,
                                        int64_t& out_stride) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    out_stride = stride;
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) to_float(src + j * stride, buf + j * D, D);
    out_stride = D;
    return buf;
  }
}

template <typename scalar_t>
TINYCHAT_INLINE void attention_item(const AttnProblem& p, int64_t unit, Scratch& w) {
  const int64_t item = unit / p.splits, split = unit % p.splits;
  const int64_t D = p.D, rep = p.rep;
  const int64_t tile = item % p.n_tiles, hk = (item / p.n_tiles) % p.Hkv, b = item / (p.n_tiles * p.Hkv);
  const int64_t t0 = tile * p.tile_tokens, tokens = std::min(p.tile_tokens, p.T - t0), rows = tokens * rep;
  const auto* q = static_cast<const scalar_t*>(p.q) + b * p.qs[0] + hk * rep * p.qs[2];
  const auto* k = static_cast<const scalar_t*>(p.k) + b * p.ks[0] + hk * p.ks[1];
  const auto* v = static_cast<const scalar_t*>(p.v) + b * p.vs[0] + hk * p.vs[1];
  int64_t kv_len = 0;  // keys any row of the tile sees
  for (int64_t r = 0; r < rows; ++r) {  // row r: token t0 + r / rep, query head hk * rep + r % rep
    const int64_t t = t0 + r / rep;
    to_float(q + t * p.qs[1] + (r % rep) * p.qs[2], w.q.data() + r * D, D);
    for (int64_t d = 0; d < D; ++d) w.q[r * D + d] *= p.scale;
    w.limit[r] = p.pos[t] + 1;
    kv_len = std::max(kv_len, w.limit[r]);
    w.m[r] = -1e30f;  // finite: exp_approx(m_old - m_new) must give 0 on the first block, never NaN
    w.l[r] = 0.f;
  }
  std::fill(w.acc.begin(), w.acc.begin() + rows * D, 0.f);
  kv_len = std::min(kv_len, (split + 1) * p.split_keys);
  for (int64_t j0 = split * p.split_keys; j0 < kv_len; j0 += kKeys) {
    const int64_t n = std::min(kKeys, kv_len - j0);
    if (rows < kDotRows) {  // few rows: one dot product per (row, key) along D
      int64_t kstride;
      const float* kb = block_rows(k + j0 * p.ks[2], p.ks[2], n, D, w.kv.data(), kstride);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < n; ++j) w.s[r * kKeys + j] = dot(w.q.data() + r * D, kb + j * kstride, D);
      }
    } else {  // many rows: keys transposed to kt [D, kKeys], then s[r, :] += q[r, d] * kt[d, :] over d
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t* kr = k + (j0 + j) * p.ks[2];
        for (int64_t d = 0; d < D; ++d) w.kt[d * kKeys + j] = static_cast<float>(kr[d]);
      }
      for (int64_t d = 0; d < D; ++d) std::fill(w.kt.data() + d * kKeys + n, w.kt.data() + (d + 1) * kKeys, 0.f);
      for (int64_t r = 0; r < rows; ++r) {
        float* __restrict s = w.s.data() + r * kKeys;
        std::fill(s, s + kKeys, 0.f);
        for (int64_t d = 0; d < D; ++d) {
          const float qd = w.q[r * D + d];
          const float* __restrict kt = w.kt.data() + d * kKeys;
          for (int64_t j = 0; j < kKeys; ++j) s[j] += qd * kt[j];
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {  // online softmax over the keys row r sees in this block
      float* s = w.s.data() + r * kKeys;
      const int64_t seen = std::clamp<int64_t>(w.limit[r] - j0, 0, n);
      const float new_max = seen > 0 ? std::max(w.m[r], max_of(s, seen)) : w.m[r];
      const float correction = exp_approx(w.m[r] - new_max);
      const float sum = exp_shifted_sum(s, seen, new_max);
      std::fill(s + seen, s + n, 0.f);
      w.l[r] = w.l[r] * correction + sum;
      w.m[r] = new_max;
      float* a = w.acc.data() + r * D;
      for (int64_t d = 0; d < D; ++d) a[d] *= correction;
    }
    int64_t vstride;
    const float* vb = block_rows(v + j0 * p.vs[2], p.vs[2], n, D, w.kv.data(), vstride);
    for (int64_t r = 0; r < rows; ++r) {  // acc[r] += p @ v, kDotLanes columns at a time held in registers
      const float* s = w.s.data() + r * kKeys;
      for (int64_t d0 = 0; d0 < D; d0 += kDotLanes) {
        const int64_t width = std::min<int64_t>(kDotLanes, D - d0);
        float* a = w.acc.data() + r * D + d0;
        if (width == kDotLanes) {
          float lanes[kDotLanes];
          for (int l = 0; l < kDotLanes; ++l) lanes[l] = a[l];
          for (int64_t j = 0; j < n; ++j) {
            const float* vr = vb + j * vstride + d0;
            for (int l = 0; l < kDotLanes; ++l) lanes[l] += s[j] * vr[l];
          }
          for (int l = 0; l < kDotLanes; ++l) a[l] = lanes[l];
        } else {
          for (int64_t j = 0; j < n; ++j) {
            for (int64_t l = 0; l < width; ++l) a[l] += s[j] * vb[j * vstride + d0 + l];
          }
        }
      }
    }
  }
  if (p.splits > 1) {  // this run of keys' state, merged by merge_splits
    float* part = p.partial + unit * p.tile_tokens * rep * (2 + D);
    for (int64_t r = 0; r < rows; ++r) {
      part[r * (2 + D)] = w.m[r];
      part[r * (2 + D) + 1] = w.l[r];
      std::copy(w.acc.begin() + r * D, w.acc.begin() + (r + 1) * D, part + r * (2 + D) + 2);
    }
    return;
  }
  auto* out = static_cast<scalar_t*>(p.out) + ((b * p.T + t0) * p.H + hk * rep) * D;
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.f / w.l[r];
    scalar_t* o = out + ((r / rep) * p.H + r % rep) * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(w.acc[r * D + d] * inv);
  }
}

// out = the softmax-weighted merge of each item's splits: every split's sum and accumulator rescaled to the largest
// running max (a split that saw no key of a row has max -1e30, sum 0: weight 0).
template <typename scalar_t>
void merge_splits(const AttnProblem& p) {
  const int64_t D = p.D, rows = p.tile_tokens * p.rep, items = p.B * p.Hkv * p.n_tiles;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tile = item % p.n_tiles, hk = (item / p.n_tiles) % p.Hkv, b = item / (p.n_tiles * p.Hkv);
      const int64_t t0 = tile * p.tile_tokens, tokens = std::min(p.tile_tokens, p.T - t0);
      const float* part = p.partial + item * p.splits * rows * (2 + D);
      for (int64_t r = 0; r < tokens * p.rep; ++r) {
        float m = -1e30f;
        for (int64_t s = 0; s < p.splits; ++s) m = std::max(m, part[(s * rows + r) * (2 + D)]);
        float l = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t s = 0; s < p.splits; ++s) {
          const float* ps = part + (s * rows + r) * (2 + D);
          const float weight = exp_approx(ps[0] - m);
          l += weight * ps[1];
          for (int64_t d = 0; d < D; ++d) acc[d] += weight * ps[2 + d];
        }
        scalar_t* o = static_cast<scalar_t*>(p.out) + ((b * p.T + t0 + r / p.rep) * p.H + hk * p.rep + r % p.rep) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d] / l);
      }
    }
  });
}

template <typename scalar_t>
void attention_items_scalar(const AttnProblem& p, int64_t begin, int64_t end, Scratch& w) {
  for (int64_t u = begin; u < end; ++u) attention_item<scalar_t>(p, u, w);
}

#ifdef TINYCHAT_X86
template <typename scalar_t>
TINYCHAT_AVX2 void attention_items_avx2(const AttnProblem& p, int64_t begin, int64_t end, Scratch& w) {
  for (int64_t u = begin; u < end; ++u) attention_item<scalar_t>(p, u, w);
}

template <typename scalar_t>
TINYCHAT_AVX512 void attention_items_avx512(const AttnProblem& p, int64_t begin, int64_t end, Scratch& w) {
  for (int64_t u = begin; u < end; ++u) attention_item<scalar_t>(p, u, w);
}
#endif

template <typename scalar_t>
void run_attention(const AttnProblem& p, Isa isa) {
  auto items_fn = attention_items_scalar<scalar_t>;
#ifdef TINYCHAT_X86
  if (isa >= Isa::kAvx512) items_fn = attention_items_avx512<scalar_t>;
  if (isa == Isa::kAvx2) items_fn = attention_items_avx2<scalar_t>;
#endif
  const int64_t units = p.B * p.Hkv * p.n_tiles * p.splits;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    Scratch w(p.tile_tokens * p.rep, p.D);
    items_fn(p, begin, end, w);
  });
  if (p.splits > 1) merge_splits<scalar_t>(p);
}

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& positions, double scale) {
  check_attention_args(q, k_cache, v_cache, positions, c10::DeviceType::CPU);
  const int64_t S = k_cache.size(2);
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < positions.numel(); ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < S, "attention: positions must be in [0, ", S, ") (the cache size), got ",
                pos[t]);
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return out;
  AttnProblem p{};
  p.q = q.const_data_ptr();
  p.k = k_cache.const_data_ptr();
  p.v = v_cache.const_data_ptr();
  p.out = out.data_ptr();
  p.pos = pos;
  for (int i = 0; i < 3; ++i) {
    p.qs[i] = q.stride(i);
    p.ks[i] = k_cache.stride(i);
    p.vs[i] = v_cache.stride(i);
  }
  p.B = q.size(0), p.T = q.size(1), p.H = q.size(2), p.D = q.size(3), p.Hkv = k_cache.size(1);
  p.rep = p.H / p.Hkv;
  p.tile_tokens = std::max<int64_t>(1, kTileRows / p.rep);
  p.n_tiles = (p.T + p.tile_tokens - 1) / p.tile_tokens;
  p.scale = static_cast<float>(scale);
  // decode items that do not spread evenly over the threads: cut their keys into one run per thread
  const int64_t items = p.B * p.Hkv * p.n_tiles, threads = at::get_num_threads();
  const int64_t keys = *std::max_element(pos, pos + p.T) + 1;
  p.splits = 1;
  p.split_keys = keys;
  if (p.T == 1 && threads > 1 && items % threads != 0 && keys >= 2 * kKeys) {
    p.splits = std::min(threads, keys / kKeys);
    p.split_keys = (keys + p.splits * kKeys - 1) / (p.splits * kKeys) * kKeys;
    p.splits = (keys + p.split_keys - 1) / p.split_keys;  // no empty run
  }
  at::Tensor partial;
  if (p.splits > 1) {
    partial = at::empty({items * p.splits * p.tile_tokens * p.rep * (2 + p.D)}, q.options().dtype(at::kFloat));
    p.partial = partial.data_ptr<float>();
  }
  const Isa isa = current_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "tinychat_attention_cpu",
                                  [&] { run_attention<scalar_t>(p, isa); });
  return out;
}

}  // namespace
}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CPU, m) {
  m.impl("attention", &tinychat::attention_cpu);
}
