#include "format/gguf.h"

#include <gtest/gtest.h>

#include <cstdlib>

#include "format/weights_test_util.h"

namespace shotdb {
namespace {

using testing_util::GoldenFloats;
using testing_util::ReadAll;
using testing_util::TempFile;
using testing_util::WeightsFixture;

TEST(GgufTest, MetadataOfEveryValueType) {
  auto g = GgufFile::Open(WeightsFixture("tiny.gguf"));
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(g->version(), 3u);
  EXPECT_EQ(*g->GetString("general.architecture"), "llama");
  EXPECT_EQ(*g->GetUInt("t.u8"), 200u);
  EXPECT_EQ(*g->GetUInt("t.u16"), 60000u);
  EXPECT_EQ(*g->GetUInt("t.u32"), 4000000000u);
  EXPECT_EQ(*g->GetUInt("t.u64"), (uint64_t{1} << 63) + 5);
  EXPECT_EQ(g->Find("t.i8")->i, -100);
  EXPECT_EQ(g->Find("t.i16")->i, -30000);
  EXPECT_EQ(g->Find("t.i32")->i, -2000000000);
  EXPECT_EQ(g->Find("t.i64")->i, -(int64_t{1} << 62));
  EXPECT_EQ(*g->GetFloat("t.f32"), 0.15625);
  EXPECT_EQ(*g->GetFloat("t.f64"), 1.0 / 3.0);
  EXPECT_TRUE(*g->GetBool("t.bool"));
  EXPECT_EQ(*g->GetString("t.str"), "héllo wörld");
  EXPECT_EQ(*g->GetStringArray("t.strs"), (std::vector<std::string>{"a", "", "ünïcode", "x y"}));
  EXPECT_EQ(*g->GetIntArray("t.ints"), (std::vector<int64_t>{1, -2, 3}));
  EXPECT_EQ(*g->GetFloatArray("t.floats"), (std::vector<double>{0.5, -1.25}));
  const GgufValue* nested = g->Find("t.nested");
  ASSERT_NE(nested, nullptr);
  ASSERT_EQ(nested->array.size(), 2u);
  EXPECT_EQ(nested->array[0].array.size(), 2u);
  EXPECT_EQ(nested->array[1].array[0].i + static_cast<int64_t>(nested->array[1].array[0].u), 3);

  EXPECT_TRUE(g->GetString("no.such.key").status().IsNotFound());
  auto wrong = g->GetString("t.u8");
  ASSERT_TRUE(wrong.status().IsInvalidArgument());
  EXPECT_NE(wrong.status().message().find("'t.u8' is uint8, expected string"), std::string::npos);
  EXPECT_TRUE(g->GetUInt("t.i8").status().IsInvalidArgument());  // negative
}

TEST(GgufTest, EveryTensorTypeDequantizesBitExactlyLikeGgufPython) {
  for (const char* file : {"tiny.gguf", "tiny_align64.gguf"}) {
    auto g = GgufFile::Open(WeightsFixture(file));
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    EXPECT_EQ(g->alignment(), std::string(file) == "tiny.gguf" ? 32u : 64u);
    for (const char* name : {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"}) {
      const GgufTensorInfo* t = g->FindTensor(name);
      ASSERT_NE(t, nullptr) << name;
      EXPECT_EQ(t->dims, (std::vector<uint64_t>{64, 3})) << name;
      EXPECT_EQ(t->offset % g->alignment(), 0u);
      const std::vector<float> want = GoldenFloats("tiny.golden.json", name);
      std::vector<float> got(t->numel);
      ASSERT_TRUE(g->ReadFloat32(*t, got.data(), got.size()).ok());
      ASSERT_EQ(got.size(), want.size());
      EXPECT_EQ(std::memcmp(got.data(), want.data(), 4 * got.size()), 0) << file << " " << name;
    }
    std::vector<float> small(3);
    EXPECT_TRUE(g->ReadFloat32(*g->FindTensor("f32"), small.data(), 3).IsInvalidArgument());
  }
}

// Byte offsets in tiny.gguf, found by parsing its header the way the format defines it.
struct Layout {
  size_t first_key_len_at = 24;  // u64 length of the first metadata key
  size_t tensor_info_at = 0;     // name length of the first tensor info
};

Layout FindLayout(const std::string& bytes, const GgufFile& g) {
  Layout l;
  // The first tensor info begins with the u64 length 3 followed by "f32".
  const std::string needle = std::string("\x03\0\0\0\0\0\0\0f32", 11);
  l.tensor_info_at = bytes.find(needle);
  (void)g;
  return l;
}

Status OpenBytes(const std::string& bytes) {
  return GgufFile::Open(TempFile(bytes).path()).status();
}

TEST(GgufTest, MalformedFilesGiveClearErrors) {
  const std::string good = ReadAll(WeightsFixture("tiny.gguf"));
  auto g = GgufFile::Open(WeightsFixture("tiny.gguf"));
  ASSERT_TRUE(g.ok());
  const Layout l = FindLayout(good, *g);
  ASSERT_NE(l.tensor_info_at, std::string::npos);

  // Every truncation: an error, never a crash.
  for (size_t n = 0; n < good.size(); n += 7) {
    Status s = OpenBytes(good.substr(0, n));
    EXPECT_FALSE(s.ok()) << "truncated to " << n;
  }
  std::string bad = good;
  bad[0] = 'X';
  EXPECT_NE(OpenBytes(bad).message().find("bad magic"), std::string::npos);

  bad = good;
  bad[4] = 1;  // version 1
  EXPECT_TRUE(OpenBytes(bad).IsNotSupported());

  bad = good;
  const uint64_t absurd = uint64_t{1} << 60;
  std::memcpy(&bad[16], &absurd, 8);  // metadata count
  EXPECT_NE(OpenBytes(bad).message().find("cannot fit"), std::string::npos);

  bad = good;
  std::memcpy(&bad[l.first_key_len_at], &absurd, 8);  // first key's string length
  EXPECT_NE(OpenBytes(bad).message().find("string length"), std::string::npos);

  // First tensor info: name(8+3) n_dims(4) dims(2*8) type(4) offset(8).
  const size_t ndims_at = l.tensor_info_at + 11, type_at = ndims_at + 4 + 16, off_at = type_at + 4;
  bad = good;
  bad[ndims_at] = 9;
  EXPECT_NE(OpenBytes(bad).message().find("9 dimensions"), std::string::npos);
  bad = good;
  bad[type_at] = 14;  // Q6_K
  Status s = OpenBytes(bad);
  EXPECT_TRUE(s.IsNotSupported());
  EXPECT_NE(s.message().find("tensor 'f32': ggml type 14"), std::string::npos);
  bad = good;
  bad[off_at] = 4;  // misaligned
  EXPECT_NE(OpenBytes(bad).message().find("not aligned"), std::string::npos);
  bad = good;
  const uint64_t far = uint64_t{1} << 40;
  std::memcpy(&bad[off_at], &far, 8);
  EXPECT_NE(OpenBytes(bad).message().find("past the end"), std::string::npos);
}

TEST(GgufTest, DefaultModelIfFetched) {
  const char* home = std::getenv("HOME");
  const std::string path =
      std::string(home ? home : "") + "/.cache/shotdb/models/SmolLM2-135M-Instruct.Q4_1.gguf";
  auto g = GgufFile::Open(path);
  if (!g.ok() && g.status().IsIOError()) GTEST_SKIP() << "default model not fetched";
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  EXPECT_EQ(*g->GetUInt("llama.block_count"), 30u);
  EXPECT_EQ(*g->GetUInt("llama.embedding_length"), 576u);
  EXPECT_EQ(*g->GetUInt("llama.attention.head_count_kv"), 3u);
  EXPECT_EQ(g->GetStringArray("tokenizer.ggml.tokens")->size(), 49152u);
  const GgufTensorInfo* emb = g->FindTensor("token_embd.weight");
  ASSERT_NE(emb, nullptr);
  EXPECT_EQ(emb->type, GgmlType::kQ8_0);
  std::vector<float> v(emb->numel);
  ASSERT_TRUE(g->ReadFloat32(*emb, v.data(), v.size()).ok());
}

}  // namespace
}  // namespace shotdb
