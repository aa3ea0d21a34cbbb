// Stored K/V values: the raw payload layout of a block record's tensor for each dtype, and its
// conversion to and from float32.
//
// A block record holds one layer's K or V of one block, [kv_heads, tokens, head_dim] row-major.
// Its raw payload (what the record checksum covers, before the codec) is
//   - kF32, kF16, kBF16, kF64: the elements, little-endian;
//   - kF8E4M3 (scaled fp8): kv_heads float32 scales, little-endian, then the elements as e4m3
//     codes; element value = Fp8E4M3ToFloat(code) * scale[head]. The scale of a head is
//     amax / 448 over that head's elements (448 is e4m3's largest finite value), or 1 for a head
//     of zeros, so each head uses the whole fp8 range. One scale per (block, layer, K/V, head):
//     half the bytes of bf16 on disk, in the page cache's staging and over PCIe.
//   - kI8 (scaled int8): the tokens fall in groups of kI8TokenGroup (128; the last may be
//     shorter); kv_heads * groups * head_dim bfloat16 scales, little-endian, row-major
//     [head][group][channel], then the elements as int8 codes in [-127, 127]; element value =
//     code * scale[head][token / 128][channel] (exact in float32: 7 significant bits times 8).
//     A scale is amax / 127 over its channel's values in its group of tokens, rounded up to
//     bfloat16, or 1 for a channel of zeros. A channel whose values are all large (pre-RoPE keys
//     have such outlier channels) keeps a relative error near 2^-8, where fp8's is up to 2^-4 for
//     every value; the token groups keep a long block's rare large value from coarsening the
//     whole channel. Bytes: the codes, plus 2 * kv_heads * head_dim per group (2% of the codes
//     for blocks of 95 tokens, 1.6% for long ones).
// All functions are pure and thread-safe; pointers may have any alignment.
#ifndef SHOTDB_FORMAT_KV_VALUES_H_
#define SHOTDB_FORMAT_KV_VALUES_H_

#include <cstddef>
#include <cstdint>
#include <optional>

#include "format/dtype.h"
#include "util/status.h"

namespace shotdb {

constexpr float kFp8E4M3Max = 448.0f;

constexpr float kI8Max = 127.0f;
constexpr uint32_t kI8TokenGroup = 128;  // tokens per kI8 scale

// kI8's token groups in a record of `tokens`: ceil(tokens / kI8TokenGroup). constexpr, so the
// unpacking kernel (gpu/unpack_kv.cu, built with --expt-relaxed-constexpr) calls it too.
constexpr uint64_t KvI8Groups(uint32_t tokens) {
  return (uint64_t{tokens} + kI8TokenGroup - 1) / kI8TokenGroup;
}

// Bytes of the scales in front of the elements: 4 * kv_heads for kF8E4M3,
// 2 * kv_heads * KvI8Groups(tokens) * head_dim for kI8, else 0.
inline uint64_t KvScaleBytes(DType dtype, uint32_t kv_heads, uint32_t tokens, uint32_t head_dim) {
  return dtype == DType::kF8E4M3 ? uint64_t{4} * kv_heads
         : dtype == DType::kI8   ? uint64_t{2} * kv_heads * KvI8Groups(tokens) * head_dim
                                 : 0;
}

// Raw payload bytes of a [kv_heads, tokens, head_dim] tensor (scales included), or nullopt if it
// overflows 64 bits.
std::optional<uint64_t> KvRawBytes(DType dtype, uint32_t kv_heads, uint32_t tokens,
                                   uint32_t head_dim);

// Converts the raw payload of a [kv_heads, tokens, head_dim] tensor to float32 (dst holds
// kv_heads * tokens * head_dim floats). Float dtypes convert exactly (f64 rounds to nearest);
// kF8E4M3 multiplies each code's value by its head's scale in float32 (one rounding); kI8 each
// code by its channel's scale in its token group (exact).
void KvToFloat(DType dtype, uint32_t kv_heads, uint32_t tokens, uint32_t head_dim, const void* raw,
               float* dst);

// Writes the raw payload (KvRawBytes bytes at `raw`) of the float32 tensor `src`
// ([kv_heads, tokens, head_dim]). Float dtypes round to nearest even. The scaled dtypes pick the
// scales (above) and store FloatToFp8E4M3(x / scale) or FloatToI8(x / scale) for every element x.
// InvalidArgument (naming the head, token and channel) if the dtype is scaled and a value is not
// finite, since no scale represents it; on error the contents of `raw` are unspecified.
Status KvFromFloat(DType dtype, uint32_t kv_heads, uint32_t tokens, uint32_t head_dim,
                   const float* src, void* raw);

}  // namespace shotdb

#endif  // SHOTDB_FORMAT_KV_VALUES_H_
