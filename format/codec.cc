#include "format/codec.h"

#include <lz4.h>

#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace shotdb {
namespace {

// Per-thread buffer holding the byte planes between the shuffle and LZ4. Kept across calls so a
// thread encoding or decoding many same-sized blocks does not allocate (and page-fault) each time.
uint8_t* ShuffleScratch(size_t n) {
  thread_local std::string scratch;
  if (scratch.size() < n) scratch.resize(n);
  return reinterpret_cast<uint8_t*>(scratch.data());
}

// Plane b of the output holds byte b of every element: dst[b * count + i] = src[i * E + b].
template <size_t E>
void ShuffleFixed(const uint8_t* src, size_t count, uint8_t* dst) {
  for (size_t i = 0; i < count; ++i) {
    for (size_t b = 0; b < E; ++b) dst[b * count + i] = src[i * E + b];
  }
}

template <size_t E>
void UnshuffleFixed(const uint8_t* src, size_t count, uint8_t* dst) {
  for (size_t i = 0; i < count; ++i) {
    for (size_t b = 0; b < E; ++b) dst[i * E + b] = src[b * count + i];
  }
}

#if defined(__SSE2__)

// The 2-byte case (bf16, f16) is the one that matters for KV caches, so it gets SSE2: split 16
// elements into their low and high bytes with a mask, a shift and two saturating packs (each
// 16-bit lane holds a value <= 0xff, so the pack is exact).
template <>
void ShuffleFixed<2>(const uint8_t* src, size_t count, uint8_t* dst) {
  uint8_t* lo = dst;
  uint8_t* hi = dst + count;
  const __m128i mask = _mm_set1_epi16(0x00ff);
  size_t i = 0;
  for (; i + 16 <= count; i += 16) {
    __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i + 16));
    __m128i l = _mm_packus_epi16(_mm_and_si128(a, mask), _mm_and_si128(b, mask));
    __m128i h = _mm_packus_epi16(_mm_srli_epi16(a, 8), _mm_srli_epi16(b, 8));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + i), l);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + i), h);
  }
  for (; i < count; ++i) {
    lo[i] = src[2 * i];
    hi[i] = src[2 * i + 1];
  }
}

// Interleaving 16 low bytes with 16 high bytes is exactly what unpacklo/hi_epi8 do.
template <>
void UnshuffleFixed<2>(const uint8_t* src, size_t count, uint8_t* dst) {
  const uint8_t* lo = src;
  const uint8_t* hi = src + count;
  size_t i = 0;
  for (; i + 16 <= count; i += 16) {
    __m128i l = _mm_loadu_si128(reinterpret_cast<const __m128i*>(lo + i));
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi + i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i), _mm_unpacklo_epi8(l, h));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i + 16), _mm_unpackhi_epi8(l, h));
  }
  for (; i < count; ++i) {
    dst[2 * i] = lo[i];
    dst[2 * i + 1] = hi[i];
  }
}
#endif  // __SSE2__

// Shuffles n bytes of elem_size-byte elements; a partial trailing element is copied unchanged.
void Shuffle(size_t elem_size, const uint8_t* src, size_t n, uint8_t* dst) {
  const size_t count = n / elem_size;
  switch (elem_size) {
    case 2:
      ShuffleFixed<2>(src, count, dst);
      break;
    case 4:
      ShuffleFixed<4>(src, count, dst);
      break;
    case 8:
      ShuffleFixed<8>(src, count, dst);
      break;
    default:
      for (size_t i = 0; i < count; ++i) {
        for (size_t b = 0; b < elem_size; ++b) dst[b * count + i] = src[i * elem_size + b];
      }
  }
  const size_t body = count * elem_size;
  if (n > body) std::memcpy(dst + body, src + body, n - body);
}

void Unshuffle(size_t elem_size, const uint8_t* src, size_t n, uint8_t* dst) {
  const size_t count = n / elem_size;
  switch (elem_size) {
    case 2:
      UnshuffleFixed<2>(src, count, dst);
      break;
    case 4:
      UnshuffleFixed<4>(src, count, dst);
      break;
    case 8:
      UnshuffleFixed<8>(src, count, dst);
      break;
    default:
      for (size_t i = 0; i < count; ++i) {
        for (size_t b = 0; b < elem_size; ++b) dst[i * elem_size + b] = src[b * count + i];
      }
  }
  const size_t body = count * elem_size;
  if (n > body) std::memcpy(dst + body, src + body, n - body);
}

// Appends one LZ4 block of src[0, n) to *out. n <= LZ4_MAX_INPUT_SIZE is checked by the caller.
Status AppendLz4(const uint8_t* src, size_t n, std::string* out) {
  const size_t old_size = out->size();
  const int bound = LZ4_compressBound(static_cast<int>(n));
  out->resize(old_size + static_cast<size_t>(bound));
  // LZ4 reads nothing from src when n == 0, but its API wants a valid pointer.
  static const char kEmpty = 0;
  const char* in = n == 0 ? &kEmpty : reinterpret_cast<const char*>(src);
  const int written = LZ4_compress_default(in, out->data() + old_size, static_cast<int>(n), bound);
  if (written <= 0) {
    // Cannot happen with a bound-sized destination; reported rather than assumed.
    out->resize(old_size);
    return Status::InvalidArgument("lz4: LZ4_compress_default failed on " + std::to_string(n) +
                                   " bytes");
  }
  out->resize(old_size + static_cast<size_t>(written));
  return Status::OK();
}

