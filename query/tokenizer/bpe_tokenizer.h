// Byte-level BPE (GPT-2 style), as used by SmolLM2, Llama 3 and Qwen 2.
//
// Encoding: added tokens are split out first; each remaining fragment is cut into pre-tokens by a
// chain of regexes (PCRE2, UTF + Unicode properties), each stage keeping both its matches and the
// text between them, as Hugging Face's Split(behavior = Isolated) does; each pre-token's bytes are
// mapped to their byte-level symbols and merged by merge rank (lowest rank first, leftmost first
// among equal ranks). Decoding maps the symbols back to bytes, so Decode(Encode(s)) == s.
#ifndef SHOTDB_QUERY_TOKENIZER_BPE_TOKENIZER_H_
#define SHOTDB_QUERY_TOKENIZER_BPE_TOKENIZER_H_

#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "query/tokenizer/added_tokens.h"
#include "query/tokenizer/tokenizer.h"
#include "util/status.h"

namespace shotdb {

// The GPT-2 pre-tokenizer regex (also the ByteLevel pre-tokenizer of HF tokenizers).
extern const char kGpt2PreTokenizerRegex[];

// Everything a byte-level BPE vocabulary consists of, independent of the file it came from.
struct BpeVocab {
  std::vector<std::string> tokens;  // id -> token in byte-level form ("Ġthe")
  // Merge rules in rank order (rank 0 first), each the two byte-level tokens merged.
  std::vector<std::pair<std::string, std::string>> merges;
  std::vector<AddedToken> added_tokens;  // ids index `tokens`
  // Pre-tokenizer stages, applied in order; each splits every piece into its matches and the gaps.
  std::vector<std::string> pre_tokenizer_regexes;
  // When true, a pre-token that is itself a vocabulary entry is emitted whole, without merging
  // (HF BPE "ignore_merges", set by Llama 3).
  bool ignore_merges = false;
  int32_t unk_id = -1;  // emitted for a byte whose symbol is missing; such bytes are dropped if -1
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  bool add_bos = false;
};

// The pre-tokenizer regex chain for a GGUF tokenizer.ggml.pre value: "gpt2" / "default" (the GPT-2
// regex), "smollm" (each \p{N} character isolated, then GPT-2, which is what SmolLM2's
// tokenizer.json Sequence[Digits(individual_digits), ByteLevel] does), "llama3" / "llama-bpe"
// (the Llama 3 regex). Returns NotSupported naming `pre` for anything else.
Result<std::vector<std::string>> PreTokenizerForGgufPre(const std::string& pre);

class BpeTokenizer final : public Tokenizer {
 public:
  // Builds the tokenizer from `vocab`. `source` (the file name) prefixes error messages.
  // Errors: Corruption when a merge names a token, or produces a token, not in the vocabulary,
  // when an added token's id is out of range, or when two tokens are equal; InvalidArgument when a
  // pre-tokenizer regex does not compile (the message quotes PCRE2's reason and offset).
  static Result<std::unique_ptr<BpeTokenizer>> Create(BpeVocab vocab, const std::string& source);

  // Reads a Hugging Face tokenizer.json (model.type "BPE" with a ByteLevel pre-tokenizer).
  // Understood pre-tokenizers: ByteLevel (add_prefix_space false), Digits, Split (Regex or String
  // pattern, behavior Isolated, not inverted) and Sequence of these. bos/eos come from
  // `tokenizer_config_path` (bos_token, eos_token, add_bos_token) when it is non-empty and exists,
  // else from a TemplateProcessing post-processor that starts with a special token.
  // Errors: IOError (unreadable), Corruption (not JSON, or a required field missing or of the
  // wrong type, named by its JSON path), NotSupported (a normalizer, a non-BPE model, dropout, byte
  // fallback, subword prefixes/suffixes, an unknown pre-tokenizer, ...).
  static Result<std::unique_ptr<BpeTokenizer>> FromHfJson(const std::string& path,
                                                          const std::string& tokenizer_config_path);

  ~BpeTokenizer() override;

  Result<std::vector<int32_t>> Encode(std::string_view text, bool add_bos,
                                      bool parse_special = true) const override;
  std::string Decode(const std::vector<int32_t>& ids) const override;
  std::string TokenText(int32_t id) const override;
  size_t vocab_size() const override { return vocab_.tokens.size(); }
  int32_t bos_id() const override { return vocab_.bos_id; }
  int32_t eos_id() const override { return vocab_.eos_id; }
  bool add_bos_default() const override { return vocab_.add_bos; }
  std::string Fingerprint() const override { return fingerprint_; }

 private:
  // FromHfJson's reading; it may throw nlohmann::json's type errors, which FromHfJson reports.
  static Result<std::unique_ptr<BpeTokenizer>> FromHfJsonUnguarded(
      const std::string& path, const std::string& tokenizer_config_path);

  struct Regex;  // a compiled PCRE2 pattern
  struct MergeRule {
    int32_t rank;
    int32_t result;
  };

  BpeTokenizer() = default;
  // Appends the tokens of one pre-token (raw bytes) to `out`, through the cache.
  void EncodePiece(std::string_view piece, std::vector<int32_t>* out) const;
  // Merges the byte symbols of `piece` (uncached).
  std::vector<int32_t> MergePiece(std::string_view piece) const;
  // Cuts one ordinary-text fragment into pre-tokens.
  std::vector<std::string_view> PreTokenize(std::string_view text) const;

  BpeVocab vocab_;
  std::unordered_map<std::string, int32_t> token_to_id_;
  std::unordered_map<uint64_t, MergeRule> merges_;  // (left id << 32 | right id) -> rule
  int32_t byte_to_id_[256];                         // byte -> id of its byte-level symbol, or -1
  std::vector<std::string> id_to_bytes_;            // decoded bytes of every id
  std::vector<std::unique_ptr<Regex>> regexes_;
  AddedTokenMatcher added_;
  std::string fingerprint_;

  // Pre-token -> ids. Bounded: cleared when it reaches kMaxCacheEntries.
  static constexpr size_t kMaxCacheEntries = 1 << 16;
  mutable std::mutex cache_mu_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

}  // namespace shotdb

#endif  // SHOTDB_QUERY_TOKENIZER_BPE_TOKENIZER_H_
