// CPU kernel of attention (schema in csrc/ops.cpp): causal attention of T queries over the KV cache, optionally
// within a sliding window, for the decode step (T = 1) and prefill alike.
//
// out[b, t, h] = softmax_j(scale * q[b, t, h] . k[b, h / rep, j % S], lo_t <= j <= positions[t])
//                @ v[b, h / rep, j % S]
// with lo_t = max(0, positions[t] - window + 1) (window 0: lo_t = 0) and S the cache rows: position j is read at row
// j % S, the plain cache's row j when S exceeds every position, a ring's otherwise.
//
// Work items are (b, kv head, tile of query tokens), split over threads. An item holds every query head that reads
// its kv head (the rep = H / Hkv heads of a grouped-query group) for up to kTileRows / rep tokens, so each key and
// value row is read once for the whole tile. A decode step whose items do not spread evenly over the threads splits
// the query rows of all items evenly instead: each thread takes a contiguous range of rows and runs the rows of one
// item that fall in its range together (each thread then reads a kv head once per item it touches: 9 query heads
// over 3 kv heads on 2 threads read 4 kv heads' caches, not 9 as one row at a time did). Keys are taken kKeys at a
// time, from key 0, with an online softmax: the running max and sum of each query row rescale its fp32 accumulator,
// so one pass over the cache suffices. Keys go in ascending position, in blocks on a grid of positions fixed for
// every call: a block ends at each multiple of kKeys and, in a ring, at each multiple of S (where the rows wrap), so
// a block's rows are contiguous. Within a block the item's rows go in groups of up to kGroupRows (a token's 3 query
// heads of SmolLM2's groups): each 16 values of a key or value row are loaded once for the group's rows, their FMAs
// sharing the load (one row at a time, the loads had bounded the kernel). A decode step's float16 cache is widened in
// registers as it is read, and the next block's rows are prefetched into L2 while a block runs (decode attention at
// 4096 keys streamed the cache at 14 GB/s without: the hardware prefetcher alone left it waiting on memory); a
// prefill's tile widens each block once into fp32 rows that all its groups read.
//
// Each query row is computed in the same order whatever else shares its call: scores by one dot product per (row,
// key) along the head dim (8 keys at once: dots8), the grid's blocks from its own first visible position to its
// own causal limit (blocks outside its window change nothing), the same operations on its accumulator. So a prefill
// that reuses a cached prefix gives bit for bit the rows a full prefill gives (tests/test_attention.py), and greedy
// output does not depend on how much of a prompt was cached.
// The body is written once and compiled per instruction set (isa.h).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "isa.h"
#include "kernels.h"
#include "vec.h"

