// Hugging Face tokenizer.json (byte-level BPE) loader and the tokenizer it builds.
#include "fuzz/fuzz_util.h"
#include "query/tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = shotdb::fuzz::WriteInput(data, size, "tokenizer.json");
  auto tokenizer = shotdb::LoadTokenizer(path);
  if (tokenizer.ok()) {
    auto ids = (*tokenizer)->Encode("Wake me up at 7 A.M. tomorrow, caf\xc3\xa9!", true, false);
    if (ids.ok()) (void)(*tokenizer)->Decode(*ids);
  }
  return 0;
}
