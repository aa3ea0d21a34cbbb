// Text tokenization for BM25: turns a demonstration's or a query's text into the terms that the
// BM25 index counts.
//
// The tokenizer is deliberately byte-oriented and locale-free so that the same text yields the same
// terms on every machine and in every release: the options are persisted with a task (Serialize /
// Parse), and a task's index is only meaningful while its queries are tokenized exactly as its
// demonstrations were.
//
// Byte classes (the input is treated as a byte string, normally UTF-8):
//   - alphanumeric: ASCII 'A'-'Z', 'a'-'z', '0'-'9', and every byte >= 0x80. Counting the bytes of
//     multi-byte UTF-8 sequences as alphanumeric keeps non-ASCII words ("café", "東京") whole
//     instead of splitting them at each non-ASCII character; the price is that non-ASCII
//     punctuation and spaces (U+00A0, U+2019, "。") are also word characters.
//   - whitespace: ' ', '\t', '\n', '\v', '\f', '\r' and the ASCII separators 0x1C-0x1F, i.e.
//   exactly
//     the ASCII bytes on which Python's str.split() splits. Non-ASCII spaces are not whitespace.
// Lowercasing maps only ASCII 'A'-'Z' to 'a'-'z'; non-ASCII letters keep their case.
//
// Thread-safety: everything here is a pure function of its arguments.
#ifndef SHOTDB_ENGINE_TEXT_TOKENIZER_H_
#define SHOTDB_ENGINE_TEXT_TOKENIZER_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "util/status.h"

namespace shotdb {

struct TextTokenizerOptions {
  // Map ASCII 'A'-'Z' to 'a'-'z' before splitting.
  bool lowercase = true;

  enum class Split : uint8_t {
    // Tokens are the maximal runs of alphanumeric bytes (see above); everything else separates.
    kNonAlphanumeric = 0,
    // Tokens are the maximal runs of non-whitespace bytes, punctuation included; on ASCII text
    // this equals Python's str.split() (docs/method.md: the DBSA reference splits on whitespace).
    kWhitespace = 1,
  } split = Split::kNonAlphanumeric;

  // The persisted form: "<case>,<split>" with <case> one of "lower" / "keepcase" and <split> one of
  // "nonalnum" / "whitespace". The defaults serialize to "lower,nonalnum".
  std::string Serialize() const;

  // Inverse of Serialize(). Accepts exactly the strings Serialize() produces. Returns
  // InvalidArgument naming the offending part (e.g. `tokenizer options "lower,words": unknown
  // split "words", expected "nonalnum" or "whitespace"`) when there are not exactly two
  // comma-separated parts or a part is not one of the names above.
  static Result<TextTokenizerOptions> Parse(std::string_view text);

  bool operator==(const TextTokenizerOptions& other) const {
    return lowercase == other.lowercase && split == other.split;
  }
  bool operator!=(const TextTokenizerOptions& other) const { return !(*this == other); }
};

// Splits `text` into tokens as `options` say, in order of appearance, duplicates kept (BM25 counts
// them). Returns an empty vector for text with no token bytes. Never fails: any byte string is
// accepted, including invalid UTF-8 and NUL bytes (NUL separates tokens under kNonAlphanumeric and,
// as in Python, is a token byte under kWhitespace).
std::vector<std::string> TokenizeText(std::string_view text, const TextTokenizerOptions& options);

}  // namespace shotdb

#endif  // SHOTDB_ENGINE_TEXT_TOKENIZER_H_