namespace tinychat {

namespace {

constexpr int64_t kKeys = 64;      // keys per online-softmax step
// query rows (tokens x heads of a group) per work item, at least one token: a prefill widens each block of a float16
// cache once per item (48 rows against 16: SmolLM2's prefill attention at 4096 tokens 258 -> 230 ms a layer)
constexpr int64_t kTileRows = 48;

struct AttnProblem {
  const void* q;  // [B, T, H, D]
  const void* k;  // [B, Hkv, S, D]
  const void* v;
  void* out;      // [B, T, H, D], contiguous
  const int64_t* pos;  // [T]
  int64_t qs[3], ks[3], vs[3];  // strides of dims 0..2 (the last is 1)
  int64_t B, T, H, Hkv, D, S, window, rep, tile_tokens, n_tiles;
  float scale;
  // Whether threads take ranges of query rows across items (a decode step whose items do not spread evenly over
  // the threads), not whole items.
  bool split_rows;
  Isa isa;
};

// kDotLanes fp32 lanes as one GCC vector, lowered to the target's registers (one zmm, two ymm, four xmm) with the
// arithmetic (and FMA contraction) of a scalar loop over the lanes.
typedef float Lanes __attribute__((vector_size(kDotLanes * sizeof(float))));

// 16 values of a cache row from src as fp32 lanes: fp32 as stored, float16 widened in registers (exact: the same
// values as a widened copy of the block) with instruction set I's conversion. The conversion is inline asm: gcc
// will not inline the intrinsic (a function of its own target) into this body, which gets the target of the entry
// point that inlines it only there.
template <Isa I>
TINYCHAT_INLINE void load_lanes(const float* src, Lanes& out) {
  std::memcpy(&out, src, sizeof(out));
}
template <Isa I>
TINYCHAT_INLINE void load_lanes(const at::Half* src, Lanes& out) {
#ifdef TINYCHAT_X86
  using Halves = uint16_t[8];  // the memory operand of one 8-value conversion
  if constexpr (I >= Isa::kAvx512) {
    asm("vcvtph2ps %1, %0" : "=v"(out) : "m"(*reinterpret_cast<const uint16_t(*)[16]>(src)));
    return;
  } else if constexpr (I == Isa::kAvx2) {
    typedef float Eight __attribute__((vector_size(8 * sizeof(float))));
    Eight lo, hi;
    asm("vcvtph2ps %1, %0" : "=x"(lo) : "m"(*reinterpret_cast<const Halves*>(src)));
    asm("vcvtph2ps %1, %0" : "=x"(hi) : "m"(*reinterpret_cast<const Halves*>(src + 8)));
    std::memcpy(&out, &lo, sizeof(lo));
    std::memcpy(reinterpret_cast<char*>(&out) + sizeof(lo), &hi, sizeof(hi));
    return;
  }
#endif
  for (int l = 0; l < kDotLanes; ++l) out[l] = static_cast<float>(src[l]);
}

// Prefetches into L2 the cache lines of `bytes` bytes at p (streaming the cache from memory, the hardware prefetcher
// alone left decode attention waiting on it).
TINYCHAT_INLINE void prefetch_row(const void* p, int64_t bytes) {
  for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(static_cast<const char*>(p) + line, 0, 2);
}

constexpr int kGroupRows = 3;  // query rows whose scores and p @ v share each load of a key and value row

// Scores of 8 keys (rows of k, stride kstride) against R query rows (q: rows D apart), D a multiple of kDotLanes:
// out[r * kKeys + j] is dot(q_r, k_j, D) bit for bit (vec.h: kDotLanes partial sums along D, then halves added to
// halves). Each 16 values of a key row are loaded (and widened) once for the R rows; each row's 8 trees are reduced
// together by shuffles, each step pairing the vectors of two key sets (a tree a key cost as many shuffles and adds
// as the key's FMAs). __builtin_shufflevector (gcc >= 12, clang): lanes 0..15 of the first vector, 16..31 of the
// second.
template <int R, Isa I, typename KT>
TINYCHAT_INLINE void dots8(const float* q, int64_t D, const KT* k, int64_t kstride, int64_t ahead, float* out) {
  static_assert(kDotLanes == 16, "dots8 reduces trees of 16 lanes");
  if (ahead != 0) {
    for (int j = 0; j < 8; ++j) prefetch_row(k + j * kstride + ahead, D * sizeof(KT));
  }
  Lanes v[R][8] = {};
  for (int64_t d = 0; d < D; d += kDotLanes) {  // 8 x R independent FMA chains, each in dot's order
    Lanes qv[R];
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) std::memcpy(&qv[r], q + r * D + d, sizeof(Lanes));
    #pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      Lanes kv;
      load_lanes<I>(k + j * kstride + d, kv);
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) v[r][j] += qv[r] * kv;
    }
  }
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    Lanes* t = v[r];
    // step 1, lanes l + lanes l + 8: the halves of keys 2i and 2i + 1 -> t[i] (8 lanes a key)
    for (int i = 0; i < 4; ++i) {
      const Lanes a = t[2 * i], b = t[2 * i + 1];
      t[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
             __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    }
    // step 2, lanes l + lanes l + 4 of each key's 8 -> t[i] (4 lanes a key, keys 4i .. 4i + 3)
    for (int i = 0; i < 2; ++i) {
      const Lanes a = t[2 * i], b = t[2 * i + 1];
      t[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
             __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    }
    // step 3, lanes (0, 1) + lanes (2, 3) of each key's 4 -> 2 lanes a key, keys 0 .. 7
    const Lanes pairs = __builtin_shufflevector(t[0], t[1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
                        __builtin_shufflevector(t[0], t[1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    // step 4, lane 0 + lane 1 of each key: the 8 scores in key order (lanes 0 .. 7)
    const Lanes scores = __builtin_shufflevector(pairs, pairs, 0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14) +
                         __builtin_shufflevector(pairs, pairs, 1, 3, 5, 7, 9, 11, 13, 15, 1, 3, 5, 7, 9, 11, 13, 15);
    std::memcpy(out + r * kKeys, &scores, 8 * sizeof(float));
  }
}

constexpr int kPvLanes = 4;  // vectors of kDotLanes columns that p @ v updates together

// acc_r[0 .. V * kDotLanes) += sum_j s_r[j] * v[j, same columns] over `seen` rows of v (row stride vstride) for R
// query rows (acc rows D apart, s rows kKeys apart), in GCC vectors: each column sums its keys in order (one FMA a
// key), V R independent chains hide the FMA's latency, and each value row is loaded (and widened) once for the R
// rows.
template <int R, int V, Isa I, typename KT>
TINYCHAT_INLINE void pv_columns(float* acc, int64_t D, const float* s, const KT* v, int64_t vstride, int64_t ahead,
                                int64_t seen) {
  Lanes lanes[R][V];  // loaded and stored a vector at a time (a whole row's memcpy kept them in memory)
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    #pragma GCC unroll 4
    for (int c = 0; c < V; ++c) std::memcpy(&lanes[r][c], acc + r * D + c * kDotLanes, sizeof(Lanes));
  }
  for (int64_t j = 0; j < seen; ++j) {
    if (ahead != 0) prefetch_row(v + j * vstride + ahead, V * kDotLanes * sizeof(KT));
    Lanes vr[V];
    #pragma GCC unroll 4
    for (int c = 0; c < V; ++c) load_lanes<I>(v + j * vstride + c * kDotLanes, vr[c]);
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const float sj = s[r * kKeys + j];
      #pragma GCC unroll 4
      for (int c = 0; c < V; ++c) lanes[r][c] += sj * vr[c];
    }
  }
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    #pragma GCC unroll 4
    for (int c = 0; c < V; ++c) std::memcpy(acc + r * D + c * kDotLanes, &lanes[r][c], sizeof(Lanes));
  }
}

// Per-thread fp32 scratch of one work item.
struct Scratch {
  std::vector<float> q, acc, k, v, s, m, l;
  std::vector<int64_t> first, limit;  // each row's visible positions [first, limit)
  Scratch(int64_t rows, int64_t D)
      : q(rows * D), acc(rows * D), k(kKeys * D), v(kKeys * D), s(rows * kKeys), m(rows), l(rows), first(rows),
        limit(rows) {}
};

template <typename scalar_t>
TINYCHAT_INLINE void to_float(const scalar_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// Rows [0, n) of a float16 or bfloat16 cache block (row stride `stride`) widened into buf, rows of D.
template <typename scalar_t>
TINYCHAT_INLINE const float* widen_rows(const scalar_t* src, int64_t stride, int64_t n, int64_t D, float* buf,
                                        Isa isa) {
  if constexpr (std::is_same_v<scalar_t, at::Half>) {
    if (stride == D) {
      widen_halves(src, buf, n * D, isa);
    } else {
      for (int64_t j = 0; j < n; ++j) widen_halves(src + j * stride, buf + j * D, D, isa);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) to_float(src + j * stride, buf + j * D, D);
  }
  return buf;
}

// One block of keys [j0, j0 + n): k + j * kstride and v + j * vstride hold the key and value at position j0 + j,
// either the cache's rows (read in place: fp32, or float16 widened in registers) or fp32 rows widened into the
// scratch. ahead (elements; 0: none): from a key's or value's row to the same row of the next block, prefetched
// while this block runs when the rows are the cache's.
template <typename KT>
struct Block {
  const KT* k;
  const KT* v;
  int64_t kstride, vstride, ahead_k, ahead_v, j0, n;
};

// acc_i += s_i @ v over keys [from, to) of the block for rows i .. i + R - 1 of the item, columns in registers
// (kPvLanes vectors of them at once).
template <int R, Isa I, typename KT>
TINYCHAT_INLINE void pv_rows(Scratch& w, const Block<KT>& blk, int64_t i, int64_t D, int64_t from, int64_t to) {
  const float* s = w.s.data() + i * kKeys + from;
  const KT* v = blk.v + from * blk.vstride;
  const int64_t vstride = blk.vstride, seen = to - from;
  float* acc = w.acc.data() + i * D;
  int64_t d0 = 0;
  for (; d0 + kPvLanes * kDotLanes <= D; d0 += kPvLanes * kDotLanes) {
    pv_columns<R, kPvLanes, I>(acc + d0, D, s, v + d0, vstride, blk.ahead_v, seen);
  }
  for (; d0 + kDotLanes <= D; d0 += kDotLanes) pv_columns<R, 1, I>(acc + d0, D, s, v + d0, vstride, blk.ahead_v, seen);
  for (int r = 0; r < R; ++r) {
    for (int64_t j = 0; j < seen; ++j) {
      for (int64_t d = d0; d < D; ++d) acc[r * D + d] += s[r * kKeys + j] * static_cast<float>(v[j * vstride + d]);
    }
  }
}

// Rows i0 .. i0 + R - 1 of the item over one block.
template <int R, Isa I, typename KT>
TINYCHAT_INLINE void attend_group(const AttnProblem& p, Scratch& w, const Block<KT>& blk, int64_t i0) {
  const int64_t D = p.D, n = blk.n;
  int64_t a[R], e[R], lo = n, hi = 0;  // each row's keys [a, e) in this block, and their union [lo, hi)
  bool same = true;
  for (int r = 0; r < R; ++r) {
    a[r] = std::clamp<int64_t>(w.first[i0 + r] - blk.j0, 0, n);
    e[r] = std::clamp<int64_t>(w.limit[i0 + r] - blk.j0, 0, n);
    if (e[r] > a[r]) lo = std::min(lo, a[r]), hi = std::max(hi, e[r]);
    same = same && a[r] == a[0] && e[r] == e[0];
  }
  if (hi <= lo) return;  // a block outside the rows' windows leaves them exactly as they were
  // scores of the union (a row's scores outside its own keys are not used)
  const float* q = w.q.data() + i0 * D;
  float* s = w.s.data() + i0 * kKeys;
  int64_t j = lo;
  if (D % kDotLanes == 0) {
    for (; j + 8 <= hi; j += 8) dots8<R, I>(q, D, blk.k + j * blk.kstride, blk.kstride, blk.ahead_k, s + j);
  }
  for (; j < hi; ++j) {
    const float* kj;
    if constexpr (std::is_same_v<KT, float>) {
      kj = blk.k + j * blk.kstride;
    } else {
      to_float(blk.k + j * blk.kstride, w.k.data(), D);
      kj = w.k.data();
    }
    for (int r = 0; r < R; ++r) s[r * kKeys + j] = dot(q + r * D, kj, D);
  }
  for (int r = 0; r < R; ++r) {  // online softmax over the keys row i0 + r sees in this block
    if (e[r] <= a[r]) continue;
    const int64_t i = i0 + r;
    float* sr = s + r * kKeys;  // sr[a .. e): the scores of positions j0 + a .. j0 + e - 1
    const float new_max = std::max(w.m[i], max_of(sr + a[r], e[r] - a[r]));
    const float correction = exp_approx(w.m[i] - new_max);
    const float sum = exp_shifted_sum(sr + a[r], e[r] - a[r], new_max);
    w.l[i] = w.l[i] * correction + sum;
    w.m[i] = new_max;
    float* acc = w.acc.data() + i * D;
    for (int64_t d = 0; d < D; ++d) acc[d] *= correction;
  }
  // acc += p @ v over each row's keys: the R rows together where their keys are the same
  if (same) {
    pv_rows<R, I>(w, blk, i0, D, a[0], e[0]);
  } else {
    for (int r = 0; r < R; ++r) {
      if (e[r] > a[r]) pv_rows<1, I>(w, blk, i0 + r, D, a[r], e[r]);
    }
  }
}

// The item's rows [0, rows) over one block, in groups of up to kGroupRows rows of about equal size.
template <Isa I, typename KT>
TINYCHAT_INLINE void attend_block(const AttnProblem& p, Scratch& w, const Block<KT>& blk, int64_t rows) {
  static_assert(kGroupRows == 3, "attend_block instantiates groups of 1 to 3 rows");
  const int64_t groups = (rows + kGroupRows - 1) / kGroupRows, size = (rows + groups - 1) / groups;
  for (int64_t i0 = 0; i0 < rows; i0 += size) {
    switch (std::min(size, rows - i0)) {
      case 1: attend_group<1, I>(p, w, blk, i0); break;
      case 2: attend_group<2, I>(p, w, blk, i0); break;
      default: attend_group<3, I>(p, w, blk, i0); break;
    }
  }
}

// Rows [r0, r0 + rows) of work item `item` (row r: token t0 + r / rep, query head hk * rep + r % rep).
// scalar_t: q and out; kv_t: the caches (scalar_t, or float16 / bfloat16 below float32 q). A float16 cache is
// widened in registers as it is read when one group of rows reads each block (a decode step: the cache is read
// once per step), else each block is widened once into fp32 rows that all the groups read.
template <Isa I, typename scalar_t, typename kv_t>
TINYCHAT_INLINE void attention_item(const AttnProblem& p, int64_t item, int64_t r0, int64_t rows, Scratch& w) {
  const int64_t D = p.D, rep = p.rep;
  const int64_t tile = item % p.n_tiles, hk = (item / p.n_tiles) % p.Hkv, b = item / (p.n_tiles * p.Hkv);
  const int64_t t0 = tile * p.tile_tokens;
  const auto* q = static_cast<const scalar_t*>(p.q) + b * p.qs[0] + hk * rep * p.qs[2];
  const auto* k = static_cast<const kv_t*>(p.k) + b * p.ks[0] + hk * p.ks[1];
  const auto* v = static_cast<const kv_t*>(p.v) + b * p.vs[0] + hk * p.vs[1];
  int64_t first = INT64_MAX, end = 0;  // positions any row of the unit sees: [first, end)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = r0 + i, t = t0 + r / rep;
    to_float(q + t * p.qs[1] + (r % rep) * p.qs[2], w.q.data() + i * D, D);
    for (int64_t d = 0; d < D; ++d) w.q[i * D + d] *= p.scale;
    w.first[i] = p.window > 0 ? std::max<int64_t>(0, p.pos[t] - p.window + 1) : 0;
    w.limit[i] = p.pos[t] + 1;
    first = std::min(first, w.first[i]);
    end = std::max(end, w.limit[i]);
    w.m[i] = -1e30f;  // finite: exp_approx(m_old - m_new) must give 0 on the first block, never NaN
    w.l[i] = 0.f;
  }
  std::fill(w.acc.begin(), w.acc.begin() + rows * D, 0.f);
  // blocks from the last grid point at or before `first` (multiples of kKeys and S)
  for (int64_t j0 = std::max(first / kKeys * kKeys, first / p.S * p.S), n; j0 < end; j0 += n) {  // [j0, j0 + n)
    const int64_t row0 = j0 % p.S;  // their cache rows: [row0, row0 + n)
    n = std::min({kKeys - j0 % kKeys, p.S - row0, end - j0});
    const Block<kv_t> cache{k + row0 * p.ks[2], v + row0 * p.vs[2], p.ks[2], p.vs[2], kKeys * p.ks[2],
                            kKeys * p.vs[2], j0, n};
    if constexpr (std::is_same_v<kv_t, float>) {
      attend_block<I>(p, w, cache, rows);
    } else {
      if constexpr (std::is_same_v<kv_t, at::Half>) {
        if (rows <= kGroupRows) {
          attend_block<I>(p, w, cache, rows);
          continue;
        }
      }
      bool seen = false;  // a block no row sees (positions between the rows' windows) is not widened
      for (int64_t i = 0; i < rows && !seen; ++i) seen = w.first[i] < j0 + n && w.limit[i] > j0;
      if (!seen) continue;
      const int64_t skip = std::clamp<int64_t>(first - j0, 0, n);  // leading keys no row sees: not read
      const float* kb = widen_rows(k + (row0 + skip) * p.ks[2], p.ks[2], n - skip, D, w.k.data() + skip * D, p.isa);
      const float* vb = widen_rows(v + (row0 + skip) * p.vs[2], p.vs[2], n - skip, D, w.v.data() + skip * D, p.isa);
      const Block<float> widened{kb - skip * D, vb - skip * D, D, D, 0, 0, j0, n};  // kb + j * D: position j0 + j
      attend_block<I>(p, w, widened, rows);
    }
  }
  auto* out = static_cast<scalar_t*>(p.out) + ((b * p.T + t0) * p.H + hk * rep) * D;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = r0 + i;
    const float inv = 1.f / w.l[i];
    scalar_t* o = out + ((r / rep) * p.H + r % rep) * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(w.acc[i * D + d] * inv);
  }
}

