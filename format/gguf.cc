#include "format/gguf.h"

#include <algorithm>
#include <cstring>

namespace shotdb {

namespace {

constexpr uint32_t kMaxDims = 4;
// A nested array deeper than this is certainly a damaged file, and recursion must be bounded.
constexpr int kMaxArrayDepth = 8;

// Sequential little-endian reads over the mapped bytes; every read checks the bytes left.
class Reader {
 public:
  Reader(const uint8_t* data, size_t size, const std::string& path)
      : data_(data), size_(size), path_(path) {}

  size_t pos() const { return pos_; }
  size_t left() const { return size_ - pos_; }

  template <typename T>
  Status Read(T* out, const std::string& what) {
    if (left() < sizeof(T)) return Truncated(what);
    std::memcpy(out, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return Status::OK();
  }

  Status ReadString(std::string* out, const std::string& what) {
    uint64_t len = 0;
    SHOTDB_RETURN_IF_ERROR(Read(&len, what + " length"));
    if (len > left()) {
      return Status::Corruption(path_ + ": " + what + ": string length " + std::to_string(len) +
                                " exceeds the " + std::to_string(left()) + " bytes left");
    }
    out->assign(reinterpret_cast<const char*>(data_ + pos_), len);
    pos_ += len;
    return Status::OK();
  }

  Status Truncated(const std::string& what) const {
    return Status::Corruption(path_ + ": truncated at byte " + std::to_string(pos_) +
                              " while reading " + what);
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& path_;
};

bool IsKnownValueType(uint32_t t) { return t <= static_cast<uint32_t>(GgufValue::Type::kFloat64); }

size_t MinValueBytes(GgufValue::Type t) {
  using T = GgufValue::Type;
  switch (t) {
    case T::kUInt8:
    case T::kInt8:
    case T::kBool:
      return 1;
    case T::kUInt16:
    case T::kInt16:
      return 2;
    case T::kUInt32:
    case T::kInt32:
    case T::kFloat32:
      return 4;
    case T::kUInt64:
    case T::kInt64:
    case T::kFloat64:
    case T::kString:
      return 8;
    case T::kArray:
      return 12;
  }
  return 1;
}

Status ReadValue(Reader* r, GgufValue::Type type, GgufValue* v, const std::string& what, int depth,
                 const std::string& path) {
  using T = GgufValue::Type;
  v->type = type;
  switch (type) {
    case T::kUInt8: {
      uint8_t x{};
      SHOTDB_RETURN_IF_ERROR(r->Read(&x, what));
      v->u = x;
      return Status::OK();
    }
    case T::kUInt16: {
      uint16_t x{};
      SHOTDB_RETURN_IF_ERROR(r->Read(&x, what));
      v->u = x;
      return Status::OK();
    }
    case T::kUInt32: {
      uint32_t x{};
      SHOTDB_RETURN_IF_ERROR(r->Read(&x, what));
      v->u = x;
      return Status::OK();
    }
    case T::kUInt64: {
      uint64_t x{};
      SHOTDB_RETURN_IF_ERROR(r->Read(&x, what));
      v->u = x;
      return Status::OK();
    }
    case T::kInt8: {
      int8_t x{};
      SHOTDB_RETURN_IF_ERROR(r->Read(&x, what));
      v->i = x;
      return Status::OK();
    }
    case T::kInt16: {
      int16_t x{};
      SHOTDB_RETURN_IF_ERROR(r->Read(&x, what));
      v->i = x;
      return Status::OK();
    }
    case T::kInt32: {
      int32_t x{};
      SHOTDB_RETURN_IF_ERROR(r->Read(&x, what));
      v->i = x;
      return Status::OK();
    }
    case T::kInt64: {
      int64_t x{};
      SHOTDB_RETURN_IF_ERROR(r->Read(&x, what));
      v->i = x;
      return Status::OK();
    }
    case T::kFloat32: {
      float x{};
      SHOTDB_RETURN_IF_ERROR(r->Read(&x, what));
      v->f = x;
      return Status::OK();
    }
    case T::kFloat64: {
      double x{};
      SHOTDB_RETURN_IF_ERROR(r->Read(&x, what));
      v->f = x;
      return Status::OK();
    }
    case T::kBool: {
      uint8_t x{};
      SHOTDB_RETURN_IF_ERROR(r->Read(&x, what));
      if (x > 1) return Status::Corruption(path + ": " + what + ": bool byte " + std::to_string(x));
      v->b = x != 0;
      return Status::OK();
    }
    case T::kString:
      return r->ReadString(&v->s, what);
    case T::kArray: {
      if (depth >= kMaxArrayDepth) {
        return Status::Corruption(path + ": " + what + ": arrays nested deeper than " +
                                  std::to_string(kMaxArrayDepth));
      }
      uint32_t elem = 0;
      uint64_t count = 0;
      SHOTDB_RETURN_IF_ERROR(r->Read(&elem, what + " element type"));
      if (!IsKnownValueType(elem)) {
        return Status::Corruption(path + ": " + what + ": unknown array element type " +
                                  std::to_string(elem));
      }
      SHOTDB_RETURN_IF_ERROR(r->Read(&count, what + " element count"));
      v->element_type = static_cast<T>(elem);
      if (count > r->left() / MinValueBytes(v->element_type)) {
        return Status::Corruption(path + ": " + what + ": array of " + std::to_string(count) +
                                  " elements cannot fit in the " + std::to_string(r->left()) +
                                  " bytes left");
      }
      v->array.resize(count);
      for (uint64_t k = 0; k < count; ++k) {
        SHOTDB_RETURN_IF_ERROR(ReadValue(r, v->element_type, &v->array[k], what, depth + 1, path));
      }
      return Status::OK();
    }
  }
  return Status::Corruption(path + ": " + what + ": unknown value type");
}

bool MulOverflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

}  // namespace

bool GgufValue::IsUnsigned() const {
  return type == Type::kUInt8 || type == Type::kUInt16 || type == Type::kUInt32 ||
         type == Type::kUInt64;
}

bool GgufValue::IsSigned() const {
  return type == Type::kInt8 || type == Type::kInt16 || type == Type::kInt32 ||
         type == Type::kInt64;
}

std::string_view GgufTypeName(GgufValue::Type type) {
  static constexpr std::string_view kNames[] = {"uint8",  "int8",    "uint16", "int16",  "uint32",
                                                "int32",  "float32", "bool",   "string", "array",
                                                "uint64", "int64",   "float64"};
  const auto i = static_cast<uint32_t>(type);
  return i < std::size(kNames) ? kNames[i] : "unknown";
}

Result<GgufFile> GgufFile::Open(const std::string& path) {
  GgufFile g;
  SHOTDB_ASSIGN_OR_RETURN(g.file_, MappedFile::Open(path));
  Reader r(g.file_->data(), g.file_->size(), path);
  char magic[4];
  SHOTDB_RETURN_IF_ERROR(r.Read(&magic, "magic"));
  if (std::memcmp(magic, "GGUF", 4) != 0) {
    return Status::Corruption(path + ": bad magic, expected \"GGUF\"");
  }
  SHOTDB_RETURN_IF_ERROR(r.Read(&g.version_, "version"));
  if (g.version_ != 2 && g.version_ != 3) {
    return Status::NotSupported(path + ": GGUF version " + std::to_string(g.version_) +
                                ", expected 2 or 3");
  }
  uint64_t tensor_count = 0, kv_count = 0;
  SHOTDB_RETURN_IF_ERROR(r.Read(&tensor_count, "tensor count"));
  SHOTDB_RETURN_IF_ERROR(r.Read(&kv_count, "metadata count"));
  // Each metadata entry needs >= 8 + 4 + 1 bytes and each tensor info >= 8 + 4 + 8 + 4 + 8.
  if (kv_count > r.left() / 13 || tensor_count > r.left() / 32) {
    return Status::Corruption(path + ": " + std::to_string(kv_count) + " metadata entries and " +
                              std::to_string(tensor_count) + " tensors cannot fit in the file");
  }

  for (uint64_t k = 0; k < kv_count; ++k) {
    std::string key;
    SHOTDB_RETURN_IF_ERROR(r.ReadString(&key, "metadata key " + std::to_string(k)));
    uint32_t type = 0;
    SHOTDB_RETURN_IF_ERROR(r.Read(&type, "type of '" + key + "'"));
    if (!IsKnownValueType(type)) {
      return Status::Corruption(path + ": metadata '" + key + "': unknown value type " +
                                std::to_string(type));
    }
    GgufValue value;
    SHOTDB_RETURN_IF_ERROR(ReadValue(&r, static_cast<GgufValue::Type>(type), &value,
                                     "metadata '" + key + "'", 0, path));
    if (g.kv_index_.count(key))
      return Status::Corruption(path + ": duplicate metadata key '" + key + "'");
    g.kv_index_.emplace(key, g.kvs_.size());
    g.kvs_.emplace_back(std::move(key), std::move(value));
  }
  if (const GgufValue* a = g.Find("general.alignment")) {
    if (!a->IsUnsigned() || a->u == 0 || (a->u & (a->u - 1)) != 0) {
      return Status::Corruption(path + ": general.alignment must be a power of two");
    }
    g.alignment_ = a->u;
  }

  for (uint64_t t = 0; t < tensor_count; ++t) {
    GgufTensorInfo info;
    SHOTDB_RETURN_IF_ERROR(r.ReadString(&info.name, "name of tensor " + std::to_string(t)));
    const std::string what = path + ": tensor '" + info.name + "'";
    uint32_t n_dims = 0;
    SHOTDB_RETURN_IF_ERROR(r.Read(&n_dims, "dimension count of '" + info.name + "'"));
    if (n_dims == 0 || n_dims > kMaxDims) {
      return Status::Corruption(what + ": " + std::to_string(n_dims) + " dimensions, expected 1.." +
                                std::to_string(kMaxDims));
    }
    info.dims.resize(n_dims);
    info.numel = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      SHOTDB_RETURN_IF_ERROR(r.Read(&info.dims[d], "dimensions of '" + info.name + "'"));
      if (info.dims[d] == 0 || MulOverflows(info.numel, info.dims[d], &info.numel)) {
        return Status::Corruption(what + ": invalid dimension " + std::to_string(info.dims[d]));
      }
    }
    uint32_t type = 0;
    uint64_t rel_offset = 0;
    SHOTDB_RETURN_IF_ERROR(r.Read(&type, "type of '" + info.name + "'"));
    SHOTDB_RETURN_IF_ERROR(r.Read(&rel_offset, "offset of '" + info.name + "'"));
    if (!IsSupportedGgmlType(type)) {
      return Status::NotSupported(what + ": ggml type " + std::to_string(type) +
                                  " (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)");
    }
    info.type = static_cast<GgmlType>(type);
    const uint64_t block = GgmlTypeBlockSize(info.type);
    if (info.dims[0] % block != 0) {
      return Status::Corruption(what + ": first dimension " + std::to_string(info.dims[0]) +
                                " is not a multiple of the " +
                                std::string(GgmlTypeName(info.type)) + " block size " +
                                std::to_string(block));
    }
    if (MulOverflows(info.numel / block, GgmlTypeBlockBytes(info.type), &info.nbytes)) {
      return Status::Corruption(what + ": byte size overflows");
    }
    if (rel_offset % g.alignment_ != 0) {
      return Status::Corruption(what + ": offset " + std::to_string(rel_offset) +
                                " is not aligned to " + std::to_string(g.alignment_));
    }
    info.offset = rel_offset;  // made absolute below, once the data section is known
    if (g.tensor_index_.count(info.name))
      return Status::Corruption(what + ": duplicate tensor name");
    g.tensor_index_.emplace(info.name, g.tensors_.size());
    g.tensors_.push_back(std::move(info));
  }

