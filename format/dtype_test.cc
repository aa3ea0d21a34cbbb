// Checks the half and bfloat16 conversions against independent references: the compiler's
// _Float16 (IEEE binary16 arithmetic in libgcc/hardware) and a float64 computation of the
// round-to-nearest-even rule.
#include "format/dtype.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace shotdb {
namespace {

uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
uint16_t CompilerHalfBits(float f) {
  _Float16 h = static_cast<_Float16>(f);
  uint16_t u;
  std::memcpy(&u, &h, sizeof u);
  return u;
}
float CompilerHalfToFloat(uint16_t bits) {
  _Float16 h;
  std::memcpy(&h, &bits, sizeof h);
  return static_cast<float>(h);
}

TEST(DTypeTest, SizesNamesAndParsing) {
  EXPECT_EQ(DTypeSize(DType::kF64), 8u);
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kF64}) {
    EXPECT_EQ(ParseDType(DTypeName(t)), t);
    EXPECT_TRUE(IsValidDType(static_cast<uint8_t>(t)));
  }
  EXPECT_EQ(ParseDType("bfloat16"), DType::kBF16);
  EXPECT_EQ(ParseDType("float16"), DType::kF16);
  EXPECT_FALSE(ParseDType("f8").has_value());
  EXPECT_FALSE(ParseDType("").has_value());
  EXPECT_FALSE(IsValidDType(6));
  EXPECT_FALSE(IsValidDType(255));
}

TEST(DTypeTest, HalfToFloatMatchesCompilerForAllBitPatterns) {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const float ref = CompilerHalfToFloat(static_cast<uint16_t>(h));
    const float got = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(ref)) {
      EXPECT_TRUE(std::isnan(got)) << "half 0x" << std::hex << h;
      EXPECT_EQ(std::signbit(got), std::signbit(ref)) << "half 0x" << std::hex << h;
    } else {
      EXPECT_EQ(FloatBits(got), FloatBits(ref)) << "half 0x" << std::hex << h;
    }
  }
}

void ExpectFloatToHalfMatchesCompiler(float f) {
  const uint16_t ref = CompilerHalfBits(f);
  const uint16_t got = FloatToHalf(f);
  if (std::isnan(f)) {
    EXPECT_EQ(got & 0x7c00u, 0x7c00u) << "float bits 0x" << std::hex << FloatBits(f);
    EXPECT_NE(got & 0x03ffu, 0u) << "float bits 0x" << std::hex << FloatBits(f);
    EXPECT_EQ(got & 0x8000u, ref & 0x8000u) << "float bits 0x" << std::hex << FloatBits(f);
  } else {
    ASSERT_EQ(got, ref) << "float " << f << " bits 0x" << std::hex << FloatBits(f);
  }
}

TEST(DTypeTest, FloatToHalfMatchesCompilerOnEveryHalfAndEveryTie) {
  // Every finite half value, the exact midpoint to its successor (a tie: decided by even
  // mantissa), and the floats one ulp either side of the midpoint.
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    for (uint32_t sign : {0u, 0x8000u}) {
      const float v = HalfToFloat(static_cast<uint16_t>(h | sign));
      ExpectFloatToHalfMatchesCompiler(v);
      // The successor of 0x7bff is inf; the midpoint is 65520, the overflow threshold.
      const double next = h + 1 == 0x7c00 ? 65536.0 : HalfToFloat(static_cast<uint16_t>(h + 1));
      const double mid_abs = (std::fabs(static_cast<double>(v)) + next) / 2;
      const float mid = static_cast<float>(sign ? -mid_abs : mid_abs);
      ASSERT_EQ(static_cast<double>(mid), sign ? -mid_abs : mid_abs) << "midpoint not exact";
      ExpectFloatToHalfMatchesCompiler(mid);
      ExpectFloatToHalfMatchesCompiler(std::nextafter(mid, 0.0f));
      ExpectFloatToHalfMatchesCompiler(std::nextafter(mid, sign ? -1e30f : 1e30f));
    }
  }
}

