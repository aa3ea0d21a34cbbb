// Test helpers for query/model: fixture paths and a reader for the golden .safetensors files that
// tests/scripts/make_model_fixtures.py writes with HF transformers (tokens, logits, K/V).
#ifndef SHOTDB_QUERY_MODEL_TEST_UTIL_H_
#define SHOTDB_QUERY_MODEL_TEST_UTIL_H_

#include <torch/torch.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

namespace shotdb::testing {

inline std::string FixtureDir(const std::string& name) {
  return std::string(SHOTDB_SOURCE_DIR) + "/tests/fixtures/model/" + name;
}

// Reads every tensor of a small safetensors file (F32, F64 or I64) into CPU tensors. Fails the
// calling test (via the returned empty map) when the file is unreadable.
inline std::map<std::string, torch::Tensor> ReadGolden(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buf;
  buf << in.rdbuf();
  const std::string bytes = buf.str();
  std::map<std::string, torch::Tensor> out;
  if (bytes.size() < 8) return out;
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  auto header = nlohmann::json::parse(bytes.substr(8, header_len));
  const char* data = bytes.data() + 8 + header_len;
  for (auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    const std::string dt = info["dtype"];
    auto type = dt == "F32" ? torch::kFloat32 : dt == "F64" ? torch::kFloat64 : torch::kInt64;
    std::vector<int64_t> shape = info["shape"].get<std::vector<int64_t>>();
    const uint64_t begin = info["data_offsets"][0];
    torch::Tensor t = torch::empty(shape, type);
    std::memcpy(t.data_ptr(), data + begin, t.numel() * t.element_size());
    out[name] = t;
  }
  return out;
}

// max |a - b| / max |b|: the relative error the golden comparisons bound.
inline double RelativeError(const torch::Tensor& a, const torch::Tensor& b) {
  auto x = a.to(torch::kFloat64).cpu(), y = b.to(torch::kFloat64).cpu();
  return (x - y).abs().max().item<double>() / y.abs().max().item<double>();
}

}  // namespace shotdb::testing

#endif  // SHOTDB_QUERY_MODEL_TEST_UTIL_H_
