// Hugging Face config.json parser (query/model/config.h).
#include <string>

#include "query/model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)shotdb::ParseHfConfig(std::string(reinterpret_cast<const char*>(data), size), "fuzz");
  return 0;
}
