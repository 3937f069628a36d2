// Index and bit helpers of the int4 op layout (tinychat/int4_layout.py, "The op layout") and of the GEMV's x tile in
// shared memory, shared by the CUDA kernels (csrc/cuda/int4_linear.cu) and CPU tests (tests/test_int4_linear_cuda.py)
// that hold them against pack_int4_op / unpack_int4_op and count the tile's shared-memory bank wavefronts. Plain
// C++ (no torch, no CUDA headers): every function is __host__ __device__ under nvcc and a plain inline function
// under a host compiler.
//
// Layout: qweight uint8 [N, K/2]; each row in blocks of 32 input channels (16 bytes). Byte j (0..15) of block b
// holds channel 32b + j in its low nibble and channel 32b + 16 + j in its high nibble.
//
// Nibble pairs. The kernels never extract one nibble at a time: from a 32-bit word w of packed bytes they take
// (w >> shift) & 0x000F000F, two 4-bit values at bits 0..3 and 16..19 (from bytes shift/8 % 2 and shift/8 % 2 + 2,
// low nibbles for shift 0 and 8, high nibbles for shift 4 and 12). OR-ing in the exponent bits of 1024 (fp16) or
// 128 (bf16) turns the pair into two 16-bit floats 1024 + q or 128 + q (the significand has room for 4 bits at
// unit scale), which one subtraction makes exact q.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define TC_HD __host__ __device__ __forceinline__
#else
#define TC_HD inline
#endif

