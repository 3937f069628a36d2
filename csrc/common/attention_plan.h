// Index math of the CUDA attention and rope_kv_write kernels (csrc/cuda/attention.cu, csrc/cuda/rope.cu),
// kept free of CUDA and ATen so that tests/test_attention_cuda.py can compile it with g++ alone and check it on the
// CPU: which positions a query sees and at which cache rows (sliding windows, ring caches), how decode splits the
// cache, which key tiles prefill visits and masks, and the mma.sync / ldmatrix fragment coordinates of the prefill
// kernel.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TC_HD __host__ __device__ __forceinline__
#else
#define TC_HD inline
#endif

namespace tinychat {
namespace attn {

// ---- positions ----

// The positions a query at position p sees, [first, first + count): max(0, p - window + 1) .. p (window 0: 0 .. p),
// position j read at cache row cache_row(j, S) (below). The kernels never check positions on the host: a negative
// p counts as 0, and a query that would see more than S positions (window 0: p >= S; a ring shorter than the
// window) sees the latest S, each row once. count is in [1, S].
struct KeyRange {
  int64_t first, count;
};
TC_HD KeyRange visible_range(int64_t p, int64_t window, int64_t S) {
  const int64_t last = p < 0 ? 0 : p;
  int64_t first = window > 0 && last - window + 1 > 0 ? last - window + 1 : 0;
  if (last - first + 1 > S) first = last - S + 1;
  return {first, last - first + 1};
}

// rope_kv_write touches a token only when its position indexes cos_sin.
TC_HD bool rope_position_ok(int64_t p, int64_t max_pos) { return p >= 0 && p < max_pos; }

// The cache row of position p >= 0 in a cache of S rows: p itself in a cache longer than every position, a ring's
// row otherwise (sliding-window layers).
TC_HD int64_t cache_row(int64_t p, int64_t S) { return p % S; }

// The cache row of the key i of a run of keys whose first one is at row row0 (< S), i < S: row0 + i, wrapped.
TC_HD int64_t ring_row(int64_t row0, int64_t i, int64_t S) { return row0 + i < S ? row0 + i : row0 + i - S; }

// What head hh of qkv [B, T, H + 2 Hkv, D] is: 0 query, 1 key, 2 value.
TC_HD int qkv_head_kind(int64_t hh, int64_t H, int64_t Hkv) { return hh < H ? 0 : (hh < H + Hkv ? 1 : 2); }

// ---- decode (split-KV, "flash-decoding") ----

constexpr int kDecodeKeyAlign = 64;      // a split's chunk of keys is a multiple of this
constexpr int kDecodeMinChunk = 64;      // and at least this many keys: one step of a block (a small model's
                                         // few kv heads need the splits: SmolLM2, 3 kv heads, 2048 keys: 96 blocks)
constexpr int kDecodeMaxSplits = 256;    // the combine kernel reads at most this many partials per row
constexpr int kDecodeBlocksPerSm = 4;    // splits are added until the grid is about this many blocks per SM

// How many query heads one decode block serves (<= kMaxHeadsPerBlock): the GQA group size G = H / Hkv rounded up
// to 1, 2, 4 or 8, the compiled variants; larger groups take ceil(G / 8) blocks per kv head.
constexpr int kMaxHeadsPerBlock = 8;
TC_HD int decode_heads_per_block(int64_t group) {
  return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8;
}

struct DecodePlan {
  int heads_per_block;  // query heads per block (a compiled variant)
  int head_blocks;      // blocks per kv head: ceil(G / heads_per_block)
  int splits;           // chunks of the cache, one block each (grid.z)
  int64_t chunk;        // keys per chunk, a multiple of kDecodeKeyAlign; splits * chunk >= S
};

// Chosen from shapes only (the allocated cache size S, never the runtime length), so a captured CUDA graph stays
// valid while positions change. rows = B * T (query tokens), num_sms = the GPU's multiprocessors.
TC_HD DecodePlan decode_plan(int64_t rows, int64_t Hkv, int64_t group, int64_t S, int64_t num_sms) {
  DecodePlan p;
  p.heads_per_block = decode_heads_per_block(group);
  p.head_blocks = static_cast<int>((group + p.heads_per_block - 1) / p.heads_per_block);
  const int64_t base_blocks = rows * Hkv * p.head_blocks;
  const int64_t target = (num_sms > 0 ? num_sms : 1) * kDecodeBlocksPerSm;
  int64_t want = (target + base_blocks - 1) / base_blocks;  // splits to fill the GPU
  const int64_t most = (S + kDecodeMinChunk - 1) / kDecodeMinChunk;  // splits of at least kDecodeMinChunk keys
  if (want > most) want = most;
  if (want > kDecodeMaxSplits) want = kDecodeMaxSplits;
  if (want < 1) want = 1;
  int64_t chunk = (S + want - 1) / want;
  chunk = (chunk + kDecodeKeyAlign - 1) / kDecodeKeyAlign * kDecodeKeyAlign;
  p.chunk = chunk;
  p.splits = static_cast<int>((S + chunk - 1) / chunk);  // rounding the chunk up may leave fewer splits
  return p;
}

// Splits holding at least one of the n visible keys: the others' blocks exit at once and the combine skips them.
TC_HD int64_t decode_active_splits(int64_t n, int64_t chunk) { return (n + chunk - 1) / chunk; }

// Keys [begin, end) of split s for a query that sees n keys (empty when begin >= end).
TC_HD int64_t split_begin(int64_t s, int64_t chunk) { return s * chunk; }
TC_HD int64_t split_end(int64_t s, int64_t chunk, int64_t n) {
  const int64_t e = (s + 1) * chunk;
  return e < n ? e : n;
}

// ---- prefill (tensor cores) ----

constexpr int kPrefillRows = 64;  // query rows per block (4 warps x 16)
constexpr int kPrefillKeys = 64;  // keys per K/V tile
constexpr int kPrefillWarps = 4;
constexpr int kSmemPad = 8;       // elements of padding per shared-memory row (keeps ldmatrix conflict-free)

// A block's key tiles cover the positions [first, last] its rows see (first: the smallest first position among its
// rows' visible_range, last: the largest position), tile i holding positions first + 64 i .. first + 64 i + 63;
// positions outside it are skipped (causal and sliding-window tile skipping).
TC_HD int64_t prefill_key_tiles(int64_t first, int64_t last) {
  return (last - first + 1 + kPrefillKeys - 1) / kPrefillKeys;
}

// A tile starting at position tile_first needs the per-element mask unless every row of the warp sees all of it
// (first_max: the largest first position among the warp's rows, last_min: the smallest last one).
TC_HD bool prefill_tile_needs_mask(int64_t tile_first, int64_t first_max, int64_t last_min) {
  return tile_first < first_max || tile_first + kPrefillKeys - 1 > last_min;
}

// A warp skips the math of a tile outside the positions its 16 rows see (first_min .. last_max; it still helps load
// it).
TC_HD bool prefill_warp_skips_tile(int64_t tile_first, int64_t first_min, int64_t last_max) {
  return tile_first + kPrefillKeys - 1 < first_min || tile_first > last_max;
}

// Element offset of (row, col) in a shared-memory tile of rows of D elements, padded to D + kSmemPad.
TC_HD int smem_offset(int row, int col, int D) { return row * (D + kSmemPad) + col; }

// The prefill block's shared memory, in rows of D + kSmemPad 16-bit elements: K of stage 0, V of stage 0, K of
// stage 1, V of stage 1 (kPrefillKeys rows each). Q (kPrefillRows rows) is read into registers at the first tile
// only, so it lives in stage 1's K slot, which the block fills with tile 1 after that read: 4 tiles instead of 5
// (D = 128: 68 KB, so two blocks fit in an A100's 164 KB per SM).
static_assert(kPrefillRows <= kPrefillKeys, "Q fits in one K/V tile's slot");
TC_HD int prefill_k_row(int stage) { return 2 * stage * kPrefillKeys; }      // first row of stage's K tile
TC_HD int prefill_v_row(int stage) { return (2 * stage + 1) * kPrefillKeys; }  // first row of stage's V tile
TC_HD int prefill_q_row() { return prefill_k_row(1); }
TC_HD int prefill_smem_bytes(int D) { return 4 * kPrefillKeys * (D + kSmemPad) * 2; }

// mma.sync m16n8k16 fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"), for lane in [0, 32).
// Accumulator C/D (16 x 8, fp32): element i in [0, 4) of a lane sits at row c_row, column c_col.
TC_HD int mma_c_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
TC_HD int mma_c_col(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

// ldmatrix.x4 addresses: the (row, col) of the 8-element row segment that `lane` points at.
// A operand (16 x 16 tile of Q, row-major [row][d]): registers {a0..a3} = rows 0-7/8-15 x cols 0-7/8-15.
TC_HD int ldsm_a_row(int lane) { return lane & 15; }
TC_HD int ldsm_a_col(int lane) { return (lane >> 4) * 8; }
// B operand of S = Q K^T from K stored [key][d], no transpose: registers {b0, b1} of the n-tile of keys 0-7 and
// {b0, b1} of keys 8-15, for a 16-wide slice of d.
TC_HD int ldsm_k_row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
TC_HD int ldsm_k_col(int lane) { return ((lane >> 3) & 1) * 8; }
// B operand of O = P V from V stored [key][d], with .trans: registers {b0, b1} of the n-tile of d 0-7 and {b0, b1}
// of d 8-15, for a 16-deep slice of keys.
TC_HD int ldsm_v_row(int lane) { return (lane & 7) + (((lane >> 3) & 1) << 3); }
TC_HD int ldsm_v_col(int lane) { return (lane >> 4) * 8; }

}  // namespace attn
}  // namespace tinychat
