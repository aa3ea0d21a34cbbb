// SentencePiece-BPE tokenizers (Llama 2 family).
//
// SpmVocabTokenizer implements SentencePiece-BPE encoding from a vocabulary of pieces and scores,
// as stored in GGUF files whose tokenizer.ggml.model is "llama" and in SentencePiece
// tokenizer.model files (read by spm_model_file.h): spaces become "▁" (with one prepended when
// add_space_prefix is set), the text starts as single characters, adjacent pairs
// whose concatenation is a piece are merged highest score first (leftmost first among equal
// scores), and characters without a piece fall back to their UTF-8 bytes as "<0xXX>" pieces.
//
// Special tokens (control pieces such as "</s>") are split out first when parse_special is set;
// each text fragment is then encoded on its own, with the dummy space prefix, as llama.cpp and the
// Hugging Face "legacy" Llama tokenizer do. Immutable and thread-safe.
#ifndef SHOTDB_QUERY_TOKENIZER_SPM_TOKENIZER_H_
#define SHOTDB_QUERY_TOKENIZER_SPM_TOKENIZER_H_

#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "query/tokenizer/added_tokens.h"
#include "query/tokenizer/tokenizer.h"
#include "util/status.h"

namespace shotdb {

// GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
enum class SpmTokenType : int32_t {
  kUndefined = 0,
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

// A SentencePiece vocabulary: pieces, their scores and types (all three the same length).
struct SpmVocab {
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<SpmTokenType> types;
  int32_t unk_id = -1;
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  bool add_bos = true;
  bool add_space_prefix = true;
};

// SentencePiece-BPE over an explicit vocabulary (GGUF "llama").
class SpmVocabTokenizer final : public Tokenizer {
 public:
  // Errors (messages prefixed by `source`): Corruption when the three arrays differ in length,
  // two pieces are equal, or an id is out of range.
  static Result<std::unique_ptr<SpmVocabTokenizer>> Create(SpmVocab vocab,
                                                           const std::string& source);

  // Control pieces are the special tokens; user-defined pieces are always matched whole. A
  // character without a piece and without a byte piece becomes unk_id (dropped if unk_id is -1).
  Result<std::vector<int32_t>> Encode(std::string_view text, bool add_bos,
                                      bool parse_special = true) const override;
  // "▁" becomes a space, byte pieces their byte; the space prefix that Encode adds at the start
  // and after each special token is removed.
  std::string Decode(const std::vector<int32_t>& ids) const override;
  std::string TokenText(int32_t id) const override;
  size_t vocab_size() const override { return vocab_.pieces.size(); }
  int32_t bos_id() const override { return vocab_.bos_id; }
  int32_t eos_id() const override { return vocab_.eos_id; }
  bool add_bos_default() const override { return vocab_.add_bos; }
  std::string Fingerprint() const override { return fingerprint_; }

 private:
  SpmVocabTokenizer() = default;
  void EncodeFragment(std::string_view text, bool space_prefix, std::vector<int32_t>* out) const;

  SpmVocab vocab_;
  std::unordered_map<std::string, int32_t> mergeable_;  // normal, user-defined and unused pieces
  int32_t byte_ids_[256];                               // "<0xXX>" piece ids, or -1
  AddedTokenMatcher added_;
  std::string fingerprint_;
};

}  // namespace shotdb

#endif  // SHOTDB_QUERY_TOKENIZER_SPM_TOKENIZER_H_