// Rejects sizes no LZ4 block can have, before any buffer is sized from them.
Status CheckLz4Sizes(Codec codec, size_t n_stored, size_t n_raw) {
  const std::string name(CodecName(codec));
  if (n_raw > MaxLz4PayloadSize()) {
    return Status::Corruption(name + ": raw size " + std::to_string(n_raw) +
                              " exceeds the LZ4 block limit " +
                              std::to_string(MaxLz4PayloadSize()));
  }
  if (n_stored > static_cast<size_t>(LZ4_compressBound(static_cast<int>(n_raw)))) {
    return Status::Corruption(name + ": " + std::to_string(n_stored) +
                              " stored bytes exceed the LZ4 bound " +
                              std::to_string(LZ4_compressBound(static_cast<int>(n_raw))) + " for " +
                              std::to_string(n_raw) + " raw bytes");
  }
  return Status::OK();
}

// Decodes an LZ4 block that must expand to exactly n_raw bytes; sizes passed CheckLz4Sizes.
Status DecodeLz4(Codec codec, const void* src, size_t n_stored, uint8_t* dst, size_t n_raw) {
  const std::string name(CodecName(codec));
  // LZ4_decompress_safe never reads or writes outside the given ranges, whatever the input.
  static const char kEmpty = 0;
  const char* in = n_stored == 0 ? &kEmpty : static_cast<const char*>(src);
  char empty_out = 0;
  char* out = n_raw == 0 ? &empty_out : reinterpret_cast<char*>(dst);
  const int got = LZ4_decompress_safe(in, out, static_cast<int>(n_stored), static_cast<int>(n_raw));
  if (got < 0) {
    return Status::Corruption(name + ": malformed LZ4 block (" + std::to_string(n_stored) +
                              " stored bytes, expected to decode to " + std::to_string(n_raw) +
                              ")");
  }
  if (static_cast<size_t>(got) != n_raw) {
    return Status::Corruption(name + ": LZ4 block decodes to " + std::to_string(got) +
                              " bytes, expected " + std::to_string(n_raw));
  }
  return Status::OK();
}

Status CheckArgs(Codec codec, size_t elem_size) {
  if (!IsValidCodec(static_cast<uint8_t>(codec))) {
    return Status::InvalidArgument("unknown codec value " +
                                   std::to_string(static_cast<unsigned>(codec)));
  }
  if (elem_size == 0) return Status::InvalidArgument("element size must be at least 1 byte");
  return Status::OK();
}

}  // namespace

std::string_view CodecName(Codec codec) {
  switch (codec) {
    case Codec::kRaw:
      return "raw";
    case Codec::kLz4:
      return "lz4";
    case Codec::kShuffleLz4:
      return "shuffle-lz4";
  }
  return "?";
}

std::optional<Codec> ParseCodec(std::string_view name) {
  if (name == "raw") return Codec::kRaw;
  if (name == "lz4") return Codec::kLz4;
  if (name == "shuffle-lz4") return Codec::kShuffleLz4;
  return std::nullopt;
}

size_t MaxLz4PayloadSize() { return LZ4_MAX_INPUT_SIZE; }

Status CompressPayload(Codec codec, size_t elem_size, const void* src, size_t n, std::string* out) {
  SHOTDB_RETURN_IF_ERROR(CheckArgs(codec, elem_size));
  const auto* bytes = static_cast<const uint8_t*>(src);
  if (codec == Codec::kRaw) {
    if (n > 0) out->append(reinterpret_cast<const char*>(bytes), n);
    return Status::OK();
  }
  if (n > MaxLz4PayloadSize()) {
    return Status::InvalidArgument(std::string(CodecName(codec)) + ": payload of " +
                                   std::to_string(n) + " bytes exceeds the LZ4 block limit " +
                                   std::to_string(MaxLz4PayloadSize()));
  }
  if (codec == Codec::kLz4) return AppendLz4(bytes, n, out);
  uint8_t* planes = ShuffleScratch(n);
  if (n > 0) Shuffle(elem_size, bytes, n, planes);
  return AppendLz4(planes, n, out);
}

Status DecompressPayload(Codec codec, size_t elem_size, const void* src, size_t n_stored, void* dst,
                         size_t n_raw) {
  SHOTDB_RETURN_IF_ERROR(CheckArgs(codec, elem_size));
  auto* out = static_cast<uint8_t*>(dst);
  switch (codec) {
    case Codec::kRaw:
      if (n_stored != n_raw) {
        return Status::Corruption("raw: stored size " + std::to_string(n_stored) +
                                  " differs from raw size " + std::to_string(n_raw));
      }
      if (n_raw > 0) std::memcpy(out, src, n_raw);
      return Status::OK();
    case Codec::kLz4:
      SHOTDB_RETURN_IF_ERROR(CheckLz4Sizes(codec, n_stored, n_raw));
      return DecodeLz4(codec, src, n_stored, out, n_raw);
    case Codec::kShuffleLz4: {
      SHOTDB_RETURN_IF_ERROR(CheckLz4Sizes(codec, n_stored, n_raw));
      uint8_t* planes = ShuffleScratch(n_raw);
      SHOTDB_RETURN_IF_ERROR(DecodeLz4(codec, src, n_stored, planes, n_raw));
      if (n_raw > 0) Unshuffle(elem_size, planes, n_raw, out);
      return Status::OK();
    }
  }
  return Status::OK();  // unreachable: CheckArgs rejected other values
}

}  // namespace shotdb