  const uint64_t data_start = (r.pos() + g.alignment_ - 1) / g.alignment_ * g.alignment_;
  const uint64_t file_size = g.file_->size();
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto& info : g.tensors_) {
    const uint64_t begin = data_start + info.offset;
    if (begin < data_start || begin > file_size || info.nbytes > file_size - begin) {
      return Status::Corruption(path + ": tensor '" + info.name + "': bytes [" +
                                std::to_string(begin) + ", +" + std::to_string(info.nbytes) +
                                ") extend past the end of the file (" + std::to_string(file_size) +
                                " bytes)");
    }
    info.offset = begin;
    info.data = g.file_->data() + begin;
    ranges.push_back({begin, begin + info.nbytes});
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) {
      return Status::Corruption(path + ": tensor data ranges overlap at byte " +
                                std::to_string(ranges[i].first));
    }
  }
  return g;
}

const GgufValue* GgufFile::Find(std::string_view key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kvs_[it->second].second;
}

std::vector<std::string> GgufFile::Keys() const {
  std::vector<std::string> keys;
  for (const auto& kv : kvs_) keys.push_back(kv.first);
  return keys;
}

namespace {
Status Missing(const std::string& path, std::string_view key) {
  return Status::NotFound(path + ": no metadata key '" + std::string(key) + "'");
}
Status WrongType(const std::string& path, std::string_view key, const GgufValue& v,
                 const char* expected) {
  std::string got(GgufTypeName(v.type));
  if (v.type == GgufValue::Type::kArray) got += " of " + std::string(GgufTypeName(v.element_type));
  return Status::InvalidArgument(path + ": metadata '" + std::string(key) + "' is " + got +
                                 ", expected " + expected);
}
}  // namespace

