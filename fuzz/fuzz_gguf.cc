// GGUF reader (format/gguf.h) and the model hyperparameters and tokenizer read from it.
#include "format/gguf.h"
#include "fuzz/fuzz_util.h"
#include "query/model/config.h"
#include "query/tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = shotdb::fuzz::WriteInput(data, size, "input.gguf");
  auto file = shotdb::GgufFile::Open(path);
  if (file.ok()) {
    (void)shotdb::ConfigFromGguf(*file, path);
    auto tokenizer = shotdb::LoadTokenizer(path);
    if (tokenizer.ok()) (void)(*tokenizer)->Encode("wake me up at 7", true, false);
  }
  return 0;
}
