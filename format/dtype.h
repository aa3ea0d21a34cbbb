// Element types of stored tensors, and exact conversions between the 16-bit floats and float32.
//
// The numeric values of DType are part of the on-disk block format (docs/format.md): never
// renumber.
#ifndef SHOTDB_FORMAT_DTYPE_H_
#define SHOTDB_FORMAT_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace shotdb {

enum class DType : uint8_t {
  kF32 = 0,
  kF16 = 1,
  kBF16 = 2,
  kF64 = 3,  // exactness tests and float64 reference runs
};

// Bytes per element: 8 for kF64, 4 for kF32, 2 for the 16-bit types.
inline size_t DTypeSize(DType t) { return t == DType::kF64 ? 8 : t == DType::kF32 ? 4 : 2; }
// "f64", "f32", "f16", "bf16".
std::string_view DTypeName(DType t);
// Parses "f64"/"float64", "f32"/"float32", "f16"/"float16", "bf16"/"bfloat16"; nullopt otherwise.
std::optional<DType> ParseDType(std::string_view name);
// True if `raw` is one of the enumerators (used when validating a header byte).
inline bool IsValidDType(uint8_t raw) { return raw <= static_cast<uint8_t>(DType::kF64); }

// IEEE binary16 -> float32 (exact, handles subnormals, inf and NaN).
float HalfToFloat(uint16_t h);
// float32 -> IEEE binary16, round to nearest even (overflow becomes inf, NaN stays NaN).
uint16_t FloatToHalf(float f);

// bfloat16 -> float32 (exact: the upper 16 bits of a float32).
inline float BFloat16ToFloat(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
// float32 -> bfloat16, round to nearest even; NaN stays a quiet NaN.
uint16_t FloatToBFloat16(float f);

// Converts `n` elements of type `from` at `src` to float32 at `dst` (kF64 rounds to nearest).
// `src` may have any alignment (e.g. a record inside a memory-mapped file).
void ConvertToFloat(DType from, const void* src, float* dst, size_t n);
// Converts `n` float32 values to type `to` at `dst` (rounding to nearest even for 16-bit types).
void ConvertFromFloat(DType to, const float* src, void* dst, size_t n);

}  // namespace shotdb

#endif  // SHOTDB_FORMAT_DTYPE_H_
