// ggml tensor types that shotdb dequantizes, and their block layouts (all little-endian).
//
//   F32   1 element, 4 bytes            BF16  1 element, 2 bytes (upper half of a float32)
//   F16   1 element, 2 bytes (IEEE half)
//   Q8_0  32 elements, 34 bytes: f16 d, int8 q[32];            x[i] = d * q[i]
//   Q4_0  32 elements, 18 bytes: f16 d, uint8 qs[16];          x[j] = d * ((qs[j] & 15) - 8),
//                                                              x[j + 16] = d * ((qs[j] >> 4) - 8)
//   Q4_1  32 elements, 20 bytes: f16 d, f16 m, uint8 qs[16];   x[j] = d * (qs[j] & 15) + m,
//                                                              x[j + 16] = d * (qs[j] >> 4) + m
// Arithmetic is float32, one multiply and one add per element (no fused multiply-add), as ggml
// and the gguf Python package do, so results are bit-identical to theirs.
#ifndef SHOTDB_FORMAT_QUANT_H_
#define SHOTDB_FORMAT_QUANT_H_

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "util/status.h"

namespace shotdb {

enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ8_0 = 8,
  kBF16 = 30,
};

// True for the types above; other ggml type ids (k-quants, i-quants, ...) are not supported.
bool IsSupportedGgmlType(uint32_t raw);
// Elements per block (1 for the float types, 32 for the quantized ones).
size_t GgmlTypeBlockSize(GgmlType type);
// Bytes per block.
size_t GgmlTypeBlockBytes(GgmlType type);
// "F32", "F16", "Q4_0", "Q4_1", "Q8_0", "BF16".
std::string_view GgmlTypeName(GgmlType type);

// Converts `n` elements of `type` at `src` (any alignment) to float32. InvalidArgument if `n` is
// not a multiple of the type's block size.
Status DequantizeRow(GgmlType type, const void* src, float* dst, size_t n);

}  // namespace shotdb

#endif  // SHOTDB_FORMAT_QUANT_H_
