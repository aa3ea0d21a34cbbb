// SentencePiece .model reader (our own protobuf wire-format parser) and the tokenizer it builds.
#include <string_view>

#include "query/tokenizer/spm_model_file.h"
#include "query/tokenizer/spm_tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto vocab = shotdb::ParseSentencePieceModel(
      std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
  if (vocab.ok()) {
    auto tokenizer = shotdb::SpmVocabTokenizer::Create(*vocab, "fuzz");
    if (tokenizer.ok()) {
      auto ids = (*tokenizer)->Encode("Wake me up at 7 tomorrow", true, false);
      if (ids.ok()) (void)(*tokenizer)->Decode(*ids);
    }
  }
  return 0;
}