namespace tinychat {
namespace q4 {

constexpr int kBlock = 32;       // input channels per block of the layout
constexpr int kBlockBytes = 16;  // bytes per block

// Byte of a qweight row holding input channel k, and the shift of its nibble in that byte.
TC_HD int64_t byte_of(int64_t k) { return (k / kBlock) * kBlockBytes + (k % (kBlock / 2)); }
TC_HD int shift_of(int64_t k) { return (k % kBlock) >= kBlock / 2 ? 4 : 0; }

// q[n, k] from row n of qweight (0..15).
TC_HD uint32_t nibble(const uint8_t* row, int64_t k) { return (row[byte_of(k)] >> shift_of(k)) & 0xFu; }

// W[n, k] in fp32 from its 4-bit value and its group's scale and offset (the op's definition, in fp32: q * s + m).
TC_HD float dequant(uint32_t q, float scale, float offset) { return static_cast<float>(q) * scale + offset; }

// ---- nibble pairs ----

constexpr uint32_t kPairMask = 0x000F000Fu;
constexpr uint32_t kFp16Magic = 0x64006400u;  // two fp16 1024.0; | q gives 1024 + q
constexpr uint32_t kBf16Magic = 0x43004300u;  // two bf16 128.0; | q gives 128 + q
constexpr float kFp16MagicValue = 1024.f;
constexpr float kBf16MagicValue = 128.f;

// The pair at `shift` (0, 4, 8 or 12) of a 32-bit word: two values at bits 0..3 (half 0) and 16..19 (half 1).
TC_HD uint32_t pair_bits(uint32_t word, int shift) { return (word >> shift) & kPairMask; }
// Byte of the word (0..3) that half h (0 or 1) of the pair at `shift` comes from, and whether it is the high nibble.
TC_HD int pair_byte(int shift, int half) { return ((shift >> 3) & 1) + 2 * half; }
TC_HD bool pair_is_high(int shift) { return (shift & 4) != 0; }

// GEMV: a 16-byte block read as 4 little-endian words; byte c of word i is byte 4i + c of the block. The input
// channel (0..31, within the block) of half h of the pair at `shift` of word i.
TC_HD int gemv_channel(int word, int shift, int half) {
  return (pair_is_high(shift) ? kBlock / 2 : 0) + 4 * word + pair_byte(shift, half);
}

// GEMV, fp32 math: the pair at `shift` moved to bits 6..9 and 22..25, the top of each fp16 significand. OR-ed with
// two fp16 1.0 it is two fp16 1 + q/16, exact, which widen to fp32 with one conversion each and no subtraction: the
// kernel accumulates sum (1 + q/16) x and takes out the offset once per block (sum q x = 16 (that - sum x)).
constexpr uint32_t kUnitPairMask = 0x03C003C0u;
constexpr uint32_t kUnitMagic = 0x3C003C00u;  // two fp16 1.0
constexpr float kUnitScale = 16.f;             // q = kUnitScale * (value - 1)
TC_HD uint32_t unit_pair_bits(uint32_t word, int shift) {
  return (shift <= 6 ? word << (6 - shift) : word >> (shift - 6)) & kUnitPairMask;
}

// Tensor-core GEMM (mma.m16n8k16, B operand "col"): lane t = lane % 4 of a quad holds, for its output channel, the
// k indices 2t, 2t+1 (register 0) and 2t+8, 2t+9 (register 1) of a 16-wide k step. In one 32-channel block those
// are the low nibbles (k step 0) or the high nibbles (k step 1) of bytes 2t, 2t+1, 2t+8, 2t+9. mma_b_word takes
// lo = bytes 2t, 2t+1 and hi = bytes 2t+8, 2t+9 (each a little-endian uint16) and interleaves them into the word
// [2t, 2t+8, 2t+1, 2t+9], so that register `reg` of k step `step` is the pair at shift mma_b_shift(step, reg).
TC_HD uint32_t mma_b_word(uint32_t lo, uint32_t hi) {
  return (lo & 0xFFu) | ((hi & 0xFFu) << 8) | ((lo & 0xFF00u) << 8) | ((hi & 0xFF00u) << 16);
}
TC_HD int mma_b_shift(int step, int reg) { return 4 * step + 8 * reg; }
// The input channel (0..31, within the block) of half h of register `reg` of k step `step`, for quad lane t.
TC_HD int mma_b_channel(int t, int step, int reg, int half) { return 16 * step + 2 * t + 8 * reg + half; }

// ---- GEMV: the x tile in shared memory ----
//
// The GEMV stages a chunk of x (MB rows, `blocks` 32-channel blocks) as fp32 and lane l of a warp reads blocks l,
// l + 32, ...: in one load every lane reads the same 16-byte piece (channels 4p .. 4p + 3) of its own block. So the
// tile is stored piece-major: word (m, piece, blk) at float4 index (m * 8 + piece) * stride + blk, and the lanes of a
// warp read 32 consecutive 16-byte words (4 wavefronts, the minimum for a 128-bit load; a block-major tile, 128
// bytes between lanes, takes 32). The stride is odd so that the staging stores, where the 4 lanes of a block write
// pieces 2j and 2j + 1, fall in distinct banks too. After the tile: the sum of x over each block, fp32 [MB, blocks].
constexpr int kGemvPieces = kBlock / 4;  // 16-byte (4-float) pieces of x per block
TC_HD int gemv_x_stride(int blocks) { return blocks | 1; }
TC_HD int gemv_x_word(int m, int piece, int blk, int blocks) {
  return (m * kGemvPieces + piece) * gemv_x_stride(blocks) + blk;
}
TC_HD int gemv_xsum_index(int m, int blk, int blocks) { return m * blocks + blk; }  // floats after the tile
TC_HD int gemv_smem_bytes(int MB, int blocks) {
  return MB * kGemvPieces * gemv_x_stride(blocks) * 16 + MB * blocks * 4;
}
// The most blocks of K (K / 32 at most) whose tile for MB rows fits in `budget` bytes.
TC_HD int gemv_chunk_blocks(int MB, int K, int budget) {
  int blocks = (budget / MB - kGemvPieces * 16) / (kGemvPieces * 16 + 4);  // stride <= blocks + 1
  if (blocks > K / kBlock) blocks = K / kBlock;
  while (blocks > 1 && gemv_smem_bytes(MB, blocks) > budget) --blocks;
  return blocks;
}

}  // namespace q4
}  // namespace tinychat
