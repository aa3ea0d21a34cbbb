#include "format/quant.h"

#include <cstring>

#include "format/dtype.h"

namespace shotdb {

namespace {
uint16_t LoadU16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
}  // namespace

bool IsSupportedGgmlType(uint32_t raw) {
  switch (static_cast<GgmlType>(raw)) {
    case GgmlType::kF32:
    case GgmlType::kF16:
    case GgmlType::kQ4_0:
    case GgmlType::kQ4_1:
    case GgmlType::kQ8_0:
    case GgmlType::kBF16:
      return true;
  }
  return false;
}

size_t GgmlTypeBlockSize(GgmlType type) {
  switch (type) {
    case GgmlType::kQ4_0:
    case GgmlType::kQ4_1:
    case GgmlType::kQ8_0:
      return 32;
    default:
      return 1;
  }
}

size_t GgmlTypeBlockBytes(GgmlType type) {
  switch (type) {
    case GgmlType::kF32:
      return 4;
    case GgmlType::kF16:
    case GgmlType::kBF16:
      return 2;
    case GgmlType::kQ4_0:
      return 18;
    case GgmlType::kQ4_1:
      return 20;
    case GgmlType::kQ8_0:
      return 34;
  }
  return 0;
}

std::string_view GgmlTypeName(GgmlType type) {
  switch (type) {
    case GgmlType::kF32:
      return "F32";
    case GgmlType::kF16:
      return "F16";
    case GgmlType::kQ4_0:
      return "Q4_0";
    case GgmlType::kQ4_1:
      return "Q4_1";
    case GgmlType::kQ8_0:
      return "Q8_0";
    case GgmlType::kBF16:
      return "BF16";
  }
  return "?";
}

Status DequantizeRow(GgmlType type, const void* src, float* dst, size_t n) {
  const size_t block = GgmlTypeBlockSize(type);
  if (n % block != 0) {
    return Status::InvalidArgument(std::string(GgmlTypeName(type)) + ": " + std::to_string(n) +
                                   " elements is not a multiple of the block size " +
                                   std::to_string(block));
  }
  const auto* p = static_cast<const uint8_t*>(src);
  switch (type) {
    case GgmlType::kF32:
      if (n > 0) std::memcpy(dst, p, n * sizeof(float));
      return Status::OK();
    case GgmlType::kF16:
      for (size_t i = 0; i < n; ++i) dst[i] = HalfToFloat(LoadU16(p + 2 * i));
      return Status::OK();
    case GgmlType::kBF16:
      for (size_t i = 0; i < n; ++i) dst[i] = BFloat16ToFloat(LoadU16(p + 2 * i));
      return Status::OK();
    case GgmlType::kQ8_0:
      for (size_t b = 0; b < n / 32; ++b, p += 34, dst += 32) {
        const float d = HalfToFloat(LoadU16(p));
        for (int j = 0; j < 32; ++j) dst[j] = d * static_cast<float>(static_cast<int8_t>(p[2 + j]));
      }
      return Status::OK();
    case GgmlType::kQ4_0:
      for (size_t b = 0; b < n / 32; ++b, p += 18, dst += 32) {
        const float d = HalfToFloat(LoadU16(p));
        for (int j = 0; j < 16; ++j) {
          dst[j] = d * static_cast<float>((p[2 + j] & 0x0f) - 8);
          dst[j + 16] = d * static_cast<float>((p[2 + j] >> 4) - 8);
        }
      }
      return Status::OK();
    case GgmlType::kQ4_1:
      for (size_t b = 0; b < n / 32; ++b, p += 20, dst += 32) {
        const float d = HalfToFloat(LoadU16(p));
        const float m = HalfToFloat(LoadU16(p + 2));
        for (int j = 0; j < 16; ++j) {
          const float lo = d * static_cast<float>(p[4 + j] & 0x0f);
          const float hi = d * static_cast<float>(p[4 + j] >> 4);
          dst[j] = lo + m;
          dst[j + 16] = hi + m;
        }
      }
      return Status::OK();
  }
  return Status::NotSupported("ggml type " + std::to_string(static_cast<uint32_t>(type)));
}

}  // namespace shotdb
