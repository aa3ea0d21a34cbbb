// Demonstration files: CSV and JSON Lines (query/dbsa/demo_file.h). The first byte picks the
// format, the rest is the file.
#include "fuzz/fuzz_util.h"
#include "query/dbsa/demo_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const bool jsonl = data[0] & 1;
  const std::string path =
      shotdb::fuzz::WriteInput(data + 1, size - 1, jsonl ? "demos.jsonl" : "demos.csv");
  (void)shotdb::ReadLabeledTexts(path, {});
  return 0;
}
