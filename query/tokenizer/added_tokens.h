// Pieces shared by the tokenizer implementations: matching added/special tokens in raw text,
// UTF-8 validation, and the fingerprint hasher. Internal to query/tokenizer/.
#ifndef SHOTDB_QUERY_TOKENIZER_ADDED_TOKENS_H_
#define SHOTDB_QUERY_TOKENIZER_ADDED_TOKENS_H_

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace shotdb {

// A vocabulary entry that is matched verbatim in the input before any pre-tokenization.
// `special` tokens (control tokens: "<|im_start|>", "</s>") are matched only when the caller asks
// for special-token parsing; the others (user-defined pieces) are always matched.
struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = true;
};

// A run of input text: either ordinary text (token_id == -1) or one matched added token.
struct TextFragment {
  std::string_view text;
  int32_t token_id = -1;
};

// Splits text at added-token occurrences, leftmost first and longest at each position (the rule
// Hugging Face tokenizers and llama.cpp apply). Immutable and thread-safe after construction.
class AddedTokenMatcher {
 public:
  AddedTokenMatcher() = default;
  explicit AddedTokenMatcher(const std::vector<AddedToken>& tokens);

  // Returns the fragments of `text` in order; their texts concatenate to `text`. Empty ordinary
  // fragments are omitted. The views point into `text`.
  std::vector<TextFragment> Split(std::string_view text, bool parse_special) const;

 private:
  // Candidates by first byte, longest content first.
  std::array<std::vector<AddedToken>, 256> by_first_byte_;
};

// True when `text` is well-formed UTF-8 (no overlongs, surrogates or code points above U+10FFFF).
bool IsValidUtf8(std::string_view text);

// Length in bytes of the UTF-8 sequence starting with lead byte `c` (1 for a stray byte).
inline size_t Utf8SequenceLength(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c >> 5) == 0x6) return 2;
  if ((c >> 4) == 0xE) return 3;
  if ((c >> 3) == 0x1E) return 4;
  return 1;
}

// Appends the UTF-8 encoding of code point `cp` to `out`.
void AppendUtf8(uint32_t cp, std::string* out);

// Accumulates a 128-bit XXH3 digest over typed fields. Each field is length- or width-prefixed so
// that different field sequences cannot produce the same byte stream.
class FingerprintHasher {
 public:
  FingerprintHasher();
  ~FingerprintHasher();
  FingerprintHasher(const FingerprintHasher&) = delete;
  FingerprintHasher& operator=(const FingerprintHasher&) = delete;

  void AddString(std::string_view s);
  void AddInt(int64_t v);
  void AddFloat(float v);
  // 32 lowercase hex digits.
  std::string HexDigest() const;

 private:
  void* state_;  // XXH3_state_t, kept opaque so that xxhash.h stays out of this header
};

}  // namespace shotdb

#endif  // SHOTDB_QUERY_TOKENIZER_ADDED_TOKENS_H_
