// safetensors reader (format/safetensors.h).
#include "format/safetensors.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = shotdb::fuzz::WriteInput(data, size, "input.safetensors");
  auto file = shotdb::SafetensorsFile::Open(path);
  (void)file;
  return 0;
}
