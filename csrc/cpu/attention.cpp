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
// sharing the load (one row at a time, the loads had bounded the kernel). A decode step's float16 / bfloat16 cache
// is widened in registers as it is read, and the next block's rows are prefetched into L2 while a block runs (decode
// attention at 4096 keys streamed the cache at 14 GB/s without: the hardware prefetcher alone left it waiting on
// memory); a prefill widens the rows its queries see once for all its items into fp32, keys transposed so that a
// vector holds 16 keys and a score needs no reduction across lanes (scores_in_lanes).
//
// Each query row is computed in the same order whatever else shares its call: scores by one dot product per (row,
// key) along the head dim in dot's order (8 keys at once: dots8, or keys in lanes: scores_in_lanes, the same
// arithmetic), the grid's blocks from its own first visible position to its own causal limit (blocks outside its
// window change nothing), the same operations on its accumulator. So a prefill that reuses a cached prefix, or a
// decode step, gives bit for bit the rows a full prefill gives (tests/test_attention.py), and greedy output does not
// depend on how much of a prompt was cached.
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
// query rows (tokens x heads of a group) per work item, at least one token (48 rows against 16: SmolLM2's prefill
// attention at 4096 tokens 258 -> 230 ms a layer, when each item widened the float16 blocks it read)
constexpr int64_t kTileRows = 48;
constexpr int64_t kLead = 16;  // zero columns before a prefill's widened keys (widen_caches)

// The first position a query at position pos sees (window 0: no window).
TINYCHAT_INLINE int64_t first_seen(int64_t pos, int64_t window) {
  return window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
}

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
  // A prefill's float16 / bfloat16 cache widened once for all its items (widen_caches; nullptr: the cache is read in
  // place or widened in registers). Keys transposed, wk[(head * D + d) * wcols + kLead + c] = k[b, h, wbase + c, d]
  // (head = b * Hkv + h), values as rows, wv[(head * wrows + c) * D + d] = v[b, h, wbase + c, d], c < wrows.
  const float* wk;
  const float* wv;
  int64_t wbase, wrows, wcols;
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

