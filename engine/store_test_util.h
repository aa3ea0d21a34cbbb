// Test helpers shared by the store's test files: temporary directories and deterministic blocks
// whose every byte can be recomputed from (seed, block, layer, kind) to check what a store returns.
#ifndef SHOTDB_ENGINE_STORE_TEST_UTIL_H_
#define SHOTDB_ENGINE_STORE_TEST_UTIL_H_

#include <stdlib.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "engine/store.h"
#include "format/dtype.h"
#include "format/kv_values.h"

namespace shotdb {
namespace testing_util {

// A fresh directory under $TMPDIR (or /tmp), removed with everything in it on destruction.
class TempDir {
 public:
  TempDir() {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base != nullptr ? base : "/tmp") + "/shotdb_store_XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    path_ = ::mkdtemp(buf.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string Sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

// Flips one byte, at offset `at` of every occurrence of `needle` in the file (a record in a leaf
// page can also survive in an older, freed copy of that page). Returns false if there is none.
inline bool FlipInFile(const std::string& path, const std::vector<uint8_t>& needle, size_t at) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  bool found = false;
  for (auto it = std::search(bytes.begin(), bytes.end(), needle.begin(), needle.end());
       it != bytes.end(); it = std::search(it + 1, bytes.end(), needle.begin(), needle.end())) {
    const size_t pos = static_cast<size_t>(it - bytes.begin()) + at;
    f.clear();
    f.seekp(static_cast<std::streamoff>(pos));
    const char flipped = static_cast<char>(bytes[pos] ^ 0x10);
    f.write(&flipped, 1);
    found = static_cast<bool>(f);
  }
  return found;
}

inline uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline ModelFingerprint SmallModel(DType dtype = DType::kBF16, uint32_t layers = 3) {
  ModelFingerprint m;
  m.architecture = "llama";
  m.dtype = dtype;
  m.tokenizer_hash = "tok-0123";
  m.num_layers = layers;
  m.kv_heads = 2;
  m.head_dim = 8;
  return m;
}

inline TaskInfo MakeTask(const std::string& name, const ModelFingerprint& model,
                         Codec codec = Codec::kRaw) {
  TaskInfo t;
  t.name = name;
  t.model = model;
  t.codec = codec;
  t.prompt_template = "utterance: {text}\nintent: {label}";
  t.separator = "\n==\n";
  t.labels = {"alarm_set", "weather_query", "play_music"};
  t.metadata_json = R"({"source":"test"})";
  return t;
}

// The raw bytes of tensor (block, layer, kind) for `seed`: normal-looking values (a sum of four
// uniforms) with a per-channel scale, stored in model.dtype.
inline std::vector<uint8_t> TensorBytes(const ModelFingerprint& model, uint32_t tokens,
                                        uint64_t seed, uint32_t block, uint32_t layer,
                                        TensorKind kind) {
  const size_t n = static_cast<size_t>(model.kv_heads) * tokens * model.head_dim;
  std::vector<float> f(n);
  uint64_t state = seed * 1000003u + block * 7919u + layer * 131u + static_cast<uint64_t>(kind);
  for (size_t i = 0; i < n; ++i) {
    uint64_t r = SplitMix64(state + i);
    float u = 0;
    for (int j = 0; j < 4; ++j) u += static_cast<float>((r >> (16 * j)) & 0xFFFF) / 65536.0f;
    const float scale = 1.0f + static_cast<float>(i % model.head_dim) * 0.25f;
    f[i] = (u - 2.0f) * scale;
  }
  std::vector<uint8_t> bytes(*KvRawBytes(model.dtype, model.kv_heads, tokens, model.head_dim));
  const Status s =
      KvFromFloat(model.dtype, model.kv_heads, tokens, model.head_dim, f.data(), bytes.data());
  if (!s.ok()) std::abort();  // finite inputs: cannot fail
  return bytes;
}

// A block to append: tensors from TensorBytes, `demos` demonstrations with ids block*1000+i, and a
// text built from them. Owns the tensor bytes that block.keys/values point to.
struct TestBlock {
  NewBlock block;
  std::vector<std::vector<uint8_t>> tensors;  // layer-major, K then V
};

inline std::string DemoText(uint32_t block, uint32_t i) {
  static const char* const kWords[] = {"set",   "an",     "alarm", "for",   "seven", "weather",
                                       "today", "rain",   "play",  "music", "jazz",  "tomorrow",
                                       "wake",  "remind", "me",    "song",  "loud",  "city"};
  std::string text;
  uint64_t r = SplitMix64(block * 131u + i);
  for (int w = 0; w < 4 + static_cast<int>(r % 5); ++w) {
    if (!text.empty()) text += ' ';
    text += kWords[SplitMix64(r + w) % (sizeof kWords / sizeof kWords[0])];
  }
  return text;
}

inline TestBlock MakeBlock(const ModelFingerprint& model, uint64_t seed, uint32_t index,
                           uint64_t position_offset, uint32_t tokens = 5, uint32_t demos = 2) {
  TestBlock tb;
  NewBlock& b = tb.block;
  b.model = model;
  b.info.index = index;
  b.info.position_offset = position_offset;
  b.info.token_count = tokens;
  for (uint32_t i = 0; i < demos; ++i) {
    Demonstration d;
    d.id = static_cast<uint64_t>(index) * 1000 + i;
    d.text = DemoText(index, i);
    d.label = (i % 2 == 0) ? "alarm_set" : "play_music";
    b.info.demo_ids.push_back(d.id);
    if (!b.info.text.empty()) b.info.text += "\n==\n";
    b.info.text += "utterance: " + d.text + "\nintent: " + d.label;
    b.demos.push_back(std::move(d));
  }
  for (uint32_t layer = 0; layer < model.num_layers; ++layer) {
    for (TensorKind kind : {TensorKind::kKey, TensorKind::kValue}) {
      tb.tensors.push_back(TensorBytes(model, tokens, seed, index, layer, kind));
    }
  }
  for (uint32_t layer = 0; layer < model.num_layers; ++layer) {
    b.keys.push_back(tb.tensors[2 * layer].data());
    b.values.push_back(tb.tensors[2 * layer + 1].data());
  }
  return tb;
}

}  // namespace testing_util
}  // namespace shotdb

#endif  // SHOTDB_ENGINE_STORE_TEST_UTIL_H_
