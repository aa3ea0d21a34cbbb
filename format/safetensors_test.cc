#include "format/safetensors.h"

#include <gtest/gtest.h>

#include "format/weights_test_util.h"

namespace shotdb {
namespace {

using testing_util::GoldenFloats;
using testing_util::ReadAll;
using testing_util::TempFile;
using testing_util::WeightsFixture;

void ExpectGolden(const SafetensorsTensor& t, const std::string& name) {
  const std::vector<float> want = GoldenFloats("st.golden.json", name);
  std::vector<float> got(want.size());
  ASSERT_TRUE(SafetensorsToFloat32(t, got.data(), got.size()).ok()) << name;
  EXPECT_EQ(got, want) << name;
}

TEST(SafetensorsTest, SingleFileFromTheSafetensorsPackage) {
  auto f = SafetensorsFile::Open(WeightsFixture("st_single/model.safetensors"));
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ(f->metadata().at("format"), "pt");
  ASSERT_EQ(f->tensors().size(), 3u);
  EXPECT_EQ(f->Find("a")->dtype, "F32");
  EXPECT_EQ(f->Find("a")->shape, (std::vector<int64_t>{4, 5}));
  EXPECT_EQ(f->Find("b")->dtype, "F16");
  EXPECT_EQ(f->Find("c")->dtype, "F64");
  for (const char* n : {"a", "b", "c"}) ExpectGolden(*f->Find(n), n);
  EXPECT_EQ(f->Find("zzz"), nullptr);
}

TEST(SafetensorsTest, ShardedCheckpointWithIndex) {
  auto c = SafetensorsCheckpoint::OpenDir(WeightsFixture("st_sharded"));
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->TensorNames(), (std::vector<std::string>{"a", "b", "c"}));
  for (const char* n : {"a", "b", "c"}) {
    auto t = c->Find(n);
    ASSERT_TRUE(t.ok());
    ExpectGolden(*t, n);
  }
  EXPECT_TRUE(c->Find("missing").status().IsNotFound());
  EXPECT_TRUE(SafetensorsCheckpoint::OpenDir("/nonexistent_dir_xyz").status().IsNotFound());
}

std::string Make(const std::string& header, size_t data_bytes) {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  return out + header + std::string(data_bytes, '\x3f');
}

Status OpenBytes(const std::string& bytes) {
  return SafetensorsFile::Open(TempFile(bytes).path()).status();
}

TEST(SafetensorsTest, Bf16AndMalformedHeaders) {
  // BF16 written by hand: 1.0 and -2.0.
  std::string ok = Make(R"({"x":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}})", 0);
  ok += std::string("\x80\x3f\x00\xc0", 4);
  TempFile tf(ok);
  auto f = SafetensorsFile::Open(tf.path());
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  float v[2];
  ASSERT_TRUE(SafetensorsToFloat32(*f->Find("x"), v, 2).ok());
  EXPECT_EQ(v[0], 1.0f);
  EXPECT_EQ(v[1], -2.0f);

  auto msg = [](const Status& s) { return s.message(); };
  EXPECT_NE(msg(OpenBytes("abc")).find("too short"), std::string::npos);
  EXPECT_NE(msg(OpenBytes(Make("{not json", 0))).find("not a JSON object"), std::string::npos);
  EXPECT_NE(msg(OpenBytes(Make(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 8)))
                .find("tensor 'x': data_offsets [0, 4) hold 4 bytes, shape and dtype need 8"),
            std::string::npos);
  EXPECT_NE(msg(OpenBytes(Make(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 4)))
                .find("past the data section"),
            std::string::npos);
  EXPECT_NE(msg(OpenBytes(Make(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                               R"("y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                               8)))
                .find("overlap"),
            std::string::npos);
  EXPECT_TRUE(OpenBytes(Make(R"({"x":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}})", 1))
                  .IsNotSupported());
  std::string huge = Make("{}", 0);
  const uint64_t n = uint64_t{1} << 50;
  std::memcpy(huge.data(), &n, 8);
  EXPECT_NE(msg(OpenBytes(huge)).find("exceeds the file size"), std::string::npos);
  // An I64 tensor opens but does not convert to float32.
  std::string ints = Make(R"({"i":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", 8);
  TempFile ti(ints);
  auto fi = SafetensorsFile::Open(ti.path());
  ASSERT_TRUE(fi.ok());
  EXPECT_TRUE(SafetensorsToFloat32(*fi->Find("i"), v, 1).IsNotSupported());
}

}  // namespace
}  // namespace shotdb