Result<std::string> GgufFile::GetString(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(path(), key);
  if (v->type != GgufValue::Type::kString) return WrongType(path(), key, *v, "string");
  return v->s;
}

Result<uint64_t> GgufFile::GetUInt(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(path(), key);
  if (v->IsUnsigned()) return v->u;
  if (v->IsSigned() && v->i >= 0) return static_cast<uint64_t>(v->i);
  return WrongType(path(), key, *v, "a non-negative integer");
}

Result<double> GgufFile::GetFloat(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(path(), key);
  if (v->IsFloat()) return v->f;
  if (v->IsUnsigned()) return static_cast<double>(v->u);
  if (v->IsSigned()) return static_cast<double>(v->i);
  return WrongType(path(), key, *v, "a number");
}

Result<bool> GgufFile::GetBool(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(path(), key);
  if (v->type != GgufValue::Type::kBool) return WrongType(path(), key, *v, "bool");
  return v->b;
}

Result<std::vector<std::string>> GgufFile::GetStringArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(path(), key);
  if (v->type != GgufValue::Type::kArray || v->element_type != GgufValue::Type::kString) {
    return WrongType(path(), key, *v, "array of string");
  }
  std::vector<std::string> out;
  out.reserve(v->array.size());
  for (const auto& e : v->array) out.push_back(e.s);
  return out;
}

