// Block records (format/block_record.h): header parsing, payload decoding and verification.
#include <vector>

#include "format/block_record.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto view = shotdb::ParseBlockRecord(data, size, "fuzz");
  if (!view.ok()) return 0;
  (void)shotdb::VerifyBlockRecord(*view, "fuzz");
  if (view->header.raw_size <= (size_t{64} << 20)) {
    std::vector<uint8_t> out(view->header.raw_size);
    (void)shotdb::DecodeBlockRecord(*view, out.data(), out.size(), "fuzz");
  }
  return 0;
}
