#include "format/kv_values.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <string>

namespace shotdb {

std::optional<uint64_t> KvRawBytes(DType dtype, uint32_t kv_heads, uint32_t tokens,
                                   uint32_t head_dim) {
  uint64_t n = DTypeSize(dtype);
  for (uint64_t d : {uint64_t{kv_heads}, uint64_t{tokens}, uint64_t{head_dim}}) {
    if (__builtin_mul_overflow(n, d, &n)) return std::nullopt;
  }
  if (__builtin_add_overflow(n, KvScaleBytes(dtype, kv_heads), &n)) return std::nullopt;
  return n;
}

void KvToFloat(DType dtype, uint32_t kv_heads, uint64_t per_head, const void* raw, float* dst) {
  if (dtype != DType::kF8E4M3) {
    ConvertToFloat(dtype, raw, dst, static_cast<size_t>(kv_heads * per_head));
    return;
  }
  const auto* bytes = static_cast<const uint8_t*>(raw);
  const uint8_t* codes = bytes + KvScaleBytes(dtype, kv_heads);
  for (uint32_t h = 0; h < kv_heads; ++h) {
    float scale;
    std::memcpy(&scale, bytes + 4 * h, sizeof scale);
    const uint8_t* c = codes + h * per_head;
    float* d = dst + h * per_head;
    for (uint64_t i = 0; i < per_head; ++i) d[i] = Fp8E4M3ToFloat(c[i]) * scale;
  }
}

Status KvFromFloat(DType dtype, uint32_t kv_heads, uint64_t per_head, const float* src, void* raw) {
  if (dtype != DType::kF8E4M3) {
    ConvertFromFloat(dtype, src, raw, static_cast<size_t>(kv_heads * per_head));
    return Status::OK();
  }
  auto* bytes = static_cast<uint8_t*>(raw);
  uint8_t* codes = bytes + KvScaleBytes(dtype, kv_heads);
  for (uint32_t h = 0; h < kv_heads; ++h) {
    const float* s = src + h * per_head;
    float amax = 0.f;
    bool finite = true;
    for (uint64_t i = 0; i < per_head; ++i) {  // no early exit: the error path finds the element
      const float a = std::fabs(s[i]);
      finite &= a <= std::numeric_limits<float>::max();  // false for inf and NaN
      amax = a > amax ? a : amax;
    }
    if (!finite) {
      uint64_t i = 0;
      while (std::isfinite(s[i])) ++i;
      return Status::InvalidArgument("fp8 K/V: head " + std::to_string(h) + " element " +
                                     std::to_string(i) + " is " + std::to_string(s[i]) +
                                     ", which no scale represents");
    }
    const float scale = amax > 0.f ? amax / kFp8E4M3Max : 1.f;
    std::memcpy(bytes + 4 * h, &scale, sizeof scale);
    uint8_t* c = codes + h * per_head;
    for (uint64_t i = 0; i < per_head; ++i) c[i] = FloatToFp8E4M3(s[i] / scale);
  }
  return Status::OK();
}

}  // namespace shotdb
