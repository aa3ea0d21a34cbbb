#include "engine/text_tokenizer.h"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace shotdb {
namespace {

using Split = TextTokenizerOptions::Split;
using Tokens = std::vector<std::string>;

TextTokenizerOptions Options(bool lowercase, Split split) {
  TextTokenizerOptions options;
  options.lowercase = lowercase;
  options.split = split;
  return options;
}

// Golden tokens written by tests/scripts/make_bm25_golden.py from a regex re-implementation of the
// documented rules, for every text of the fixture corpora and every option setting.
TEST(TextTokenizerTest, MatchesGoldenTokensForAllOptions) {
  std::ifstream in(std::string(SHOTDB_SOURCE_DIR) + "/tests/fixtures/bm25/golden.json");
  ASSERT_TRUE(in.good());
  const nlohmann::json golden = nlohmann::json::parse(in);
  size_t checked = 0;
  for (const auto& corpus : golden.at("corpora")) {
    const auto texts = corpus.at("texts").get<std::vector<std::string>>();
    for (const auto& [name, per_text] : corpus.at("tokens").items()) {
      const Result<TextTokenizerOptions> options = TextTokenizerOptions::Parse(name);
      ASSERT_TRUE(options.ok()) << options.status().ToString();
      ASSERT_EQ(per_text.size(), texts.size());
      for (size_t i = 0; i < texts.size(); ++i) {
        EXPECT_EQ(TokenizeText(texts[i], *options), per_text[i].get<Tokens>())
            << "options " << name << ", text " << i << ": " << texts[i];
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 200u);
}

TEST(TextTokenizerTest, NonAlphanumericSplit) {
  const auto lower = Options(true, Split::kNonAlphanumeric);
  EXPECT_EQ(TokenizeText("Set an ALARM, for 5am!", lower),
            (Tokens{"set", "an", "alarm", "for", "5am"}));
  EXPECT_EQ(TokenizeText("x_y-z's", lower), (Tokens{"x", "y", "z", "s"}));
  EXPECT_EQ(TokenizeText("", lower), Tokens{});
  EXPECT_EQ(TokenizeText(" ,;!? ", lower), Tokens{});
  // Bytes >= 0x80 are word bytes: UTF-8 words stay whole and keep their case; invalid UTF-8 too.
  EXPECT_EQ(TokenizeText("CAFÉ au-lait", lower), (Tokens{"cafÉ", "au", "lait"}));
  EXPECT_EQ(TokenizeText("a\xff"
                         "b c",
                         lower),
            (Tokens{"a\xff"
                    "b",
                    "c"}));
  EXPECT_EQ(TokenizeText(std::string("ab\0cd", 5), lower), (Tokens{"ab", "cd"}));
  EXPECT_EQ(TokenizeText("Keep CASE", Options(false, Split::kNonAlphanumeric)),
            (Tokens{"Keep", "CASE"}));
}

TEST(TextTokenizerTest, WhitespaceSplit) {
  const auto lower = Options(true, Split::kWhitespace);
  EXPECT_EQ(TokenizeText("  Set an ALARM,\tfor\n5am! ", lower),
            (Tokens{"set", "an", "alarm,", "for", "5am!"}));
  EXPECT_EQ(TokenizeText("a\x1c"
                         "b\x1f"
                         "c\vd\fe\rf",
                         lower),
            (Tokens{"a", "b", "c", "d", "e", "f"}));
  // NUL and non-ASCII spaces (U+00A0 is C2 A0) are token bytes.
  EXPECT_EQ(TokenizeText(std::string("a\0b", 3), lower), (Tokens{std::string("a\0b", 3)}));
  EXPECT_EQ(TokenizeText("a\xc2\xa0"
                         "b",
                         lower),
            (Tokens{"a\xc2\xa0"
                    "b"}));
  EXPECT_EQ(TokenizeText(" \t\n", lower), Tokens{});
}

TEST(TextTokenizerTest, SerializeParseRoundTrip) {
  EXPECT_EQ(TextTokenizerOptions().Serialize(), "lower,nonalnum");
  EXPECT_EQ(Options(false, Split::kWhitespace).Serialize(), "keepcase,whitespace");
  for (bool lowercase : {true, false}) {
    for (Split split : {Split::kNonAlphanumeric, Split::kWhitespace}) {
      const TextTokenizerOptions options = Options(lowercase, split);
      const Result<TextTokenizerOptions> parsed = TextTokenizerOptions::Parse(options.Serialize());
      ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
      EXPECT_EQ(*parsed, options);
    }
  }
}

TEST(TextTokenizerTest, ParseRejectsMalformedOptionsNamingThePart) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", "two comma-separated parts"},
      {"lower", "two comma-separated parts"},
      {"lower,nonalnum,extra", "two comma-separated parts"},
      {"upper,nonalnum", "unknown case \"upper\""},
      {"lower,words", "unknown split \"words\""},
      {"Lower,nonalnum", "unknown case \"Lower\""},
      {"lower, whitespace", "unknown split \" whitespace\""},
  };
  for (const auto& [text, message] : cases) {
    const Result<TextTokenizerOptions> parsed = TextTokenizerOptions::Parse(text);
    ASSERT_FALSE(parsed.ok()) << text;
    EXPECT_TRUE(parsed.status().IsInvalidArgument()) << text;
    EXPECT_NE(parsed.status().message().find(message), std::string::npos)
        << text << " -> " << parsed.status().ToString();
    EXPECT_NE(parsed.status().message().find("tokenizer options \"" + text + "\""),
              std::string::npos);
  }
}

}  // namespace
}  // namespace shotdb
