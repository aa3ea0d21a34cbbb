#include "format/block_record.h"

#include <lz4.h>
#include <xxhash.h>

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <memory>

#include "format/kv_values.h"

namespace shotdb {
namespace {

// Byte offsets of the header fields (docs/format.md, "Header").
constexpr size_t kOffMagic = 0;
constexpr size_t kOffVersion = 4;
constexpr size_t kOffDType = 6;
constexpr size_t kOffCodec = 7;
constexpr size_t kOffKind = 8;
constexpr size_t kOffReserved0 = 9;  // 3 bytes
constexpr size_t kOffLayer = 12;
constexpr size_t kOffKvHeads = 16;
constexpr size_t kOffTokens = 20;
constexpr size_t kOffHeadDim = 24;
constexpr size_t kOffPayloadChecksum = 28;
constexpr size_t kOffRawSize = 32;
constexpr size_t kOffStoredSize = 40;
constexpr size_t kOffChecksum = 48;
constexpr size_t kOffHeaderChecksum = 56;
static_assert(kOffHeaderChecksum + 8 == kBlockRecordHeaderSize, "header layout");

// Explicit little-endian stores and loads, independent of the host byte order.
void Put16(uint8_t* p, uint16_t v) {
  for (int i = 0; i < 2; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void Put32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
void Put64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint16_t Get16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t Get32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
uint64_t Get64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// The header checksum covers every header byte before it.
uint64_t HeaderChecksum(const uint8_t* header) { return XXH3_64bits(header, kOffHeaderChecksum); }

uint64_t Xxh3(const void* data, size_t n) {
  static const uint8_t kEmpty = 0;
  return XXH3_64bits(n == 0 ? &kEmpty : data, n);
}
uint32_t PayloadChecksum(uint64_t xxh3_of_stored) { return static_cast<uint32_t>(xxh3_of_stored); }

std::string Hex(uint64_t v) {
  char buf[19];
  std::snprintf(buf, sizeof buf, "0x%016" PRIx64, v);
  return buf;
}

std::string Prefix(std::string_view what) {
  std::string s(what);
  s += ": block record ";
  return s;
}

Status FieldError(bool not_supported, std::string_view what, std::string_view field,
                  const std::string& found, const std::string& expected) {
  std::string msg = Prefix(what) + "header field '" + std::string(field) + "' is " + found +
                    ", expected " + expected;
  return not_supported ? Status::NotSupported(std::move(msg)) : Status::Corruption(std::move(msg));
}

// "kv_heads H x tokens T x head_dim D x S[ + N scale bytes]": how a record's raw size is made,
// for the messages that report a wrong one.
std::string RawSizeFormula(const BlockRecordMeta& m) {
  const uint64_t scales = KvScaleBytes(m.dtype, m.kv_heads, m.tokens, m.head_dim);
  return "kv_heads " + std::to_string(m.kv_heads) + " x tokens " + std::to_string(m.tokens) +
         " x head_dim " + std::to_string(m.head_dim) + " x " + std::to_string(DTypeSize(m.dtype)) +
         (scales > 0 ? " + " + std::to_string(scales) + " scale bytes" : std::string());
}

}  // namespace

std::string_view TensorKindName(TensorKind kind) {
  return kind == TensorKind::kKey ? "K" : kind == TensorKind::kValue ? "V" : "?";
}

std::optional<uint64_t> BlockRecordRawSize(const BlockRecordMeta& meta) {
  return KvRawBytes(meta.dtype, meta.kv_heads, meta.tokens, meta.head_dim);
}

void EncodedBlockRecord::WriteTo(void* dst) const {
  auto* out = static_cast<uint8_t*>(dst);
  std::memcpy(out, header_bytes_.data(), kBlockRecordHeaderSize);
  const uint8_t* payload = raw_payload_ != nullptr
                               ? raw_payload_
                               : reinterpret_cast<const uint8_t*>(compressed_payload_.data());
  if (payload_size_ > 0) std::memcpy(out + kBlockRecordHeaderSize, payload, payload_size_);
}

Result<EncodedBlockRecord> EncodeBlockRecord(const BlockRecordMeta& meta, Codec codec,
                                             const void* raw, size_t raw_size) {
  if (!IsValidDType(static_cast<uint8_t>(meta.dtype))) {
    return Status::InvalidArgument("EncodeBlockRecord: unknown dtype value " +
                                   std::to_string(static_cast<unsigned>(meta.dtype)));
  }
  if (meta.kind != TensorKind::kKey && meta.kind != TensorKind::kValue) {
    return Status::InvalidArgument("EncodeBlockRecord: unknown tensor kind value " +
                                   std::to_string(static_cast<unsigned>(meta.kind)));
  }
  if (!IsValidCodec(static_cast<uint8_t>(codec))) {
    return Status::InvalidArgument("EncodeBlockRecord: unknown codec value " +
                                   std::to_string(static_cast<unsigned>(codec)));
  }
  const std::optional<uint64_t> expected = BlockRecordRawSize(meta);
  if (!expected || *expected != raw_size) {
    return Status::InvalidArgument("EncodeBlockRecord: layer " + std::to_string(meta.layer) + " " +
                                   std::string(TensorKindName(meta.kind)) + ": " +
                                   std::to_string(raw_size) + " raw bytes given, expected " +
                                   RawSizeFormula(meta) + " (" +
                                   std::string(DTypeName(meta.dtype)) + ")");
  }
  if (raw == nullptr && raw_size > 0) {
    return Status::InvalidArgument("EncodeBlockRecord: null raw pointer for a non-empty tensor");
  }

  EncodedBlockRecord rec;
  if (codec == Codec::kRaw) {
    rec.raw_payload_ = static_cast<const uint8_t*>(raw);
    rec.payload_size_ = raw_size;
  } else {
    SHOTDB_RETURN_IF_ERROR(
        CompressPayload(codec, DTypeSize(meta.dtype), raw, raw_size, &rec.compressed_payload_));
    rec.payload_size_ = rec.compressed_payload_.size();
  }

  BlockRecordHeader& h = rec.header_;
  h.meta = meta;
  h.codec = codec;
  h.format_version = kBlockRecordFormatVersion;
  h.raw_size = raw_size;
  h.stored_size = rec.payload_size_;
  h.checksum = Xxh3(raw, raw_size);
  // For kRaw the stored bytes are the raw bytes: no second pass.
  h.payload_checksum = PayloadChecksum(
      codec == Codec::kRaw ? h.checksum
                           : Xxh3(rec.compressed_payload_.data(), rec.compressed_payload_.size()));

  uint8_t* b = rec.header_bytes_.data();  // value-initialized: reserved bytes are zero
  std::memcpy(b + kOffMagic, kBlockRecordMagic, sizeof kBlockRecordMagic);
  Put16(b + kOffVersion, h.format_version);
  b[kOffDType] = static_cast<uint8_t>(meta.dtype);
  b[kOffCodec] = static_cast<uint8_t>(codec);
  b[kOffKind] = static_cast<uint8_t>(meta.kind);
  Put32(b + kOffLayer, meta.layer);
  Put32(b + kOffKvHeads, meta.kv_heads);
  Put32(b + kOffTokens, meta.tokens);
  Put32(b + kOffHeadDim, meta.head_dim);
  Put32(b + kOffPayloadChecksum, h.payload_checksum);
  Put64(b + kOffRawSize, h.raw_size);
  Put64(b + kOffStoredSize, h.stored_size);
  Put64(b + kOffChecksum, h.checksum);
  Put64(b + kOffHeaderChecksum, HeaderChecksum(b));
  return rec;
}

Result<BlockRecordView> ParseBlockRecord(const void* data, size_t size, std::string_view what) {
  if (size < kBlockRecordHeaderSize) {
    return Status::Corruption(Prefix(what) + "is " + std::to_string(size) +
                              " bytes, shorter than the " + std::to_string(kBlockRecordHeaderSize) +
                              "-byte header");
  }
  const auto* b = static_cast<const uint8_t*>(data);
  if (std::memcmp(b + kOffMagic, kBlockRecordMagic, sizeof kBlockRecordMagic) != 0) {
    return FieldError(
        false, what, "magic", Hex(Get32(b + kOffMagic)),
        "\"SHKV\" (" + Hex(Get32(reinterpret_cast<const uint8_t*>(kBlockRecordMagic))) + ")");
  }
  // Checked before any other field so that a damaged byte anywhere in the header is reported as
  // Corruption, never misread as a newer version, dtype or codec (NotSupported).
  const uint64_t header_sum = Get64(b + kOffHeaderChecksum);
  const uint64_t computed_header_sum = HeaderChecksum(b);
  if (header_sum != computed_header_sum) {
    return FieldError(false, what, "header_checksum", Hex(header_sum),
                      Hex(computed_header_sum) + " (xxh3-64 of header bytes 0-55)");
  }

  BlockRecordView view{};
  BlockRecordHeader& h = view.header;
  h.format_version = Get16(b + kOffVersion);
  if (h.format_version != kBlockRecordFormatVersion) {
    return FieldError(
        true, what, "format_version", std::to_string(h.format_version),
        std::to_string(kBlockRecordFormatVersion) + " (written by a newer or unknown shotdb)");
  }
  for (size_t off : {kOffReserved0, kOffReserved0 + 1, kOffReserved0 + 2}) {
    if (b[off] != 0) {
      return FieldError(false, what, "reserved byte " + std::to_string(off), std::to_string(b[off]),
                        "0");
    }
  }
  if (!IsValidDType(b[kOffDType])) {
    return FieldError(true, what, "dtype", std::to_string(b[kOffDType]),
                      "0 (f32), 1 (f16), 2 (bf16) or 3 (f64)");
  }
  if (!IsValidCodec(b[kOffCodec])) {
    return FieldError(true, what, "codec", std::to_string(b[kOffCodec]),
                      "0 (raw), 1 (lz4) or 2 (shuffle-lz4)");
  }
  if (b[kOffKind] > static_cast<uint8_t>(TensorKind::kValue)) {
    return FieldError(false, what, "kind", std::to_string(b[kOffKind]), "0 (K) or 1 (V)");
  }
  BlockRecordMeta& m = h.meta;
  m.dtype = static_cast<DType>(b[kOffDType]);
  m.kind = static_cast<TensorKind>(b[kOffKind]);
  m.layer = Get32(b + kOffLayer);
  m.kv_heads = Get32(b + kOffKvHeads);
  m.tokens = Get32(b + kOffTokens);
  m.head_dim = Get32(b + kOffHeadDim);
  h.codec = static_cast<Codec>(b[kOffCodec]);
  h.raw_size = Get64(b + kOffRawSize);
  h.stored_size = Get64(b + kOffStoredSize);
  h.checksum = Get64(b + kOffChecksum);
  h.payload_checksum = Get32(b + kOffPayloadChecksum);

  const std::optional<uint64_t> expected_raw = BlockRecordRawSize(m);
  if (!expected_raw || *expected_raw != h.raw_size) {
    return FieldError(false, what, "raw_size", std::to_string(h.raw_size),
                      (expected_raw ? std::to_string(*expected_raw) : std::string("(overflow)")) +
                          " = " + RawSizeFormula(m));
  }
  const uint64_t payload_size = size - kBlockRecordHeaderSize;
  if (h.stored_size != payload_size) {
    return FieldError(false, what, "stored_size", std::to_string(h.stored_size),
                      std::to_string(payload_size) + " (record of " + std::to_string(size) +
                          " bytes minus the header)");
  }
  if (h.codec == Codec::kRaw && h.stored_size != h.raw_size) {
    return FieldError(false, what, "stored_size", std::to_string(h.stored_size),
                      std::to_string(h.raw_size) + " (= raw_size, codec raw)");
  }
  if (h.codec != Codec::kRaw) {
    if (h.raw_size > MaxLz4PayloadSize()) {
      return FieldError(false, what, "raw_size", std::to_string(h.raw_size),
                        "at most " + std::to_string(MaxLz4PayloadSize()) + " for codec " +
                            std::string(CodecName(h.codec)));
    }
    const auto bound = static_cast<uint64_t>(LZ4_compressBound(static_cast<int>(h.raw_size)));
    if (h.stored_size > bound) {
      return FieldError(false, what, "stored_size", std::to_string(h.stored_size),
                        "at most " + std::to_string(bound) + " (LZ4 bound for raw_size " +
                            std::to_string(h.raw_size) + ")");
    }
  }
  view.payload = b + kBlockRecordHeaderSize;
  view.payload_size = payload_size;
  return view;
}

namespace {

Status ChecksumMismatch(std::string_view what, std::string_view field, uint64_t computed,
                        uint64_t stored) {
  return Status::Corruption(Prefix(what) + std::string(field) + " is " + Hex(computed) +
                            ", header says " + Hex(stored));
}

// Compares the stored payload bytes with payload_checksum; returns their full xxh3-64 in *sum.
Status CheckPayloadChecksum(const BlockRecordView& view, std::string_view what, uint64_t* sum) {
  *sum = Xxh3(view.payload, view.payload_size);
  if (PayloadChecksum(*sum) != view.header.payload_checksum) {
    return ChecksumMismatch(what, "payload checksum (low 32 bits of xxh3-64 of stored bytes)",
                            PayloadChecksum(*sum), view.header.payload_checksum);
  }
  return Status::OK();
}

Status CheckRawChecksum(const BlockRecordView& view, std::string_view what, uint64_t sum) {
  if (sum != view.header.checksum) {
    return ChecksumMismatch(what, "raw checksum (xxh3-64 of decoded bytes)", sum,
                            view.header.checksum);
  }
  return Status::OK();
}

}  // namespace

Status DecodeBlockRecord(const BlockRecordView& view, void* dst, size_t dst_size,
                         std::string_view what) {
  const BlockRecordHeader& h = view.header;
  if (dst_size != h.raw_size) {
    return Status::InvalidArgument(Prefix(what) + "decode buffer is " + std::to_string(dst_size) +
                                   " bytes, expected raw_size " + std::to_string(h.raw_size));
  }
  uint64_t stored_sum;
  SHOTDB_RETURN_IF_ERROR(CheckPayloadChecksum(view, what, &stored_sum));
  Status s = DecompressPayload(h.codec, DTypeSize(h.meta.dtype), view.payload, view.payload_size,
                               dst, dst_size);
  if (!s.ok()) return Status::Corruption(Prefix(what) + "payload: " + s.message());
  // For kRaw the decoded bytes are the stored bytes, already hashed.
  return CheckRawChecksum(view, what, h.codec == Codec::kRaw ? stored_sum : Xxh3(dst, dst_size));
}

Status VerifyBlockRecord(const BlockRecordView& view, std::string_view what) {
  const BlockRecordHeader& h = view.header;
  if (h.codec == Codec::kRaw) {
    if (view.payload_size != h.raw_size) {
      return Status::Corruption(Prefix(what) + "raw payload is " +
                                std::to_string(view.payload_size) + " bytes, expected raw_size " +
                                std::to_string(h.raw_size));
    }
    uint64_t sum;
    SHOTDB_RETURN_IF_ERROR(CheckPayloadChecksum(view, what, &sum));
    return CheckRawChecksum(view, what, sum);
  }
  // A parsed view's raw_size is at most MaxLz4PayloadSize() here (ParseBlockRecord checks it).
  std::unique_ptr<uint8_t[]> scratch(new uint8_t[h.raw_size == 0 ? 1 : h.raw_size]);
  return DecodeBlockRecord(view, scratch.get(), h.raw_size, what);
}

}  // namespace shotdb
