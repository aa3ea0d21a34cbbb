// Element types of stored tensors, and exact conversions between the 16-bit floats and float32.
//
// The numeric values of DType are part of the on-disk block format (docs/format.md): never
// renumber.
#ifndef SHOTDB_FORMAT_DTYPE_H_
#define SHOTDB_FORMAT_DTYPE_H_

#include <cmath>
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
  // OCP fp8 E4M3 ("e4m3fn": 4 exponent bits of bias 7, 3 mantissa bits, no infinities, 0x7f and
  // 0xff are NaN, largest finite value 448). Stored K/V of this type carry one float32 scale per
  // kv head in front of the elements (format/kv_values.h); the element conversions below are
  // unscaled.
  kF8E4M3 = 4,
  // Two's-complement int8 codes in [-127, 127]. Stored K/V of this type carry one bfloat16 scale
  // per (kv head, group of 128 tokens, channel) in front of the elements (format/kv_values.h);
  // the element conversions below are unscaled.
  kI8 = 5,
};

// Bytes per element: 8 for kF64, 4 for kF32, 2 for the 16-bit types, 1 for kF8E4M3 and kI8.
inline size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF64:
      return 8;
    case DType::kF32:
      return 4;
    case DType::kF16:
    case DType::kBF16:
      return 2;
    case DType::kF8E4M3:
    case DType::kI8:
      return 1;
  }
  return 0;
}
// "f64", "f32", "f16", "bf16", "f8e4m3", "i8".
std::string_view DTypeName(DType t);
// Parses "f64"/"float64", "f32"/"float32", "f16"/"float16", "bf16"/"bfloat16",
// "f8e4m3"/"fp8"/"float8_e4m3fn", "i8"/"int8"; nullopt otherwise.
std::optional<DType> ParseDType(std::string_view name);
// True if `raw` is one of the enumerators (used when validating a header byte).
inline bool IsValidDType(uint8_t raw) { return raw <= static_cast<uint8_t>(DType::kI8); }
// True for the scaled storage dtypes (kF8E4M3, kI8): their K/V records hold codes that are values
// only with the scales in front of them (format/kv_values.h). They are never compute dtypes, and
// plain arrays cannot carry them.
inline bool IsScaledDType(DType t) { return t == DType::kF8E4M3 || t == DType::kI8; }

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

// fp8 E4M3 -> float32 (exact; 0x7f and 0xff give NaN).
float Fp8E4M3ToFloat(uint8_t code);
// float32 -> fp8 E4M3, round to nearest even. Finite values beyond the largest code saturate to
// +-448 (the format has no infinity; this is also what CUDA's __nv_cvt_float_to_fp8 with
// __NV_SATFINITE does); infinities saturate too, NaN gives 0x7f (with its sign bit). Inline: the
// pool encoder calls it once per stored element.
inline uint8_t FloatToFp8E4M3(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint8_t sign = static_cast<uint8_t>((x >> 24) & 0x80u);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7fu;   // NaN
  if (abs >= 0x43e80000u) return sign | 0x7eu;  // >= 464, rounds past 448: saturate
  if (abs < 0x3c800000u) {                      // below the smallest normal (2^-6): units of 2^-9
    // Adding 2^14, whose float32 ulp is 2^-9, makes the FPU round to nearest even in those units;
    // the low mantissa bits are then the code (8 is the smallest normal, 0x08).
    float a;
    std::memcpy(&a, &abs, sizeof a);
    const float shifted = a + 16384.0f;
    uint32_t bits;
    std::memcpy(&bits, &shifted, sizeof bits);
    return sign | static_cast<uint8_t>(bits - 0x46800000u);
  }
  // Normal: float32 exponent e (2^-6 <= a < 464) -> e4m3 exponent e + 7; round the 20 dropped
  // mantissa bits to nearest even. A carry out of the mantissa bumps the exponent, as it should.
  const uint32_t m = abs - ((127u - 7u) << 23);
  const uint32_t rest = m & 0xfffffu;
  const uint32_t out = (m >> 20) + ((rest > 0x80000u || (rest == 0x80000u && ((m >> 20) & 1u))));
  return sign | static_cast<uint8_t>(out);
}

// float32 -> int8 code, round to nearest even (the default rounding mode), saturating to
// [-127, 127] (symmetric: -128 is never written); NaN gives 0.
inline int8_t FloatToI8(float f) {
  if (!(f == f)) return 0;
  const float c = f > 127.f ? 127.f : f < -127.f ? -127.f : f;
  // Adding 1.5 * 2^23, whose float32 ulp is 1, makes the FPU round |c| <= 127 to an integer, to
  // nearest even: std::nearbyint's result in the default mode, without its call into libm (which
  // saves and restores the floating-point environment: ~9 ns an element, most of a pool build's
  // quantisation).
  constexpr float kRound = 12582912.0f;
  return static_cast<int8_t>((c + kRound) - kRound);
}

// Converts `n` elements of type `from` at `src` to float32 at `dst` (kF64 rounds to nearest; kI8
// is exact).
// `src` may have any alignment (e.g. a record inside a memory-mapped file).
void ConvertToFloat(DType from, const void* src, float* dst, size_t n);
// Converts `n` float32 values to type `to` at `dst` (rounding to nearest even for 16-bit types;
// kI8 rounds to nearest even and saturates to [-127, 127], NaN giving 0).
void ConvertFromFloat(DType to, const float* src, void* dst, size_t n);

}  // namespace shotdb

#endif  // SHOTDB_FORMAT_DTYPE_H_