template <Isa I>
TINYCHAT_INLINE void load_lanes(const at::BFloat16* src, Lanes& out) {  // exact: a bfloat16's bits are fp32's top half
  typedef uint16_t Bits16 __attribute__((vector_size(kDotLanes * sizeof(uint16_t))));
  typedef uint32_t Bits32 __attribute__((vector_size(kDotLanes * sizeof(uint32_t))));
  Bits16 h;
  std::memcpy(&h, src, sizeof(h));
  const Bits32 w = __builtin_convertvector(h, Bits32) << 16;
  std::memcpy(&out, &w, sizeof(out));
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

// RR query rows x KV vectors of 16 keys, in fp32 lanes (lane c: key c of the vector).
template <int RR, int KV>
using KeyTile = Lanes[RR][KV];

// Leaf l of dot's tree for each (row, key): x[r][c] = sum over d = l, l + 16, ... of q_r[d] * k[d] (one FMA each, in
// order of d, from zero: dot's partial sum l), keys in lanes (kt + d * ktstride: the d-th values of 16 * KV keys).
template <int RR, int KV>
TINYCHAT_INLINE void leaf_in_lanes(const float* q, int64_t D, const float* kt, int64_t ktstride, int l,
                                   KeyTile<RR, KV>& x) {
  #pragma GCC unroll 4
  for (int r = 0; r < RR; ++r) {
    #pragma GCC unroll 4
    for (int c = 0; c < KV; ++c) x[r][c] = Lanes{};
  }
  for (int64_t d = l; d < D; d += kDotLanes) {
    Lanes k[KV];
    #pragma GCC unroll 4
    for (int c = 0; c < KV; ++c) std::memcpy(&k[c], kt + d * ktstride + c * kDotLanes, sizeof(Lanes));
    #pragma GCC unroll 4
    for (int r = 0; r < RR; ++r) {
      const float qd = q[r * D + d];
      #pragma GCC unroll 4
      for (int c = 0; c < KV; ++c) x[r][c] += qd * k[c];
    }
  }
}

template <int RR, int KV>
TINYCHAT_INLINE void add_tiles(KeyTile<RR, KV>& a, const KeyTile<RR, KV>& b) {
  #pragma GCC unroll 4
  for (int r = 0; r < RR; ++r) {
    #pragma GCC unroll 4
    for (int c = 0; c < KV; ++c) a[r][c] += b[r][c];
  }
}

// dot's h4[m] = (leaf m + leaf m + 8) + (leaf m + 4 + leaf m + 12) for each (row, key).
template <int RR, int KV>
TINYCHAT_INLINE void quad_in_lanes(const float* q, int64_t D, const float* kt, int64_t ktstride, int m,
                                   KeyTile<RR, KV>& h) {
  KeyTile<RR, KV> b, c;
  leaf_in_lanes<RR, KV>(q, D, kt, ktstride, m, h);
  leaf_in_lanes<RR, KV>(q, D, kt, ktstride, m + 8, b);
  add_tiles<RR, KV>(h, b);
  leaf_in_lanes<RR, KV>(q, D, kt, ktstride, m + 4, b);
  leaf_in_lanes<RR, KV>(q, D, kt, ktstride, m + 12, c);
  add_tiles<RR, KV>(b, c);
  add_tiles<RR, KV>(h, b);
}

// Scores of 16 * KV keys stored transposed (kt + d * ktstride: the d-th values of the keys, one key a lane) against
// RR query rows (q: rows D apart), D a multiple of kDotLanes: out[r * kKeys + c] is dot(q_r, k_c, D) bit for bit
// (the leaves' FMAs in dot's order, added in dot's tree: (h4[0] + h4[2]) + (h4[1] + h4[3])), with no reduction
// across lanes (dots8 spends two shuffles a score on it).
template <int RR, int KV>
TINYCHAT_INLINE void scores_in_lanes(const float* q, int64_t D, const float* kt, int64_t ktstride, float* out) {
  static_assert(kDotLanes == 16, "the leaves are dot's 16 partial sums");
  KeyTile<RR, KV> h0, h1, h2;
  quad_in_lanes<RR, KV>(q, D, kt, ktstride, 0, h0);
  quad_in_lanes<RR, KV>(q, D, kt, ktstride, 2, h2);
  add_tiles<RR, KV>(h0, h2);
  quad_in_lanes<RR, KV>(q, D, kt, ktstride, 1, h1);
  quad_in_lanes<RR, KV>(q, D, kt, ktstride, 3, h2);
  add_tiles<RR, KV>(h1, h2);
  add_tiles<RR, KV>(h0, h1);
  #pragma GCC unroll 4
  for (int r = 0; r < RR; ++r) {
    #pragma GCC unroll 4
    for (int c = 0; c < KV; ++c) std::memcpy(out + r * kKeys + c * kDotLanes, &h0[r][c], sizeof(Lanes));
  }
}

// scores_in_lanes for R = 1 to 3 rows: two rows at a time.
template <int R, int KV>
TINYCHAT_INLINE void scores_rows_in_lanes(const float* q, int64_t D, const float* kt, int64_t ktstride, float* s) {
  if constexpr (R >= 2) scores_in_lanes<2, KV>(q, D, kt, ktstride, s);
  if constexpr (R != 2) scores_in_lanes<1, KV>(q + (R - 1) * D, D, kt, ktstride, s + (R - 1) * kKeys);
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
  std::vector<float> q, acc, k, s, m, l;  // k: one key row widened (head dims that are not a multiple of kDotLanes);
                                          // l: kDotLanes lanes a row
  std::vector<int64_t> first, limit;  // each row's visible positions [first, limit)
  Scratch(int64_t rows, int64_t D)
      : q(rows * D), acc(rows * D), k(D), s(rows * kKeys), m(rows), l(rows * kDotLanes), first(rows), limit(rows) {}
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

// One block of keys [j0, j0 + n): v + j * vstride holds the value at position j0 + j, and k + j * kstride its key
// (kt = 0) or, keys in lanes (kt > 0: a prefill's widened keys), k + d * kt + j its key's d-th value. The rows are
// the cache's (read in place: fp32, or float16 / bfloat16 widened in registers) or the call's widened fp32 copy.
// ahead (elements; 0: none): from a key's or value's row to the same row of the next block, prefetched while this
// block runs when the rows are the cache's.
template <typename KT>
struct Block {
  const KT* k;
  const KT* v;
  int64_t kstride, vstride, ahead_k, ahead_v, j0, n, kt;
};

// Scores of keys [lo, hi) of a block whose keys are in lanes (blk.kt > 0) for R rows, in 16-key vectors on the
// block's grid (a row's scores outside its keys are not used). Returns the end of the last vector.
template <int R>
TINYCHAT_INLINE int64_t scores_in_lanes_of(const float* q, int64_t D, const Block<float>& blk, int64_t lo, int64_t hi,
                                           float* s) {
  int64_t j = lo / kDotLanes * kDotLanes;
  while (j < hi) {
    if (j + kDotLanes < hi && j + 2 * kDotLanes <= kKeys) {
      scores_rows_in_lanes<R, 2>(q, D, blk.k + j, blk.kt, s + j);
      j += 2 * kDotLanes;
    } else {
      scores_rows_in_lanes<R, 1>(q, D, blk.k + j, blk.kt, s + j);
      j += kDotLanes;
    }
  }
  return j;
}

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

// The larger of a and b in each lane (exact: any order of a max reduction gives the same value). vmaxps as inline
// asm on x86, as load_lanes converts (gcc lowered a comparison of GCC vectors lane by lane here, with a branch each).
template <Isa I>
TINYCHAT_INLINE Lanes max_lanes(Lanes a, Lanes b) {
  Lanes out;
#ifdef TINYCHAT_X86
  if constexpr (I >= Isa::kAvx512) {
    asm("vmaxps %2, %1, %0" : "=v"(out) : "v"(a), "v"(b));
    return out;
  } else if constexpr (I == Isa::kAvx2) {
    typedef float Eight __attribute__((vector_size(8 * sizeof(float))));
    Eight a2[2], b2[2], o2[2];
    std::memcpy(a2, &a, sizeof(a));
    std::memcpy(b2, &b, sizeof(b));
    for (int h = 0; h < 2; ++h) asm("vmaxps %2, %1, %0" : "=x"(o2[h]) : "x"(a2[h]), "x"(b2[h]));
    std::memcpy(&out, o2, sizeof(out));
    return out;
  }
#endif
  for (int l = 0; l < kDotLanes; ++l) out[l] = std::max(a[l], b[l]);
  return out;
}

// kStep + kDotLanes - s: lanes l >= s are 1, the others 0; kStep + 2 * kDotLanes - t: lanes l < t are 1 (s, t in
// [0, kDotLanes]).
alignas(64) constexpr float kStep[3 * kDotLanes] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                     1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

// 1 in the lanes l of a vector of keys from j with a <= j + l < e, 0 in the others.
TINYCHAT_INLINE Lanes live_lanes(int64_t j, int64_t a, int64_t e) {
  Lanes from, below;
  std::memcpy(&from, kStep + kDotLanes - std::clamp<int64_t>(a - j, 0, kDotLanes), sizeof(from));
  std::memcpy(&below, kStep + 2 * kDotLanes - std::clamp<int64_t>(e - j, 0, kDotLanes), sizeof(below));
  return from * below;
}

// Row i's online softmax over its scores sr[a, e) of a block (sr: the row's kKeys scores): they become
// exp(score - max), the weights p @ v sums, and the row's running max (w.m[i]), lane-wise running sum (w.l) and
// accumulator are updated. In vectors of 16 scores on the block's grid, lanes outside [a, e) masked by a 0/1 factor;
// the max of the lanes by shuffles, the sum kept in lanes until the row ends (no reduction across lanes a block).
template <Isa I>
TINYCHAT_INLINE void softmax_step(Scratch& w, int64_t i, float* sr, int64_t a, int64_t e, int64_t D) {
  const int64_t j0 = a / kDotLanes * kDotLanes;
  const float old_max = w.m[i];
  Lanes mx = Lanes{} + old_max;
  for (int64_t j = j0; j < e; j += kDotLanes) {
    Lanes x;
    std::memcpy(&x, sr + j, sizeof(x));
    const Lanes live = live_lanes(j, a, e);
    mx = max_lanes<I>(mx, x * live + (live - 1.f) * 1e30f);  // x where live (x * 1 + 0), else -1e30
  }
  mx = max_lanes<I>(mx, __builtin_shufflevector(mx, mx, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  mx = max_lanes<I>(mx, __builtin_shufflevector(mx, mx, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  mx = max_lanes<I>(mx, __builtin_shufflevector(mx, mx, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  mx = max_lanes<I>(mx, __builtin_shufflevector(mx, mx, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  const float new_max = mx[0];
  Lanes sum = {};
  for (int64_t j = j0; j < e; j += kDotLanes) {
    float p[kDotLanes];
    std::memcpy(p, sr + j, sizeof(p));
    for (int l = 0; l < kDotLanes; ++l) p[l] = exp_approx(p[l] - new_max);  // finite (clamped) where not live
    Lanes pl;
    std::memcpy(&pl, p, sizeof(pl));
    pl *= live_lanes(j, a, e);
    std::memcpy(sr + j, &pl, sizeof(pl));
    sum += pl;
  }
  const float correction = exp_approx(old_max - new_max);
  Lanes l;
  std::memcpy(&l, w.l.data() + i * kDotLanes, sizeof(l));
  l = l * correction + sum;
  std::memcpy(w.l.data() + i * kDotLanes, &l, sizeof(l));
  w.m[i] = new_max;
  if (correction != 1.f) {  // 1 exactly where the max did not move: the accumulator stays as it is
    float* acc = w.acc.data() + i * D;
    for (int64_t d = 0; d < D; ++d) acc[d] *= correction;
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
  if constexpr (std::is_same_v<KT, float>) {
    if (blk.kt > 0) j = scores_in_lanes_of<R>(q, D, blk, lo, hi, s);
  }
  if (blk.kt == 0 && D % kDotLanes == 0) {
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
    if (e[r] > a[r]) softmax_step<I>(w, i0 + r, s + r * kKeys, a[r], e[r], D);
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
// scalar_t: q and out; kv_t: the caches (scalar_t, or float16 / bfloat16 below float32 q). A float16 / bfloat16
// cache is read from the call's widened copy where there is one (a prefill), else widened in registers as it is read
// (a decode step: its groups read the cache once per step).
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
    w.first[i] = first_seen(p.pos[t], p.window);
    w.limit[i] = p.pos[t] + 1;
    first = std::min(first, w.first[i]);
    end = std::max(end, w.limit[i]);
    w.m[i] = -1e30f;  // finite: exp_approx(m_old - m_new) must give 0 on the first block, never NaN
    std::fill(w.l.begin() + i * kDotLanes, w.l.begin() + (i + 1) * kDotLanes, 0.f);
  }
  std::fill(w.acc.begin(), w.acc.begin() + rows * D, 0.f);
  // blocks from the last grid point at or before `first` (multiples of kKeys and S)
  for (int64_t j0 = std::max(first / kKeys * kKeys, first / p.S * p.S), n; j0 < end; j0 += n) {  // [j0, j0 + n)
    const int64_t row0 = j0 % p.S;  // their cache rows: [row0, row0 + n)
    n = std::min({kKeys - j0 % kKeys, p.S - row0, end - j0});
    if constexpr (!std::is_same_v<kv_t, float>) {
      if (p.wk != nullptr) {
        const int64_t head = b * p.Hkv + hk, c = row0 - p.wbase;  // the block's first column
        const Block<float> widened{p.wk + head * D * p.wcols + kLead + c, p.wv + (head * p.wrows + c) * D, 1, D, 0, 0,
                                   j0, n, p.wcols};
        attend_block<I>(p, w, widened, rows);
        continue;
      }
    }
    const Block<kv_t> cache{k + row0 * p.ks[2], v + row0 * p.vs[2], p.ks[2], p.vs[2], kKeys * p.ks[2],
                            kKeys * p.vs[2], j0, n, 0};
    attend_block<I>(p, w, cache, rows);
  }
  auto* out = static_cast<scalar_t*>(p.out) + ((b * p.T + t0) * p.H + hk * rep) * D;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = r0 + i;
    const float inv = 1.f / sum_lanes(w.l.data() + i * kDotLanes);
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

// Widens the cache rows a prefill's queries see into fp32 once for all its work items (p.wk, p.wv; a tile of
// queries had widened again each block it read), keys transposed for scores_in_lanes. A block's 16-key vectors
// start on its grid, up to kLead columns before the rows' first, and may end up to kKeys columns past their last:
// those columns are zero. wcols * 4 bytes is an odd multiple of 64, so a block's D rows of keys fall in distinct L1
// sets. Returns the buffer (the caller keeps it while the items run).
template <typename kv_t>
at::Tensor widen_caches(AttnProblem& p) {
  int64_t lo = INT64_MAX, hi = 0;  // the positions any query sees: [lo, hi)
  for (int64_t t = 0; t < p.T; ++t) {
    lo = std::min(lo, first_seen(p.pos[t], p.window));
    hi = std::max(hi, p.pos[t] + 1);
  }
  // their cache rows: one range, or every row where the positions wrap a ring
  const bool wraps = hi - lo >= p.S || lo / p.S != (hi - 1) / p.S;
  p.wbase = wraps ? 0 : lo % p.S;
  p.wrows = wraps ? p.S : hi - lo;
  p.wcols = (kLead + p.wrows + kKeys + 31) / 32 * 32 + 16;
  const int64_t heads = p.B * p.Hkv, D = p.D, W = p.wcols, chunks = (p.wrows + kKeys - 1) / kKeys;
  at::Tensor buf = at::empty({heads * D * (W + p.wrows)}, at::kFloat);
  float* wk = buf.data_ptr<float>();
  float* wv = wk + heads * D * W;
  at::parallel_for(0, heads * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(kKeys * D);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t head = u / chunks, c0 = u % chunks * kKeys, n = std::min(kKeys, p.wrows - c0);
      const int64_t b = head / p.Hkv, h = head % p.Hkv, row = p.wbase + c0;
      const auto* k = static_cast<const kv_t*>(p.k) + b * p.ks[0] + h * p.ks[1] + row * p.ks[2];
      const auto* v = static_cast<const kv_t*>(p.v) + b * p.vs[0] + h * p.vs[1] + row * p.vs[2];
      widen_rows(v, p.vs[2], n, D, wv + (head * p.wrows + c0) * D, p.isa);
      widen_rows(k, p.ks[2], n, D, rows.data(), p.isa);
      float* kt = wk + head * D * W;  // [D, W]
      for (int64_t d = 0; d < D; ++d) {
        float* col = kt + d * W + kLead + c0;
        for (int64_t j = 0; j < n; ++j) col[j] = rows[j * D + d];
        if (c0 == 0) std::fill(col - kLead, col, 0.f);
        if (c0 + n == p.wrows) std::fill(col + n, kt + (d + 1) * W, 0.f);
      }
    }
  });
  p.wk = wk;
  p.wv = wv;
  return buf;
}

template <typename scalar_t, typename kv_t>
void run_attention(AttnProblem p) {
  at::Tensor widened;  // a prefill's float16 / bfloat16 cache (head dims a multiple of kDotLanes: scores_in_lanes)
  if constexpr (!std::is_same_v<kv_t, float>) {
    if (p.T > 1 && p.D % kDotLanes == 0) widened = widen_caches<kv_t>(p);
  }
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
    const int64_t span = pos[t] + 1 - first_seen(pos[t], window);  // positions query t sees
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
    AT_DISPATCH_SWITCH(q.scalar_type(), "tinychat_attention_cpu",  // float32, bfloat16 or float16 (checks.h)
                       AT_DISPATCH_CASE(at::kFloat, [&] { run_attention<scalar_t, scalar_t>(p); })
                       AT_DISPATCH_CASE_REDUCED_FLOATING_TYPES([&] { run_attention<scalar_t, scalar_t>(p); }));
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
