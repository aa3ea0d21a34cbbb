// Safetensors files and Hugging Face checkpoint directories, memory-mapped and validated.
//
// A .safetensors file is: u64 little-endian header length N, N bytes of JSON
//   {"__metadata__": {"k": "v", ...}, "<tensor>": {"dtype": "F32", "shape": [..],
//    "data_offsets": [begin, end]}, ...}
// then the data section; offsets are relative to its start. Open checks the JSON, every dtype,
// that end - begin equals the element count times the dtype size, that ranges lie inside the data
// section and do not overlap. Errors name the file and the tensor.
#ifndef SHOTDB_FORMAT_SAFETENSORS_H_
#define SHOTDB_FORMAT_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "format/mapped_file.h"
#include "util/status.h"

namespace shotdb {

struct SafetensorsTensor {
  std::string name;
  std::string dtype;  // as in the file: "F64", "F32", "F16", "BF16", "I64", "I32", "U8", ...
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapping (no alignment guarantee)
  size_t nbytes = 0;
};

// Bytes per element of a safetensors dtype name; 0 for an unknown name.
size_t SafetensorsDTypeSize(std::string_view dtype);

class SafetensorsFile {
 public:
  static Result<SafetensorsFile> Open(const std::string& path);
  SafetensorsFile(SafetensorsFile&&) = default;
  SafetensorsFile& operator=(SafetensorsFile&&) = default;

  const std::string& path() const { return file_->path(); }
  const std::vector<SafetensorsTensor>& tensors() const { return tensors_; }
  // nullptr if absent.
  const SafetensorsTensor* Find(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::unique_ptr<MappedFile> file_;
  std::vector<SafetensorsTensor> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
};

// An HF model directory: model.safetensors, or model.safetensors.index.json naming the shard of
// every tensor, or else every *.safetensors file in it. `dir` may also be the path of a file inside
// it (e.g. config.json).
class SafetensorsCheckpoint {
 public:
  static Result<SafetensorsCheckpoint> OpenDir(const std::string& dir);
  SafetensorsCheckpoint(SafetensorsCheckpoint&&) = default;
  SafetensorsCheckpoint& operator=(SafetensorsCheckpoint&&) = default;

  // NotFound naming the tensor and the directory if no shard holds `name`.
  Result<SafetensorsTensor> Find(std::string_view name) const;
  std::vector<std::string> TensorNames() const;  // sorted

 private:
  SafetensorsCheckpoint() = default;
  std::string dir_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t, std::less<>> owner_;  // tensor name -> index in files_
};

// Converts a tensor's elements to float32 (F64, F32, F16, BF16). NotSupported for other dtypes;
// InvalidArgument if `out_count` differs from the element count.
Status SafetensorsToFloat32(const SafetensorsTensor& tensor, float* out, size_t out_count);

}  // namespace shotdb

#endif  // SHOTDB_FORMAT_SAFETENSORS_H_
