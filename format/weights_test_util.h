// Helpers shared by the weight-reader tests: fixture paths, golden values, damaged copies.
#ifndef SHOTDB_FORMAT_WEIGHTS_TEST_UTIL_H_
#define SHOTDB_FORMAT_WEIGHTS_TEST_UTIL_H_

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

namespace shotdb::testing_util {

inline std::string WeightsFixture(const std::string& name) {
  return std::string(SHOTDB_SOURCE_DIR) + "/tests/fixtures/weights/" + name;
}

inline std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The golden float32 values of tensor `name` in a *.golden.json fixture (hex of little-endian f32).
inline std::vector<float> GoldenFloats(const std::string& golden_file, const std::string& name) {
  const auto j = nlohmann::json::parse(ReadAll(WeightsFixture(golden_file)));
  const std::string hex = j.at(name).at("f32_hex").get<std::string>();
  std::vector<uint8_t> bytes(hex.size() / 2);
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = std::stoi(hex.substr(2 * i, 2), nullptr, 16);
  std::vector<float> out(bytes.size() / 4);
  std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

// Writes `bytes` to a fresh temporary file and removes it when destroyed.
class TempFile {
 public:
  explicit TempFile(const std::string& bytes, const std::string& suffix = "") {
    char tmpl[] = "/tmp/shotdb_weights_XXXXXX";
    const int fd = mkstemp(tmpl);
    close(fd);
    path_ = std::string(tmpl) + suffix;
    if (!suffix.empty()) std::rename(tmpl, path_.c_str());
    std::ofstream(path_, std::ios::binary) << bytes;
  }
  ~TempFile() { std::remove(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace shotdb::testing_util

#endif  // SHOTDB_FORMAT_WEIGHTS_TEST_UTIL_H_
