// SentencePiece against python sentencepiece: tests/fixtures/tokenizer/tiny_spm.model is a tiny BPE
// model trained by tests/scripts/make_tokenizer_golden.py with Llama 2's settings,
// tiny_spm_golden.json its python encodings, and tiny_spm_llama.gguf the same vocabulary as GGUF
// "llama" metadata.
#include "query/tokenizer/spm_tokenizer.h"

#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "query/tokenizer/spm_model_file.h"
#include "query/tokenizer/tokenizer.h"

namespace shotdb {
namespace {

using Json = nlohmann::json;

const std::string kFixtures = std::string(SHOTDB_SOURCE_DIR) + "/tests/fixtures/tokenizer/";

Json Golden() {
  std::ifstream in(kFixtures + "tiny_spm_golden.json");
  std::stringstream ss;
  ss << in.rdbuf();
  return Json::parse(ss.str());
}

// Checks Encode against python sentencepiece (plain and with control tokens parsed) and Decode
// against python's decode, reporting the first few mismatches.
void ExpectMatchesPython(const Tokenizer& t) {
  const Json golden = Golden();
  ASSERT_GE(golden["cases"].size(), 200u);
  int mismatches = 0;
  for (const Json& c : golden["cases"]) {
    const std::string text = c["text"];
    auto plain = t.Encode(text, /*add_bos=*/false, /*parse_special=*/false);
    auto special = t.Encode(text, /*add_bos=*/false, /*parse_special=*/true);
    ASSERT_TRUE(plain.ok() && special.ok());
    const auto want = c["ids"].get<std::vector<int32_t>>();
    const auto want_special = c["ids_parse_special"].get<std::vector<int32_t>>();
    if ((*plain != want || *special != want_special) && ++mismatches <= 5) {
      ADD_FAILURE() << "mismatch for " << Json(text).dump() << ": got " << Json(*plain).dump()
                    << " / " << Json(*special).dump() << " want " << Json(want).dump() << " / "
                    << Json(want_special).dump();
    }
    EXPECT_EQ(t.Decode(want), c["decoded"].get<std::string>()) << Json(text).dump();
    EXPECT_EQ(t.Decode(want_special), text) << Json(text).dump();
  }
  EXPECT_EQ(mismatches, 0);
}

TEST(SpmTokenizerTest, ModelFileMatchesPython) {
  auto t = LoadTokenizer(kFixtures + "tiny_spm.model");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ExpectMatchesPython(**t);
  EXPECT_EQ((*t)->bos_id(), 1);
  EXPECT_EQ((*t)->eos_id(), 2);
  EXPECT_TRUE((*t)->add_bos_default());
  EXPECT_EQ((*t)->TokenText(2), "</s>");
}

TEST(SpmTokenizerTest, GgufLlamaVocabularyMatchesPython) {
  auto t = LoadTokenizer(kFixtures + "tiny_spm_llama.gguf");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ExpectMatchesPython(**t);
  EXPECT_EQ((*t)->bos_id(), 1);
  EXPECT_EQ((*t)->eos_id(), 2);
  EXPECT_TRUE((*t)->add_bos_default());
  auto ids = (*t)->Encode("hello world", /*add_bos=*/true);
  ASSERT_TRUE(ids.ok());
  ASSERT_FALSE(ids->empty());
  EXPECT_EQ((*ids)[0], 1);
}

// Six pieces marked UNUSED: python sentencepiece merges through them and splits final ones back.
TEST(SpmTokenizerTest, GgufUnusedPiecesMatchPython) {
  auto t = LoadTokenizer(kFixtures + "tiny_spm_unused_llama.gguf");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  const Json golden = Golden();
  int mismatches = 0, differ_from_plain = 0;
  for (const Json& c : golden["cases"]) {
    auto ids = (*t)->Encode(c["text"].get<std::string>(), false, false);
    ASSERT_TRUE(ids.ok());
    const auto want = c["ids_unused"].get<std::vector<int32_t>>();
    differ_from_plain += want != c["ids"].get<std::vector<int32_t>>();
    if (*ids != want && ++mismatches <= 5) {
      ADD_FAILURE() << c["text"].dump() << ": got " << Json(*ids).dump() << " want "
                    << Json(want).dump();
    }
  }
  EXPECT_EQ(mismatches, 0);
  EXPECT_GT(differ_from_plain, 0);  // the fixture does exercise resegmentation
}

TEST(SpmTokenizerTest, GgufAndModelFileHaveTheSamePieces) {
  auto a = LoadTokenizer(kFixtures + "tiny_spm.model");
  auto b = LoadTokenizer(kFixtures + "tiny_spm_llama.gguf");
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ((*a)->vocab_size(), (*b)->vocab_size());
  for (int32_t id = 0; id < static_cast<int32_t>((*a)->vocab_size()); ++id) {
    ASSERT_EQ((*a)->TokenText(id), (*b)->TokenText(id));
  }
  EXPECT_FALSE((*a)->Fingerprint().empty());
  EXPECT_EQ((*a)->Fingerprint(),
            LoadTokenizer(kFixtures + "tiny_spm.model").value()->Fingerprint());
}

TEST(SpmTokenizerTest, RejectsInvalidUtf8) {
  for (const char* file : {"tiny_spm.model", "tiny_spm_llama.gguf"}) {
    auto t = LoadTokenizer(kFixtures + file);
    ASSERT_TRUE(t.ok());
    auto ids = (*t)->Encode("ab\xff", false);
    ASSERT_FALSE(ids.ok());
    EXPECT_TRUE(ids.status().IsInvalidArgument()) << file;
  }
}

TEST(SpmVocabTokenizerTest, InconsistentArraysAreCorruption) {
  SpmVocab v;
  v.pieces = {"<unk>", "a", "b"};
  v.scores = {0, -1};
  v.types = {SpmTokenType::kUnknown, SpmTokenType::kNormal, SpmTokenType::kNormal};
  auto t = SpmVocabTokenizer::Create(v, "x.gguf");
  ASSERT_FALSE(t.ok());
  EXPECT_TRUE(t.status().IsCorruption());
  EXPECT_NE(t.status().message().find("x.gguf: tokenizer has 3 tokens but 2 scores"),
            std::string::npos)
      << t.status().ToString();
}

// A byte piece must be exactly <0xHH>. "<0x-7>" once indexed the byte table out of bounds (sscanf's
// %X takes a sign; found by fuzz/fuzz_spm_model, reproducer
// fuzz/seeds/spm_model_regressions/byte_piece_sign).
TEST(SpmVocabTokenizerTest, MalformedBytePiecesAreCorruption) {
  for (const char* piece : {"<0x-7>", "<0x+1>", "<0xG1>", "<0x1>", "<0x1F", "0x1F>>"}) {
    SpmVocab v;
    v.pieces = {"<unk>", piece};
    v.scores = {0, 0};
    v.types = {SpmTokenType::kUnknown, SpmTokenType::kByte};
    auto t = SpmVocabTokenizer::Create(v, "x.model");
    ASSERT_FALSE(t.ok()) << piece;
    EXPECT_TRUE(t.status().IsCorruption());
    EXPECT_NE(t.status().message().find("not of the form <0xHH>"), std::string::npos)
        << t.status().ToString();
  }
  SpmVocab v;
  v.pieces = {"<unk>", "<0x61>", "<0xfF>"};
  v.scores = {0, 0, 0};
  v.types = {SpmTokenType::kUnknown, SpmTokenType::kByte, SpmTokenType::kByte};
  v.unk_id = 0;
  auto t = SpmVocabTokenizer::Create(v, "x.model");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  auto ids = (*t)->Encode("a", false);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(ids->back(), 1);  // "a" has no piece: byte fallback to <0x61>
}

TEST(SpmVocabTokenizerTest, UnknownCharacterWithoutByteFallback) {
  SpmVocab v;
  v.pieces = {"<unk>", "\xE2\x96\x81", "a", "b",
              "\xE2\x96\x81"
              "a"};
  v.scores = {0, -1, -2, -3, -0.5f};
  v.types = {SpmTokenType::kUnknown, SpmTokenType::kNormal, SpmTokenType::kNormal,
             SpmTokenType::kNormal, SpmTokenType::kNormal};
  v.unk_id = 0;
  auto t = SpmVocabTokenizer::Create(v, "tiny");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  auto ids = (*t)->Encode("a zb", false);
  ASSERT_TRUE(ids.ok());
  // "▁a▁zb": "▁a" merges; "z" has neither a piece nor a byte piece -> <unk>.
  EXPECT_EQ(*ids, (std::vector<int32_t>{4, 1, 0, 3}));
}

// sentencepiece merges through UNUSED pieces but never emits them: a final UNUSED piece is split
// back into the two pieces it was made from, while one that merged further is kept inside the
// larger piece.
TEST(SpmVocabTokenizerTest, UnusedPiecesAreResegmented) {
  SpmVocab v;
  v.pieces = {"<unk>",
              "a",
              "b",
              "ab",
              "\xE2\x96\x81",
              "\xE2\x96\x81"
              "ab"};
  v.scores = {0, -5, -5, -1, -5, -2};
  v.types = {SpmTokenType::kUnknown, SpmTokenType::kNormal, SpmTokenType::kNormal,
             SpmTokenType::kUnused,  SpmTokenType::kNormal, SpmTokenType::kNormal};
  v.unk_id = 0;
  v.add_space_prefix = false;
  auto t = SpmVocabTokenizer::Create(v, "tiny");
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  auto ids = (*t)->Encode("ab ab", false);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(*ids, (std::vector<int32_t>{1, 2, 5}));
  EXPECT_EQ((*t)->Decode(*ids), "ab ab");
}

TEST(SpmTokenizerTest, UnreadableModel) {
  auto t = LoadTokenizer(kFixtures + "smollm2_golden.json.missing");
  ASSERT_FALSE(t.ok());
  EXPECT_TRUE(t.status().IsNotFound());
  const std::string junk = ::testing::TempDir() + "/junk.model";
  std::ofstream(junk) << "\x0a\x05garbage that is not a protobuf";
  auto j = LoadTokenizer(junk);
  ASSERT_FALSE(j.ok());
  EXPECT_NE(j.status().message().find("junk.model"), std::string::npos) << j.status().ToString();
}

// Hand-assembled ModelProto bytes, following the protobuf encoding rules rather than our reader.
std::string Varint(uint64_t v) {
  std::string out;
  do {
    uint8_t byte = v & 0x7f;
    v >>= 7;
    out += static_cast<char>(v ? byte | 0x80 : byte);
  } while (v);
  return out;
}
std::string LengthDelimited(uint32_t field, const std::string& bytes) {
  return Varint(field << 3 | 2) + Varint(bytes.size()) + bytes;
}
std::string VarintField(uint32_t field, uint64_t v) { return Varint(field << 3 | 0) + Varint(v); }
std::string Piece(const std::string& text, float score, int type) {
  std::string s = LengthDelimited(1, text);
  char bits[4];
  std::memcpy(bits, &score, 4);
  s += Varint(2 << 3 | 5) + std::string(bits, 4);
  return LengthDelimited(1, s + VarintField(3, type));
}
std::string Normalizer(bool remove_extra_whitespaces) {
  return LengthDelimited(3, LengthDelimited(1, "identity") + VarintField(3, 1) +
                                VarintField(4, remove_extra_whitespaces));
}

TEST(SpmModelFileTest, ParsesHandWrittenProto) {
  // bos_id = 1, eos_id = -1 (sign-extended to ten bytes on the wire), model_type = BPE.
  const std::string trainer =
      LengthDelimited(2, VarintField(3, 2) + VarintField(41, 1) + VarintField(42, ~uint64_t{0}));
  const std::string proto = Piece("<unk>", 0, 2) + Piece("<s>", 0, 3) + Piece("a", -1.5f, 1) +
                            trainer + Normalizer(false);
  auto vocab = ParseSentencePieceModel(proto, "hand.model");
  ASSERT_TRUE(vocab.ok()) << vocab.status().ToString();
  EXPECT_EQ(vocab->pieces, (std::vector<std::string>{"<unk>", "<s>", "a"}));
  EXPECT_EQ(vocab->scores, (std::vector<float>{0, 0, -1.5f}));
  EXPECT_EQ(vocab->types[1], SpmTokenType::kControl);
  EXPECT_EQ(vocab->unk_id, 0);
  EXPECT_EQ(vocab->bos_id, 1);
  EXPECT_EQ(vocab->eos_id, -1);
  EXPECT_TRUE(vocab->add_bos);
  EXPECT_TRUE(vocab->add_space_prefix);
}

TEST(SpmModelFileTest, RefusesWhatItCannotEncodeExactly) {
  const std::string pieces = Piece("<unk>", 0, 2) + Piece("a", 0, 1);
  auto unigram = ParseSentencePieceModel(
      pieces + LengthDelimited(2, VarintField(3, 1)) + Normalizer(false), "uni.model");
  ASSERT_FALSE(unigram.ok());
  EXPECT_TRUE(unigram.status().IsNotSupported());
  EXPECT_NE(unigram.status().message().find("unigram"), std::string::npos);
  auto collapse = ParseSentencePieceModel(
      pieces + LengthDelimited(2, VarintField(3, 2)) + Normalizer(true), "ws.model");
  ASSERT_FALSE(collapse.ok());
  EXPECT_NE(collapse.status().message().find("remove_extra_whitespaces"), std::string::npos);
}

TEST(SpmModelFileTest, TruncationIsCorruption) {
  std::ifstream in(kFixtures + "tiny_spm.model", std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string bytes = ss.str();
  ASSERT_GT(bytes.size(), 100u);
  for (size_t cut : {bytes.size() - 1, bytes.size() / 2, size_t{3}}) {
    auto vocab = ParseSentencePieceModel(std::string_view(bytes).substr(0, cut), "cut.model");
    ASSERT_FALSE(vocab.ok()) << "cut at " << cut;
    EXPECT_TRUE(vocab.status().IsCorruption()) << vocab.status().ToString();
    EXPECT_NE(vocab.status().message().find("cut.model"), std::string::npos);
  }
}

}  // namespace
}  // namespace shotdb
