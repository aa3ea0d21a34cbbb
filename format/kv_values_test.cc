// fp8 E4M3 element conversions and the scaled K/V layout, against goldens made by ml_dtypes
// (tests/scripts/make_fp8_golden.py) and against the rules of docs/format.md.
#include "format/kv_values.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "format/block_record.h"
#include "format/dtype.h"

namespace shotdb {
namespace {

nlohmann::json LoadGolden() {
  std::ifstream in(std::string(SHOTDB_SOURCE_DIR) + "/tests/fixtures/format/fp8_e4m3_golden.json");
  std::stringstream ss;
  ss << in.rdbuf();
  return nlohmann::json::parse(ss.str());
}

float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

TEST(Fp8Test, DTypeNamesAndSize) {
  EXPECT_EQ(DTypeSize(DType::kF8E4M3), 1u);
  EXPECT_EQ(DTypeName(DType::kF8E4M3), "f8e4m3");
  EXPECT_EQ(ParseDType("f8e4m3"), DType::kF8E4M3);
  EXPECT_EQ(ParseDType("fp8"), DType::kF8E4M3);
  EXPECT_EQ(ParseDType("float8_e4m3fn"), DType::kF8E4M3);
  EXPECT_TRUE(IsValidDType(4));
  EXPECT_FALSE(IsValidDType(5));
}

TEST(Fp8Test, DecodeMatchesMlDtypesForAllCodes) {
  const nlohmann::json g = LoadGolden();
  ASSERT_EQ(g["decode"].size(), 256u);
  for (int c = 0; c < 256; ++c) {
    const float got = Fp8E4M3ToFloat(static_cast<uint8_t>(c));
    if (g["decode"][c].is_string()) {
      EXPECT_TRUE(std::isnan(got)) << "code " << c;
    } else {
      EXPECT_EQ(got, g["decode"][c].get<float>()) << "code " << c;
      EXPECT_EQ(std::signbit(got), (c & 0x80) != 0) << "code " << c;  // -0 is 0x80
    }
  }
  EXPECT_EQ(Fp8E4M3ToFloat(0x7e), 448.f);
  EXPECT_EQ(Fp8E4M3ToFloat(0x01), std::ldexp(1.f, -9));
}

TEST(Fp8Test, EncodeMatchesMlDtypesRoundToNearestEven) {
  const nlohmann::json g = LoadGolden();
  ASSERT_GT(g["encode"].size(), 8000u);
  int bad = 0;
  for (const auto& pair : g["encode"]) {
    const float x = BitsFloat(pair[0].get<uint32_t>());
    const uint8_t want = pair[1].get<uint8_t>();
    const uint8_t got = FloatToFp8E4M3(x);
    if (got != want && ++bad <= 10) {
      ADD_FAILURE() << "x = " << x << ": got 0x" << std::hex << int(got) << ", ml_dtypes 0x"
                    << int(want);
    }
  }
  EXPECT_EQ(bad, 0);
}

TEST(Fp8Test, EncodeSaturatesAndKeepsNaN) {
  // docs/format.md: finite values past 448 and infinities saturate to +-448; NaN stays NaN.
  for (float x :
       {448.f, 463.99f, 464.f, 480.f, 1e6f, 3.4e38f, std::numeric_limits<float>::infinity()}) {
    EXPECT_EQ(FloatToFp8E4M3(x), 0x7e) << x;
    EXPECT_EQ(FloatToFp8E4M3(-x), 0xfe) << -x;
  }
  EXPECT_EQ(FloatToFp8E4M3(std::numeric_limits<float>::quiet_NaN()) & 0x7f, 0x7f);
  // Round-trip of every finite code.
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;
    EXPECT_EQ(FloatToFp8E4M3(Fp8E4M3ToFloat(static_cast<uint8_t>(c))), c) << c;
  }
}

TEST(Fp8Test, ScaledKvPayloadMatchesMlDtypesLayout) {
  const nlohmann::json kv = LoadGolden()["kv"];
  const uint32_t heads = kv["kv_heads"], tokens = kv["tokens"], dim = kv["head_dim"];
  std::vector<float> x;
  for (const auto& b : kv["input_bits"]) x.push_back(BitsFloat(b.get<uint32_t>()));
  const std::string hex = kv["raw_hex"];
  std::vector<uint8_t> want(hex.size() / 2);
  for (size_t i = 0; i < want.size(); ++i) want[i] = std::stoi(hex.substr(2 * i, 2), nullptr, 16);

  ASSERT_EQ(KvRawBytes(DType::kF8E4M3, heads, tokens, dim), want.size());
  const BlockRecordMeta meta{DType::kF8E4M3, TensorKind::kKey, 0, heads, tokens, dim};
  EXPECT_EQ(BlockRecordRawSize(meta), want.size());
  std::vector<uint8_t> raw(want.size());
  ASSERT_TRUE(
      KvFromFloat(DType::kF8E4M3, heads, uint64_t{tokens} * dim, x.data(), raw.data()).ok());
  EXPECT_EQ(raw, want);

  // Decoding: code value times its head's scale, within half a code step of the input.
  std::vector<float> back(x.size());
  KvToFloat(DType::kF8E4M3, heads, uint64_t{tokens} * dim, raw.data(), back.data());
  for (uint32_t h = 0; h < heads; ++h) {
    float scale;
    std::memcpy(&scale, raw.data() + 4 * h, 4);
    for (uint32_t i = 0; i < tokens * dim; ++i) {
      const size_t e = h * tokens * dim + i;
      EXPECT_EQ(back[e], Fp8E4M3ToFloat(raw[4 * heads + e]) * scale);
      // e4m3 has 3 mantissa bits: relative error <= 2^-4 for normals, absolute <= 2^-10 * scale
      // below them.
      EXPECT_LE(std::fabs(back[e] - x[e]), std::fmax(std::fabs(x[e]) / 16, scale / 1024)) << e;
    }
  }
}

TEST(Fp8Test, ScaledKvRefusesNonFiniteAndOtherDtypesConvertPlainly) {
  std::vector<float> x = {1.f, 2.f, std::numeric_limits<float>::infinity(), 4.f};
  std::vector<uint8_t> raw(8 + 4);
  const Status s = KvFromFloat(DType::kF8E4M3, 2, 2, x.data(), raw.data());
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_NE(s.message().find("head 1 element 0"), std::string::npos) << s.ToString();

  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.f, 3.f);
  std::vector<float> y(2 * 5 * 4);
  for (float& v : y) v = n(rng);
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kF64}) {
    EXPECT_EQ(KvScaleBytes(t, 2), 0u);
    std::vector<uint8_t> r(*KvRawBytes(t, 2, 5, 4));
    ASSERT_EQ(r.size(), y.size() * DTypeSize(t));
    ASSERT_TRUE(KvFromFloat(t, 2, 20, y.data(), r.data()).ok());
    std::vector<float> a(y.size()), b(y.size());
    KvToFloat(t, 2, 20, r.data(), a.data());
    ConvertToFloat(t, r.data(), b.data(), b.size());
    EXPECT_EQ(a, b) << DTypeName(t);
  }
}