TEST(DTypeTest, FloatToHalfMatchesCompilerAcrossAllFloats) {
  // A prime stride visits every exponent and a spread of mantissas, NaNs and infinities included.
  for (uint64_t u = 0; u <= 0xffffffffu; u += 4093) {
    ExpectFloatToHalfMatchesCompiler(BitsFloat(static_cast<uint32_t>(u)));
  }
  for (float f : {INFINITY, -INFINITY, NAN, -NAN, 65504.0f, 65519.996f, 65520.0f, 1e-8f, 2.9e-8f,
                  3.0e-8f, 5.96e-8f, 6.1e-5f, -0.0f}) {
    ExpectFloatToHalfMatchesCompiler(f);
  }
  ExpectFloatToHalfMatchesCompiler(BitsFloat(0x7f800001u));  // signalling NaN, payload in low bits
}

// Value of a non-negative bfloat16 bit pattern, computed from its fields in float64. Exponent 255
// is evaluated like any other exponent (0x7f80 -> 2^128), which is the value the overflow rule
// rounds towards.
double BFloat16MagnitudeRef(uint32_t bits) {
  const int exp = static_cast<int>((bits >> 7) & 0xff);
  const int mant = static_cast<int>(bits & 0x7f);
  if (exp == 0) return std::ldexp(mant, -126 - 7);
  return std::ldexp(128 + mant, exp - 127 - 7);
}

// Round-to-nearest-even of a finite float to bfloat16, decided by comparing float64 distances.
uint16_t FloatToBFloat16Ref(float f) {
  const uint32_t x = FloatBits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t lo = (x & 0x7fffffffu) >> 16;  // truncation towards zero
  const uint32_t hi = lo + 1;
  const double a = std::fabs(static_cast<double>(f));
  const double below = a - BFloat16MagnitudeRef(lo);
  const double above = BFloat16MagnitudeRef(hi) - a;
  uint32_t r;
  if (below < above) {
    r = lo;
  } else if (above < below) {
    r = hi;
  } else {
    r = (lo & 1u) ? hi : lo;
  }
  return static_cast<uint16_t>(sign | r);  // r == 0x7f80 is infinity
}

TEST(DTypeTest, BFloat16ToFloatIsExactForAllBitPatterns) {
  for (uint32_t b = 0; b <= 0xffff; ++b) {
    const float got = BFloat16ToFloat(static_cast<uint16_t>(b));
    const uint32_t mag = b & 0x7fffu;
    if (mag > 0x7f80u) {
      EXPECT_TRUE(std::isnan(got)) << std::hex << b;
    } else if (mag == 0x7f80u) {
      EXPECT_TRUE(std::isinf(got)) << std::hex << b;
    } else {
      const double ref = (b & 0x8000u) ? -BFloat16MagnitudeRef(mag) : BFloat16MagnitudeRef(mag);
      EXPECT_EQ(static_cast<double>(got), ref) << std::hex << b;
    }
    EXPECT_EQ(std::signbit(got), (b & 0x8000u) != 0) << std::hex << b;
  }
}

TEST(DTypeTest, FloatToBFloat16RoundsToNearestEvenLikeFloat64Reference) {
  // For every upper half (every bfloat16 bucket, both signs), the low halves that decide the
  // rounding: exact, just above truncation, just below / at / just above the tie, just below the
  // next value.
  const uint32_t lows[] = {0x0000, 0x0001, 0x3fff, 0x7fff, 0x8000, 0x8001, 0xc000, 0xffff};
  for (uint32_t upper = 0; upper <= 0xffff; ++upper) {
    if ((upper & 0x7fffu) >= 0x7f80u) continue;  // inf and NaN are tested below
    for (uint32_t low : lows) {
      const float f = BitsFloat((upper << 16) | low);
      ASSERT_EQ(FloatToBFloat16(f), FloatToBFloat16Ref(f))
          << "float bits 0x" << std::hex << FloatBits(f);
    }
  }
  std::mt19937 rng(7);
  for (int i = 0; i < 1000000; ++i) {
    const float f = BitsFloat(static_cast<uint32_t>(rng()));
    if (!std::isfinite(f)) continue;
    ASSERT_EQ(FloatToBFloat16(f), FloatToBFloat16Ref(f))
        << "float bits 0x" << std::hex << FloatBits(f);
  }
}

