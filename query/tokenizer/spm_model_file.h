// Reads a SentencePiece tokenizer.model file into an SpmVocab, without libsentencepiece.
//
// The file is a serialized sentencepiece.ModelProto. We decode the protobuf wire format directly
// (pieces, trainer and normalizer options) rather than link libsentencepiece: that library pulls in
// protobuf-lite, which clashes with the full protobuf inside Debian's libtorch and crashes any
// binary that links both before main() runs.
//
// Supported: BPE models with identity normalization and whitespace kept as is, which is what Llama
// 2 and Mistral ship. Everything else is refused with an error naming the option, never
// approximated.
#ifndef SHOTDB_QUERY_TOKENIZER_SPM_MODEL_FILE_H_
#define SHOTDB_QUERY_TOKENIZER_SPM_MODEL_FILE_H_

#include <string>
#include <string_view>

#include "query/tokenizer/spm_tokenizer.h"
#include "util/status.h"

namespace shotdb {

// Decodes the ModelProto bytes in `proto`. Errors (messages prefixed by `source`): Corruption for
// malformed protobuf (truncated varints or fields, wrong wire types); NotSupported for unigram,
// word or char models, a normalizer other than "identity", or remove_extra_whitespaces.
Result<SpmVocab> ParseSentencePieceModel(std::string_view proto, const std::string& source);

// Reads and parses the file at `path`. IOError/NotFound when it cannot be read.
Result<SpmVocab> ReadSentencePieceModel(const std::string& path);

}  // namespace shotdb

#endif  // SHOTDB_QUERY_TOKENIZER_SPM_MODEL_FILE_H_