TEST(Fp8Test, Fp8RecordsRoundTripThroughEveryCodec) {
  const BlockRecordMeta meta{DType::kF8E4M3, TensorKind::kValue, 3, 2, 9, 16};
  std::vector<float> x(2 * 9 * 16);
  std::mt19937 rng(5);
  std::normal_distribution<float> n(0.f, 1.f);
  for (float& v : x) v = n(rng);
  std::vector<uint8_t> raw(*BlockRecordRawSize(meta));
  ASSERT_TRUE(KvFromFloat(meta.dtype, 2, 9 * 16, x.data(), raw.data()).ok());
  for (Codec codec : {Codec::kRaw, Codec::kLz4, Codec::kShuffleLz4}) {
    Result<EncodedBlockRecord> rec = EncodeBlockRecord(meta, codec, raw.data(), raw.size());
    ASSERT_TRUE(rec.ok()) << rec.status().ToString();
    std::vector<uint8_t> bytes(rec->size());
    rec->WriteTo(bytes.data());
    Result<BlockRecordView> view = ParseBlockRecord(bytes.data(), bytes.size(), "t");
    ASSERT_TRUE(view.ok()) << view.status().ToString();
    EXPECT_EQ(view->header.meta.dtype, DType::kF8E4M3);
    std::vector<uint8_t> back(raw.size());
    ASSERT_TRUE(DecodeBlockRecord(*view, back.data(), back.size(), "t").ok());
    EXPECT_EQ(back, raw) << CodecName(codec);
  }
  // The scales are part of the size: a payload without them is refused, naming them.
  Result<EncodedBlockRecord> short_rec =
      EncodeBlockRecord(meta, Codec::kRaw, raw.data(), raw.size() - 8);
  ASSERT_FALSE(short_rec.ok());
  EXPECT_NE(short_rec.status().message().find("8 scale bytes"), std::string::npos)
      << short_rec.status().ToString();
}

}  // namespace
}  // namespace shotdb