Result<std::vector<int64_t>> GgufFile::GetIntArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(path(), key);
  GgufValue probe;
  probe.type = v->element_type;
  if (v->type != GgufValue::Type::kArray || !(probe.IsSigned() || probe.IsUnsigned())) {
    return WrongType(path(), key, *v, "array of integers");
  }
  std::vector<int64_t> out;
  out.reserve(v->array.size());
  for (const auto& e : v->array) out.push_back(e.IsSigned() ? e.i : static_cast<int64_t>(e.u));
  return out;
}

Result<std::vector<double>> GgufFile::GetFloatArray(std::string_view key) const {
  const GgufValue* v = Find(key);
  if (!v) return Missing(path(), key);
  if (v->type != GgufValue::Type::kArray || (v->element_type != GgufValue::Type::kFloat32 &&
                                             v->element_type != GgufValue::Type::kFloat64)) {
    return WrongType(path(), key, *v, "array of float");
  }
  std::vector<double> out;
  out.reserve(v->array.size());
  for (const auto& e : v->array) out.push_back(e.f);
  return out;
}

const GgufTensorInfo* GgufFile::FindTensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

Status GgufFile::ReadFloat32(const GgufTensorInfo& tensor, float* out, size_t out_count) const {
  if (out_count != tensor.numel) {
    return Status::InvalidArgument(path() + ": tensor '" + tensor.name + "' has " +
                                   std::to_string(tensor.numel) + " elements, buffer holds " +
                                   std::to_string(out_count));
  }
  return DequantizeRow(tensor.type, tensor.data, out, out_count)
      .WithContext(path() + ": tensor '" + tensor.name + "'");
}

}  // namespace shotdb