TEST(DTypeTest, FloatToBFloat16KeepsInfinitiesAndNaNs) {
  EXPECT_EQ(FloatToBFloat16(INFINITY), 0x7f80u);
  EXPECT_EQ(FloatToBFloat16(-INFINITY), 0xff80u);
  // NaNs whose payload lies only in the low 16 bits must not truncate to infinity.
  for (uint32_t nan : {0x7f800001u, 0x7fc00000u, 0xff800001u, 0x7fffffffu, 0xffc0ffffu}) {
    const uint16_t b = FloatToBFloat16(BitsFloat(nan));
    EXPECT_TRUE(std::isnan(BFloat16ToFloat(b))) << std::hex << nan;
    EXPECT_EQ(b & 0x8000u, (nan >> 16) & 0x8000u) << std::hex << nan;
    EXPECT_NE(b & 0x0040u, 0u) << "quiet bit " << std::hex << nan;
  }
}

TEST(DTypeTest, BulkConversionsMatchScalarConversionsAndRounding) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const size_t n = 1001;
  std::vector<float> src(n);
  for (float& v : src) v = normal(rng);
  src[0] = 0.0f;
  src[1] = -1e-30f;
  src[2] = 70000.0f;  // overflows f16

  std::vector<uint16_t> h(n), b(n);
  std::vector<float> back(n);
  ConvertFromFloat(DType::kF16, src.data(), h.data(), n);
  ConvertToFloat(DType::kF16, h.data(), back.data(), n);
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(h[i], CompilerHalfBits(src[i])) << i;
    ASSERT_EQ(FloatBits(back[i]), FloatBits(CompilerHalfToFloat(h[i]))) << i;
  }
  ConvertFromFloat(DType::kBF16, src.data(), b.data(), n);
  ConvertToFloat(DType::kBF16, b.data(), back.data(), n);
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(b[i], FloatToBFloat16Ref(src[i])) << i;
    ASSERT_EQ(static_cast<double>(back[i]),
              (b[i] & 0x8000u ? -1 : 1) * BFloat16MagnitudeRef(b[i] & 0x7fffu))
        << i;
  }
  std::vector<float> f32(n);
  ConvertFromFloat(DType::kF32, src.data(), f32.data(), n);
  ConvertToFloat(DType::kF32, f32.data(), back.data(), n);
  EXPECT_EQ(std::memcmp(back.data(), src.data(), n * sizeof(float)), 0);

  // float64 -> float32 must pick the nearest float: no float strictly between lies closer.
  std::vector<double> d(n);
  std::uniform_real_distribution<double> uni(-1e6, 1e6);
  for (double& v : d) v = uni(rng);
  ConvertToFloat(DType::kF64, d.data(), back.data(), n);
  for (size_t i = 0; i < n; ++i) {
    const double err = std::fabs(back[i] - d[i]);
    EXPECT_LE(err, std::fabs(std::nextafter(back[i], INFINITY) - d[i])) << i;
    EXPECT_LE(err, std::fabs(std::nextafter(back[i], -INFINITY) - d[i])) << i;
  }
  std::vector<double> wide(n);
  ConvertFromFloat(DType::kF64, src.data(), wide.data(), n);
  for (size_t i = 0; i < n; ++i) EXPECT_EQ(wide[i], static_cast<double>(src[i])) << i;
}

}  // namespace
}  // namespace shotdb
