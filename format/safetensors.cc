#include "format/safetensors.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>

#include "format/dtype.h"
#include "util/csv.h"
#include "util/file_util.h"

namespace shotdb {

size_t SafetensorsDTypeSize(std::string_view d) {
  if (d == "F64" || d == "I64" || d == "U64") return 8;
  if (d == "F32" || d == "I32" || d == "U32") return 4;
  if (d == "F16" || d == "BF16" || d == "I16" || d == "U16") return 2;
  if (d == "I8" || d == "U8" || d == "BOOL" || d == "F8_E4M3" || d == "F8_E5M2") return 1;
  return 0;
}

Result<SafetensorsFile> SafetensorsFile::Open(const std::string& path) {
  SafetensorsFile f;
  SHOTDB_ASSIGN_OR_RETURN(f.file_, MappedFile::Open(path));
  const uint8_t* base = f.file_->data();
  const uint64_t size = f.file_->size();
  uint64_t header_len = 0;
  if (size < 8) return Status::Corruption(path + ": too short for a safetensors header");
  std::memcpy(&header_len, base, 8);
  if (header_len > size - 8) {
    return Status::Corruption(path + ": header length " + std::to_string(header_len) +
                              " exceeds the file size " + std::to_string(size));
  }
  const auto* begin = reinterpret_cast<const char*>(base + 8);
  nlohmann::json header = nlohmann::json::parse(begin, begin + header_len, nullptr, false);
  if (header.is_discarded() || !header.is_object()) {
    return Status::Corruption(path + ": header is not a JSON object");
  }
  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = size - data_start;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") {
      if (!it->is_object()) return Status::Corruption(path + ": __metadata__ is not an object");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) {
          return Status::Corruption(path + ": __metadata__['" + m.key() + "'] is not a string");
        }
        f.metadata_[m.key()] = m->get<std::string>();
      }
      continue;
    }
    const std::string what = path + ": tensor '" + name + "'";
    const auto& t = *it;
    if (!t.is_object() || !t.contains("dtype") || !t["dtype"].is_string() || !t.contains("shape") ||
        !t["shape"].is_array() || !t.contains("data_offsets") || !t["data_offsets"].is_array() ||
        t["data_offsets"].size() != 2) {
      return Status::Corruption(what + ": expected {dtype, shape, data_offsets: [begin, end]}");
    }
    SafetensorsTensor tensor;
    tensor.name = name;
    tensor.dtype = t["dtype"].get<std::string>();
    const size_t elem = SafetensorsDTypeSize(tensor.dtype);
    if (elem == 0) return Status::NotSupported(what + ": unknown dtype '" + tensor.dtype + "'");
    uint64_t numel = 1;
    for (const auto& d : t["shape"]) {
      if (!d.is_number_unsigned())
        return Status::Corruption(what + ": shape entries must be non-negative integers");
      const uint64_t v = d.get<uint64_t>();
      if (__builtin_mul_overflow(numel, v, &numel))
        return Status::Corruption(what + ": shape overflows");
      tensor.shape.push_back(static_cast<int64_t>(v));
    }
    const auto& off = t["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
      return Status::Corruption(what + ": data_offsets must be non-negative integers");
    }
    const uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
    uint64_t expect;
    if (__builtin_mul_overflow(numel, elem, &expect) || e < b || e - b != expect) {
      return Status::Corruption(what + ": data_offsets [" + std::to_string(b) + ", " +
                                std::to_string(e) + ") hold " + std::to_string(e - b) +
                                " bytes, shape and dtype need " + std::to_string(numel * elem));
    }
    if (e > data_size) {
      return Status::Corruption(what + ": data ends at " + std::to_string(e) +
                                ", past the data section of " + std::to_string(data_size) +
                                " bytes");
    }
    tensor.data = base + data_start + b;
    tensor.nbytes = e - b;
    if (tensor.nbytes > 0) ranges.push_back({b, e});
    f.index_.emplace(name, f.tensors_.size());
    f.tensors_.push_back(std::move(tensor));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) {
      return Status::Corruption(path + ": tensor data ranges overlap at offset " +
                                std::to_string(ranges[i].first));
    }
  }
  return f;
}

