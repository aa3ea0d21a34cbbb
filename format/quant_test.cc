#include "format/quant.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "format/dtype.h"

namespace shotdb {
namespace {

// Builds quantized blocks from explicit fields and checks each element against the layout written
// out in float64 (exact here: every product and sum is representable in float32).
TEST(QuantTest, BlockLayoutsMatchTheirDefinitions) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 50; ++trial) {
    const float d = std::ldexp(1.0f, static_cast<int>(rng() % 10) - 8);
    const float m = -std::ldexp(1.0f, static_cast<int>(rng() % 6) - 4);
    uint8_t q8[34], q40[18], q41[20];
    const uint16_t dh = FloatToHalf(d), mh = FloatToHalf(m);
    std::memcpy(q8, &dh, 2);
    std::memcpy(q40, &dh, 2);
    std::memcpy(q41, &dh, 2);
    std::memcpy(q41 + 2, &mh, 2);
    for (int j = 0; j < 32; ++j) q8[2 + j] = static_cast<uint8_t>(rng());
    for (int j = 0; j < 16; ++j) q40[2 + j] = q41[4 + j] = static_cast<uint8_t>(rng());
    float out[32];
    ASSERT_TRUE(DequantizeRow(GgmlType::kQ8_0, q8, out, 32).ok());
    for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], double(d) * static_cast<int8_t>(q8[2 + j]));
    ASSERT_TRUE(DequantizeRow(GgmlType::kQ4_0, q40, out, 32).ok());
    for (int j = 0; j < 16; ++j) {
      EXPECT_EQ(out[j], double(d) * ((q40[2 + j] & 15) - 8));
      EXPECT_EQ(out[j + 16], double(d) * ((q40[2 + j] >> 4) - 8));
    }
    ASSERT_TRUE(DequantizeRow(GgmlType::kQ4_1, q41, out, 32).ok());
    for (int j = 0; j < 16; ++j) {
      EXPECT_EQ(out[j], double(d) * (q41[4 + j] & 15) + m);
      EXPECT_EQ(out[j + 16], double(d) * (q41[4 + j] >> 4) + m);
    }
  }
}

TEST(QuantTest, SizesNamesAndErrors) {
  EXPECT_EQ(GgmlTypeBlockBytes(GgmlType::kQ4_1), 20u);
  EXPECT_EQ(GgmlTypeBlockBytes(GgmlType::kQ8_0), 34u);
  EXPECT_EQ(GgmlTypeBlockSize(GgmlType::kBF16), 1u);
  EXPECT_EQ(GgmlTypeName(GgmlType::kQ4_0), "Q4_0");
  EXPECT_FALSE(IsSupportedGgmlType(14));
  float out[40];
  uint8_t zeros[80] = {};
  EXPECT_TRUE(DequantizeRow(GgmlType::kQ8_0, zeros, out, 40).IsInvalidArgument());
}

}  // namespace
}  // namespace shotdb
