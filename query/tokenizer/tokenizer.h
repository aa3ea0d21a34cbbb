// Tokenizer: text <-> token ids for the model runtime and the DBSA pool encoder.
//
// Two families are implemented (docs/tokenizer.md):
//   - byte-level BPE (GPT-2 style; SmolLM2, Llama 3, Qwen 2): BpeTokenizer, from a GGUF file whose
//     tokenizer.ggml.model is "gpt2" or from a Hugging Face tokenizer.json;
//   - SentencePiece BPE (Llama 2, Mistral): SpmVocabTokenizer, from a GGUF "llama" vocabulary
//     (tokens + scores) or a SentencePiece tokenizer.model file.
// Every implementation is immutable after loading and safe to call from many threads at once.
#ifndef SHOTDB_QUERY_TOKENIZER_TOKENIZER_H_
#define SHOTDB_QUERY_TOKENIZER_TOKENIZER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "util/status.h"

namespace shotdb {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Encodes `text` (which must be valid UTF-8) into token ids. When `add_bos` is true and the
  // vocabulary has a BOS token, bos_id() is prepended; pass add_bos_default() to follow the
  // model's own setting. When `parse_special` is true, occurrences of special-token strings
  // (e.g. "<|im_start|>") in the text become those single tokens; when false they are encoded as
  // ordinary text. Added tokens that are not special (user-defined pieces) are always matched.
  // Returns InvalidArgument when `text` is not valid UTF-8.
  virtual Result<std::vector<int32_t>> Encode(std::string_view text, bool add_bos,
                                              bool parse_special = true) const = 0;

  // Concatenates the text of `ids`. Special tokens are rendered as their text ("<|im_end|>").
  // For byte-level BPE this is the exact inverse of Encode (without BOS); for SentencePiece the
  // dummy space prefix that Encode adds is removed again. Ids outside [0, vocab_size()) are
  // skipped. The result may end in an incomplete UTF-8 sequence when `ids` is a prefix of a longer
  // encoding (a streaming decoder must hold such bytes back).
  virtual std::string Decode(const std::vector<int32_t>& ids) const = 0;

  // The vocabulary entry of `id` as stored (byte-level BPE: the mapped form, e.g. "Ġhello";
  // SentencePiece: e.g. "▁hello" or "<0x0A>"); empty for an id outside the vocabulary.
  virtual std::string TokenText(int32_t id) const = 0;

  virtual size_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;  // -1 when the vocabulary names none
  virtual int32_t eos_id() const = 0;  // -1 when the vocabulary names none
  // Whether the model expects BOS to be prepended (GGUF tokenizer.ggml.add_bos_token).
  virtual bool add_bos_default() const = 0;

  // A stable hex digest of everything that affects Encode: the vocabulary, merges or scores,
  // pre-tokenizer, added/special tokens, BOS id and add-BOS setting. Two tokenizers with the same
  // fingerprint encode every text identically. Stored with a task as part of the model fingerprint
  // so that a pool is never queried with a different tokenizer.
  virtual std::string Fingerprint() const = 0;
};

// Loads a tokenizer from `path`, which may be:
//   - a GGUF file (its tokenizer.ggml.* metadata; model "gpt2" or "llama");
//   - a Hugging Face tokenizer.json (byte-level BPE only); a tokenizer_config.json in the same
//     directory supplies bos_token / eos_token / add_bos_token when present;
//   - a directory holding tokenizer.json (preferred) or tokenizer.model;
//   - a SentencePiece .model file.
// Errors: NotFound (no such file / nothing loadable in the directory), IOError (unreadable),
// Corruption (malformed file or inconsistent field, e.g. a merge naming a token not in the
// vocabulary), NotSupported (a valid but unimplemented variant, e.g. a WordPiece model). Messages
// name the file and the field.
Result<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& path);

}  // namespace shotdb

#endif  // SHOTDB_QUERY_TOKENIZER_TOKENIZER_H_