const SafetensorsTensor* SafetensorsFile::Find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Result<SafetensorsCheckpoint> SafetensorsCheckpoint::OpenDir(const std::string& dir_or_file) {
  const std::string dir = IsDirectory(dir_or_file) ? dir_or_file : DirName(dir_or_file);
  SafetensorsCheckpoint c;
  c.dir_ = dir;
  std::vector<std::string> shards;
  const std::string index = JoinPath(dir, "model.safetensors.index.json");
  if (PathExists(index)) {
    SHOTDB_ASSIGN_OR_RETURN(std::string text, ReadFileToString(index));
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
      return Status::Corruption(index + ": expected a JSON object with weight_map");
    }
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it->is_string())
        return Status::Corruption(index + ": weight_map['" + it.key() + "'] is not a file name");
      const std::string shard = it->get<std::string>();
      if (std::find(shards.begin(), shards.end(), shard) == shards.end()) shards.push_back(shard);
    }
    std::sort(shards.begin(), shards.end());
  } else if (PathExists(JoinPath(dir, "model.safetensors"))) {
    shards.push_back("model.safetensors");
  } else {
    SHOTDB_ASSIGN_OR_RETURN(std::vector<std::string> names, ListDirectory(dir));
    for (const auto& name : names) {
      if (Extension(name) == ".safetensors") shards.push_back(name);
    }
  }
  if (shards.empty()) return Status::NotFound(c.dir_ + ": no .safetensors files");
  for (const auto& shard : shards) {
    SHOTDB_ASSIGN_OR_RETURN(SafetensorsFile f, SafetensorsFile::Open(JoinPath(dir, shard)));
    for (const auto& t : f.tensors()) {
      if (!c.owner_.emplace(t.name, c.files_.size()).second) {
        return Status::Corruption(c.dir_ + ": tensor '" + t.name +
                                  "' appears in more than one shard");
      }
    }
    c.files_.push_back(std::move(f));
  }
  return c;
}

Result<SafetensorsTensor> SafetensorsCheckpoint::Find(std::string_view name) const {
  auto it = owner_.find(name);
  if (it == owner_.end()) {
    return Status::NotFound(dir_ + ": no tensor '" + std::string(name) + "'");
  }
  return *files_[it->second].Find(name);
}

std::vector<std::string> SafetensorsCheckpoint::TensorNames() const {
  std::vector<std::string> names;
  for (const auto& kv : owner_) names.push_back(kv.first);
  return names;
}

Status SafetensorsToFloat32(const SafetensorsTensor& t, float* out, size_t out_count) {
  const size_t elem = SafetensorsDTypeSize(t.dtype);
  if (elem == 0 || t.nbytes / elem != out_count) {
    return Status::InvalidArgument("tensor '" + t.name + "' has " +
                                   std::to_string(elem ? t.nbytes / elem : 0) +
                                   " elements, buffer holds " + std::to_string(out_count));
  }
  // Element-wise memcpy: safetensors data carries no alignment guarantee.
  const uint8_t* p = t.data;
  if (t.dtype == "F32") {
    if (out_count) std::memcpy(out, p, out_count * 4);
  } else if (t.dtype == "F64") {
    for (size_t i = 0; i < out_count; ++i) {
      double d;
      std::memcpy(&d, p + 8 * i, 8);
      out[i] = static_cast<float>(d);
    }
  } else if (t.dtype == "F16" || t.dtype == "BF16") {
    const bool half = t.dtype == "F16";
    for (size_t i = 0; i < out_count; ++i) {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      out[i] = half ? HalfToFloat(h) : BFloat16ToFloat(h);
    }
  } else {
    return Status::NotSupported("tensor '" + t.name + "': dtype " + t.dtype +
                                " cannot be converted to float32");
  }
  return Status::OK();
}

}  // namespace shotdb
