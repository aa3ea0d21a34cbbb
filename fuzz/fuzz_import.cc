// The export-file importer (engine/export.h): a damaged or hostile file must be refused whole,
// leaving no task behind.
#include <xxhash.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "engine/export.h"
#include "engine/store.h"
#include "fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static shotdb::Store* store = [] {
    shotdb::Store::Options options;
    options.sync = false;
    auto s = shotdb::Store::Open(shotdb::fuzz::ScratchDir() + "/store", options);
    if (!s.ok()) std::abort();
    return s->release();
  }();
  // The file ends with the xxh3-64 of every byte before it. Mutated inputs would nearly all stop
  // there, so for inputs of even length the trailer is recomputed and the parser behind it gets
  // the mutated body.
  std::vector<uint8_t> bytes(data, data + size);
  if (size >= 8 && (size & 1) == 0) {
    const uint64_t hash = XXH3_64bits(bytes.data(), size - 8);
    for (int i = 0; i < 8; ++i) bytes[size - 8 + i] = static_cast<uint8_t>(hash >> (8 * i));
  }
  const std::string path = shotdb::fuzz::WriteInput(bytes.data(), size, "input.shotdb");
  std::string name;
  if (shotdb::ImportTask(store, path, &name).ok()) {
    // Accepted: it must verify, and is removed for the next input.
    if (!store->Verify(name, nullptr).ok()) std::abort();
    if (!store->DeleteTask(name).ok()) std::abort();
  }
  auto snapshot = store->BeginSnapshot();
  if (!snapshot.ok() || !(*snapshot)->ListTasks()->empty()) std::abort();  // nothing left behind
  return 0;
}