// Units [begin, end) of a thread: whole items, or (split_rows, a decode step: one token per item) query rows, the
// rows of each item in the range run together.
template <Isa I, typename scalar_t, typename kv_t>
TINYCHAT_INLINE void attention_units(const AttnProblem& p, int64_t begin, int64_t end, Scratch& w) {
  if (!p.split_rows) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t tokens = std::min(p.tile_tokens, p.T - (item % p.n_tiles) * p.tile_tokens);
      attention_item<I, scalar_t, kv_t>(p, item, 0, tokens * p.rep, w);
    }
    return;
  }
  for (int64_t u = begin; u < end;) {
    const int64_t item = u / p.rep, r0 = u % p.rep, rows = std::min(p.rep - r0, end - u);
    attention_item<I, scalar_t, kv_t>(p, item, r0, rows, w);
    u += rows;
  }
}

template <typename scalar_t, typename kv_t>
void attention_units_scalar(const AttnProblem& p, int64_t begin, int64_t end, Scratch& w) {
  attention_units<Isa::kScalar, scalar_t, kv_t>(p, begin, end, w);
}

#ifdef TINYCHAT_X86
template <typename scalar_t, typename kv_t>
TINYCHAT_AVX2 void attention_units_avx2(const AttnProblem& p, int64_t begin, int64_t end, Scratch& w) {
  attention_units<Isa::kAvx2, scalar_t, kv_t>(p, begin, end, w);
}

