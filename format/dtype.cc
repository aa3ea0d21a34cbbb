#include "format/dtype.h"

#include <array>
#include <cmath>
#include <limits>

namespace shotdb {

std::string_view DTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "f32";
    case DType::kF16:
      return "f16";
    case DType::kBF16:
      return "bf16";
    case DType::kF64:
      return "f64";
    case DType::kF8E4M3:
      return "f8e4m3";
    case DType::kI8:
      return "i8";
  }
  return "?";
}

std::optional<DType> ParseDType(std::string_view name) {
  if (name == "f64" || name == "float64") return DType::kF64;
  if (name == "f32" || name == "float32") return DType::kF32;
  if (name == "f16" || name == "float16") return DType::kF16;
  if (name == "bf16" || name == "bfloat16") return DType::kBF16;
  if (name == "f8e4m3" || name == "fp8" || name == "float8_e4m3fn") return DType::kF8E4M3;
  if (name == "i8" || name == "int8") return DType::kI8;
  return std::nullopt;
}

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: value = mant * 2^-24, exactly representable in float32
      float f = std::ldexp(static_cast<float>(mant), -24);
      std::memcpy(&bits, &f, sizeof bits);
      bits |= sign;
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {                        // below the smallest normal half (2^-14)
    // Subnormal or zero: scale to units of 2^-24 and round to nearest even.
    float a;
    std::memcpy(&a, &abs, sizeof a);
    float scaled = a * 16777216.0f;    // 2^24, exact
    float r = std::nearbyint(scaled);  // default rounding mode is to-nearest-even
    return sign | static_cast<uint16_t>(r);
  }
  // Normal: rebias exponent and round the 13 dropped mantissa bits to nearest even.
  uint32_t m = abs + 0xc8000000u;  // exponent - 112 (127 - 15) in the exponent field
  uint32_t round_bit = 0x1000u, sticky = 0x0fffu;
  uint32_t out = m >> 13;
  if ((m & round_bit) && ((m & sticky) || (out & 1u))) ++out;
  return sign | static_cast<uint16_t>(out);
}

uint16_t FloatToBFloat16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  uint32_t lsb = (x >> 16) & 1u;
  x += 0x7fffu + lsb;
  return static_cast<uint16_t>(x >> 16);
}

namespace {

float Fp8E4M3Value(uint8_t code) {
  const bool negative = (code & 0x80u) != 0;
  const int exp = (code >> 3) & 0xf;
  const int mant = code & 0x7;
  float v;
  if (exp == 0xf && mant == 0x7) {
    v = std::numeric_limits<float>::quiet_NaN();
  } else if (exp == 0) {
    v = std::ldexp(static_cast<float>(mant), -9);  // subnormal: mant/8 * 2^-6
  } else {
    v = std::ldexp(static_cast<float>(8 + mant), exp - 10);  // (1 + mant/8) * 2^(exp-7)
  }
  return negative ? -v : v;
}

}  // namespace

float Fp8E4M3ToFloat(uint8_t code) {
  // A table: the conversion runs once per stored element when fp8 K/V are read on the host.
  static const std::array<float, 256> kTable = [] {
    std::array<float, 256> t{};
    for (int c = 0; c < 256; ++c) t[c] = Fp8E4M3Value(static_cast<uint8_t>(c));
    return t;
  }();
  return kTable[code];
}

namespace {

// Element i of an array that may sit at any address (e.g. inside a memory-mapped file).
template <typename T>
T LoadUnaligned(const void* base, size_t i) {
  T v;
  std::memcpy(&v, static_cast<const unsigned char*>(base) + i * sizeof(T), sizeof(T));
  return v;
}

}  // namespace

void ConvertToFloat(DType from, const void* src, float* dst, size_t n) {
  switch (from) {
    case DType::kF32:
      if (n > 0) std::memcpy(dst, src, n * sizeof(float));  // memcpy of null is UB even for 0
      return;
    case DType::kF16:
      for (size_t i = 0; i < n; ++i) dst[i] = HalfToFloat(LoadUnaligned<uint16_t>(src, i));
      return;
    case DType::kBF16:
      for (size_t i = 0; i < n; ++i) dst[i] = BFloat16ToFloat(LoadUnaligned<uint16_t>(src, i));
      return;
    case DType::kF64:
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(LoadUnaligned<double>(src, i));
      return;
    case DType::kF8E4M3: {
      const auto* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = Fp8E4M3ToFloat(s[i]);
      return;
    }
    case DType::kI8: {
      const auto* s = static_cast<const int8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = s[i];
      return;
    }
  }
}

void ConvertFromFloat(DType to, const float* src, void* dst, size_t n) {
  switch (to) {
    case DType::kF32:
      if (n > 0) std::memcpy(dst, src, n * sizeof(float));  // memcpy of null is UB even for 0
      return;
    case DType::kF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = FloatToHalf(src[i]);
      return;
    }
    case DType::kBF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = FloatToBFloat16(src[i]);
      return;
    }
    case DType::kF64: {
      auto* d = static_cast<double*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = src[i];
      return;
    }
    case DType::kF8E4M3: {
      auto* d = static_cast<uint8_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = FloatToFp8E4M3(src[i]);
      return;
    }
    case DType::kI8: {
      auto* d = static_cast<int8_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = FloatToI8(src[i]);
      return;
    }
  }
}

}  // namespace shotdb
