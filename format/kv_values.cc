#include "format/kv_values.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace shotdb {
namespace {

// The first element of src[0..n) that is not finite, as "head h token t channel c is v".
std::string NotFinite(const float* src, uint64_t n, uint32_t tokens, uint32_t head_dim) {
  uint64_t i = 0;
  while (i < n && std::isfinite(src[i])) ++i;
  const uint64_t per_head = uint64_t{tokens} * head_dim;
  return "head " + std::to_string(i / per_head) + " token " +
         std::to_string(i % per_head / head_dim) + " channel " + std::to_string(i % head_dim) +
         " is " + std::to_string(src[i]);
}

bool AllFinite(const float* src, uint64_t n) {
  bool finite = true;
  for (uint64_t i = 0; i < n; ++i) finite &= std::fabs(src[i]) <= std::numeric_limits<float>::max();
  return finite;  // false for inf and NaN
}

// max(m, |x|) for finite x, as one comparison the compiler can vectorise (std::fmax's NaN rules
// make it a libm call per element).
inline float MaxAbs(float m, float x) {
  const float a = std::fabs(x);
  return a > m ? a : m;
}

// amax / 127 rounded up to a bfloat16 (so no code saturates), or 1 for amax 0.
uint16_t I8Scale(float amax) {
  if (amax == 0.f) return FloatToBFloat16(1.f);
  const float want = amax / kI8Max;
  uint16_t b = FloatToBFloat16(want);
  if (BFloat16ToFloat(b) < want) ++b;  // positive and finite: the next bfloat16 up
  return b;
}

}  // namespace

std::optional<uint64_t> KvRawBytes(DType dtype, uint32_t kv_heads, uint32_t tokens,
                                   uint32_t head_dim) {
  uint64_t n = DTypeSize(dtype);
  for (uint64_t d : {uint64_t{kv_heads}, uint64_t{tokens}, uint64_t{head_dim}}) {
    if (__builtin_mul_overflow(n, d, &n)) return std::nullopt;
  }
  if (__builtin_add_overflow(n, KvScaleBytes(dtype, kv_heads, tokens, head_dim), &n)) {
    return std::nullopt;
  }
  return n;
}

void KvToFloat(DType dtype, uint32_t kv_heads, uint32_t tokens, uint32_t head_dim, const void* raw,
               float* dst) {
  const uint64_t per_head = uint64_t{tokens} * head_dim;
  const auto* bytes = static_cast<const uint8_t*>(raw);
  const uint8_t* codes = bytes + KvScaleBytes(dtype, kv_heads, tokens, head_dim);
  if (dtype == DType::kF8E4M3) {
    for (uint32_t h = 0; h < kv_heads; ++h) {
      float scale;
      std::memcpy(&scale, bytes + 4 * h, sizeof scale);
      const uint8_t* c = codes + h * per_head;
      float* d = dst + h * per_head;
      for (uint64_t i = 0; i < per_head; ++i) d[i] = Fp8E4M3ToFloat(c[i]) * scale;
    }
  } else if (dtype == DType::kI8) {
    const uint64_t groups = KvI8Groups(tokens);
    std::vector<float> scales(head_dim);
    for (uint32_t h = 0; h < kv_heads; ++h) {
      for (uint64_t g = 0; g < groups; ++g) {
        ConvertToFloat(DType::kBF16, bytes + 2 * (h * groups + g) * head_dim, scales.data(),
                       head_dim);
        const uint64_t first = g * kI8TokenGroup;
        const uint64_t end = std::min<uint64_t>(tokens, first + kI8TokenGroup);
        for (uint64_t t = first; t < end; ++t) {
          const auto* c = reinterpret_cast<const int8_t*>(codes) + h * per_head + t * head_dim;
          float* d = dst + h * per_head + t * head_dim;
          for (uint32_t i = 0; i < head_dim; ++i) d[i] = static_cast<float>(c[i]) * scales[i];
        }
      }
    }
  } else {
    ConvertToFloat(dtype, raw, dst, static_cast<size_t>(kv_heads * per_head));
  }
}

Status KvFromFloat(DType dtype, uint32_t kv_heads, uint32_t tokens, uint32_t head_dim,
                   const float* src, void* raw) {
  const uint64_t per_head = uint64_t{tokens} * head_dim;
  if (!IsScaledDType(dtype)) {
    ConvertFromFloat(dtype, src, raw, static_cast<size_t>(kv_heads * per_head));
    return Status::OK();
  }
  if (!AllFinite(src, kv_heads * per_head)) {  // no early exit: NotFinite finds the element
    return Status::InvalidArgument(std::string(DTypeName(dtype)) + " K/V: " +
                                   NotFinite(src, kv_heads * per_head, tokens, head_dim) +
                                   ", which no scale represents");
  }
  auto* bytes = static_cast<uint8_t*>(raw);
  uint8_t* codes = bytes + KvScaleBytes(dtype, kv_heads, tokens, head_dim);
  const uint64_t groups = KvI8Groups(tokens);
  std::vector<float> amax(head_dim), scale(head_dim);  // kI8: per channel of one token group
  for (uint32_t h = 0; h < kv_heads; ++h) {
    const float* s = src + h * per_head;
    if (dtype == DType::kF8E4M3) {
      float amax = 0.f;
      for (uint64_t i = 0; i < per_head; ++i) amax = MaxAbs(amax, s[i]);
      const float scale = amax > 0.f ? amax / kFp8E4M3Max : 1.f;
      std::memcpy(bytes + 4 * h, &scale, sizeof scale);
      uint8_t* c = codes + h * per_head;
      for (uint64_t i = 0; i < per_head; ++i) c[i] = FloatToFp8E4M3(s[i] / scale);
    } else {  // kI8: per group of tokens, per channel
      auto* c = reinterpret_cast<int8_t*>(codes) + h * per_head;
      for (uint64_t g = 0; g < groups; ++g) {
        const uint64_t first = g * kI8TokenGroup;
        const uint64_t end = std::min<uint64_t>(tokens, first + kI8TokenGroup);
        std::fill(amax.begin(), amax.end(), 0.f);
        for (uint64_t t = first; t < end; ++t) {
          for (uint32_t d = 0; d < head_dim; ++d) {
            amax[d] = MaxAbs(amax[d], s[t * head_dim + d]);
          }
        }
        for (uint32_t d = 0; d < head_dim; ++d) {
          const uint16_t b = I8Scale(amax[d]);
          std::memcpy(bytes + 2 * ((h * groups + g) * head_dim + d), &b, sizeof b);
          scale[d] = BFloat16ToFloat(b);
        }
        for (uint64_t t = first; t < end; ++t) {
          for (uint32_t d = 0; d < head_dim; ++d) {
            c[t * head_dim + d] = FloatToI8(s[t * head_dim + d] / scale[d]);
          }
        }
      }
    }
  }
  return Status::OK();
}

}  // namespace shotdb
