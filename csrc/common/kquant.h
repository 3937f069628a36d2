// ggml's K-quant superblocks (Q4_K, Q5_K) as group parameters of int4_linear / int8_linear: scales uint8
// [N, K/256, kSuperBytes], offsets None, group size 32. Superblock j of a row (input channels 256 j .. 256 j + 255,
// groups 8 j .. 8 j + 7) holds fp16 d (bytes 0..1), fp16 dmin (2..3), the groups' 6-bit scales sc (kScaleAt ..) and
// mins mn (kMinAt ..); group i of it has s = d * sc[i] and m = -(dmin * mn[i]), both exact in fp32 (11 + 6 bits), as
// ggml computes them. 148 bytes per 256 4-bit weights, against Q4_K's 144 (tinychat/io/gguf_blocks.py).
#pragma once

namespace tinychat {
namespace kq {

constexpr int kGroup = 32;         // input channels per group
constexpr int kSuperGroups = 8;    // groups per superblock
constexpr int kSuperBytes = 20;    // bytes of parameters per superblock
constexpr int kDminAt = 2;         // byte offset of dmin
constexpr int kScaleAt = 4;        // of sc[0]
constexpr int kMinAt = 12;         // of mn[0]

}  // namespace kq
}  // namespace tinychat
