// GgufFile: a validated, memory-mapped GGUF file (versions 2 and 3, little-endian).
//
// Layout: "GGUF", u32 version, u64 tensor count, u64 metadata count; metadata entries (string key,
// u32 value type, value); tensor infos (string name, u32 n_dims, u64 dims[n_dims] with dims[0]
// the fastest-varying, u32 ggml type, u64 offset relative to the data section); padding to
// `general.alignment` (default 32); the data section. Strings are u64 length + bytes.
// Open checks everything before returning: counts and lengths against the bytes left, value and
// tensor types, dimension counts (1..4) and products, offsets aligned and inside the file, and
// tensors not overlapping. Errors name the file and the key or tensor.
#ifndef SHOTDB_FORMAT_GGUF_H_
#define SHOTDB_FORMAT_GGUF_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "format/mapped_file.h"
#include "format/quant.h"
#include "util/status.h"

namespace shotdb {

// One metadata value. Integer types keep their value in `u` (unsigned) or `i` (signed).
struct GgufValue {
  enum class Type : uint32_t {
    kUInt8 = 0,
    kInt8 = 1,
    kUInt16 = 2,
    kInt16 = 3,
    kUInt32 = 4,
    kInt32 = 5,
    kFloat32 = 6,
    kBool = 7,
    kString = 8,
    kArray = 9,
    kUInt64 = 10,
    kInt64 = 11,
    kFloat64 = 12,
  };
  Type type = Type::kUInt8;
  uint64_t u = 0;
  int64_t i = 0;
  double f = 0;
  bool b = false;
  std::string s;
  Type element_type = Type::kUInt8;  // for kArray
  std::vector<GgufValue> array;      // for kArray

  bool IsUnsigned() const;
  bool IsSigned() const;
  bool IsFloat() const { return type == Type::kFloat32 || type == Type::kFloat64; }
};

struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::kF32;
  std::vector<uint64_t> dims;  // GGUF order: dims[0] is the fastest-varying dimension
  uint64_t numel = 0;
  uint64_t offset = 0;  // absolute, in the file
  uint64_t nbytes = 0;
  const uint8_t* data = nullptr;  // into the mapping; valid while the GgufFile lives
};

class GgufFile {
 public:
  // Maps and validates `path` (see the file comment). IOError if unreadable; Corruption for a
  // malformed file; NotSupported for version 1 or a tensor of an unsupported ggml type.
  static Result<GgufFile> Open(const std::string& path);

  GgufFile(GgufFile&&) = default;
  GgufFile& operator=(GgufFile&&) = default;

  const std::string& path() const { return file_->path(); }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }

  // nullptr if `key` is absent.
  const GgufValue* Find(std::string_view key) const;
  std::vector<std::string> Keys() const;  // in file order

  // Typed getters: NotFound naming the key if absent; InvalidArgument naming the key and the
  // stored type if the value has another type (or, for GetUInt, is negative).
  Result<std::string> GetString(std::string_view key) const;
  Result<uint64_t> GetUInt(std::string_view key) const;  // any integer type
  Result<double> GetFloat(std::string_view key) const;   // float32/64 or any integer type
  Result<bool> GetBool(std::string_view key) const;
  Result<std::vector<std::string>> GetStringArray(std::string_view key) const;
  Result<std::vector<int64_t>> GetIntArray(std::string_view key) const;
  Result<std::vector<double>> GetFloatArray(std::string_view key) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  // nullptr if there is no tensor `name`.
  const GgufTensorInfo* FindTensor(std::string_view name) const;

  // Dequantizes/converts `tensor` to float32. InvalidArgument naming the tensor if `out_count`
  // differs from its element count.
  Status ReadFloat32(const GgufTensorInfo& tensor, float* out, size_t out_count) const;

 private:
  GgufFile() = default;
  std::unique_ptr<MappedFile> file_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::vector<std::pair<std::string, GgufValue>> kvs_;
  std::map<std::string, size_t, std::less<>> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
};

// "uint8", "string", "array", ... for error messages.
std::string_view GgufTypeName(GgufValue::Type type);

}  // namespace shotdb

#endif  // SHOTDB_FORMAT_GGUF_H_
