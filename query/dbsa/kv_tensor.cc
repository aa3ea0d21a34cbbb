#include "query/dbsa/kv_tensor.h"

#include <xxhash.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "format/mapped_file.h"
#include "util/file_util.h"

namespace shotdb {

torch::ScalarType TorchType(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return torch::kFloat32;
    case DType::kF16:
      return torch::kFloat16;
    case DType::kBF16:
      return torch::kBFloat16;
    case DType::kF64:
      return torch::kFloat64;
  }
  return torch::kFloat32;
}

Result<DType> StoredType(torch::ScalarType type) {
  switch (type) {
    case torch::kFloat32:
      return DType::kF32;
    case torch::kFloat16:
      return DType::kF16;
    case torch::kBFloat16:
      return DType::kBF16;
    case torch::kFloat64:
      return DType::kF64;
    default:
      return Status::NotSupported(std::string("no stored K/V type for torch type ") +
                                  c10::toString(type));
  }
}

Result<std::string> WeightsDigest(const std::string& model_path) {
  std::vector<std::string> files;
  if (IsDirectory(model_path)) {
    SHOTDB_ASSIGN_OR_RETURN(std::vector<std::string> names, ListDirectory(model_path));
    for (const auto& name : names) {
      if (name == "config.json" || Extension(name) == ".safetensors") {
        files.push_back(JoinPath(model_path, name));
      }
    }
  } else {
    files.push_back(model_path);
  }
  if (files.empty()) return Status::NotFound(model_path + ": no model files to fingerprint");
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  for (const auto& f : files) {
    auto mapped = MappedFile::Open(f);
    if (!mapped.ok()) {
      XXH3_freeState(state);
      return mapped.status();
    }
    XXH3_64bits_update(state, (*mapped)->data(), (*mapped)->size());
  }
  const uint64_t h = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return std::string(hex);
}

}  // namespace shotdb
