#include "query/dbsa/kv_tensor.h"

#include <xxhash.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "format/kv_values.h"
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
    case DType::kF8E4M3:
    case DType::kI8:
      return torch::kByte;
  }
  return torch::kFloat32;
}

torch::Tensor StoredKvTensor(DType dtype, const void* raw, int64_t kv_heads, int64_t tokens,
                             int64_t head_dim) {
  if (!IsScaledDType(dtype)) {
    return torch::from_blob(const_cast<void*>(raw), {kv_heads, tokens, head_dim},
                            torch::TensorOptions().dtype(TorchType(dtype)));
  }
  torch::Tensor out = torch::empty({kv_heads, tokens, head_dim}, torch::kFloat32);
  KvToFloat(dtype, static_cast<uint32_t>(kv_heads), static_cast<uint32_t>(tokens),
            static_cast<uint32_t>(head_dim), raw, out.data_ptr<float>());
  return out;
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

std::vector<LayerKV> ConcatenateBlocks(uint32_t layers, int64_t kv_heads, int64_t head_dim,
                                       const std::vector<int64_t>& lengths,
                                       const torch::TensorOptions& options,
                                       const BlockKvFn& block_kv) {
  int64_t total = 0;
  for (int64_t n : lengths) total += n;
  std::vector<LayerKV> context(layers);
  for (uint32_t l = 0; l < layers; ++l) {
    context[l] = {torch::empty({kv_heads, total, head_dim}, options),
                  torch::empty({kv_heads, total, head_dim}, options)};
    int64_t offset = 0;
    for (size_t i = 0; i < lengths.size(); ++i) {
      for (int kv = 0; kv < 2; ++kv) {
        torch::Tensor& dst = kv == 0 ? context[l].k : context[l].v;
        dst.narrow(1, offset, lengths[i]).copy_(block_kv(i, l, kv));
      }
      offset += lengths[i];
    }
  }
  return context;
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