template <typename scalar_t, typename kv_t>
TINYCHAT_AVX512 void attention_units_avx512(const AttnProblem& p, int64_t begin, int64_t end, Scratch& w) {
  attention_units<Isa::kAvx512, scalar_t, kv_t>(p, begin, end, w);
}
#endif

template <typename scalar_t, typename kv_t>
void run_attention(const AttnProblem& p) {
  auto units_fn = attention_units_scalar<scalar_t, kv_t>;
#ifdef TINYCHAT_X86
  if (p.isa >= Isa::kAvx512) units_fn = attention_units_avx512<scalar_t, kv_t>;
  if (p.isa == Isa::kAvx2) units_fn = attention_units_avx2<scalar_t, kv_t>;
#endif
  const int64_t units = p.B * p.Hkv * p.n_tiles * (p.split_rows ? p.rep : 1);
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    Scratch w(p.tile_tokens * p.rep, p.D);
    units_fn(p, begin, end, w);
  });
}

}  // namespace

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& positions, double scale, int64_t window) {
  check_attention_args(q, k_cache, v_cache, positions, window, c10::DeviceType::CPU);
  const int64_t S = k_cache.size(2);
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < positions.numel(); ++t) {
    // a query sees each of its positions at its own row: at most S of them (window 0: a position past the cache
    // would read rows overwritten by later positions)
    TORCH_CHECK(window > 0 || (pos[t] >= 0 && pos[t] < S), "attention: positions must be in [0, ", S,
                ") (the cache size) without a window, got ", pos[t]);
    TORCH_CHECK(pos[t] >= 0, "attention: positions must be >= 0, got ", pos[t]);
    const int64_t span = pos[t] + 1 - std::max<int64_t>(0, pos[t] - window + 1);  // positions query t sees
    TORCH_CHECK(span <= S, "attention: the query at position ", pos[t], " sees ", span, " positions (window ", window,
                ") but the caches hold ", S, " rows: a ring cache needs S >= window + T - 1");
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
  p.S = S, p.window = window;
  p.rep = p.H / p.Hkv;
  p.tile_tokens = std::max<int64_t>(1, kTileRows / p.rep);
  p.n_tiles = (p.T + p.tile_tokens - 1) / p.tile_tokens;
  p.scale = static_cast<float>(scale);
  // decode items that do not spread evenly over the threads: ranges of query rows (each row's arithmetic is the
  // same either way)
  const int64_t items = p.B * p.Hkv * p.n_tiles, threads = at::get_num_threads();
  p.split_rows = p.T == 1 && threads > 1 && items % threads != 0 && p.rep > 1;
  p.isa = current_isa();
  if (k_cache.scalar_type() == q.scalar_type()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "tinychat_attention_cpu",
                                    [&] { run_attention<scalar_t, scalar_t>(p); });
  } else {  // float32 q over a float16 / bfloat16 cache (checks.h)
    AT_DISPATCH_REDUCED_FLOATING_TYPES(k_cache.scalar_type(), "tinychat_attention_cpu_half_cache",
                                       [&] { run_attention<float, scalar_t>(p); });
  }
  return out;
}

}  // namespace tinychat

TORCH_LIBRARY_IMPL(tinychat, CPU, m) {
  m.impl("attention", &tinychat::attention_cpu);
}
