// Block records: the on-disk form of one stored tensor (docs/format.md has the byte layout).
//
// A block record holds one layer's K or V of one demonstration block, laid out
// [kv_heads, tokens, head_dim] row-major, before RoPE. It is a fixed 64-byte little-endian header
// followed by the payload (the raw tensor bytes, encoded with a Codec). The header carries the
// shape, the sizes, an xxh3-64 of the raw bytes, a 32-bit xxh3 of the stored payload bytes and an
// xxh3-64 of the header itself, so that any damaged byte, in the header or the payload, is reported
// as Corruption rather than returned. (The raw-bytes checksum alone is not enough: LZ4 decoders
// ignore some bits of a stream, e.g. the match-length nibble of the last sequence, so a damaged
// stream can still decode to the right bytes.)
//
// Reading is split in two so that a caller can choose its cost: ParseBlockRecord checks the header
// (cheap, no payload access); VerifyBlockRecord or DecodeBlockRecord check the payload against the
// raw-bytes checksum.
//
// Thread-safety: all functions are thread-safe; objects are not synchronized (a const
// EncodedBlockRecord or BlockRecordView may be read from several threads).
#ifndef SHOTDB_FORMAT_BLOCK_RECORD_H_
#define SHOTDB_FORMAT_BLOCK_RECORD_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "format/codec.h"
#include "format/dtype.h"
#include "util/status.h"

namespace shotdb {

enum class TensorKind : uint8_t { kKey = 0, kValue = 1 };  // values are on disk

// "K" or "V".
std::string_view TensorKindName(TensorKind kind);

constexpr size_t kBlockRecordHeaderSize = 64;
// The first four bytes of every record.
constexpr char kBlockRecordMagic[4] = {'S', 'H', 'K', 'V'};
// The layout version this code writes and the only one it reads (docs/format.md, "Versioning").
constexpr uint16_t kBlockRecordFormatVersion = 1;

// What a record stores: element type, K or V, and the shape [kv_heads, tokens, head_dim].
struct BlockRecordMeta {
  DType dtype;
  TensorKind kind;
  uint32_t layer;
  uint32_t kv_heads;
  uint32_t tokens;
  uint32_t head_dim;
};

// Every header field, decoded. The header checksum and reserved bytes are not kept: a parsed
// header has passed both checks.
struct BlockRecordHeader {
  BlockRecordMeta meta;
  Codec codec;
  uint16_t format_version;
  uint64_t raw_size;          // kv_heads * tokens * head_dim * DTypeSize(dtype)
  uint64_t stored_size;       // payload bytes following the header
  uint64_t checksum;          // XXH3_64bits of the raw (decoded) payload bytes
  uint32_t payload_checksum;  // low 32 bits of XXH3_64bits of the stored payload bytes
};

// The number of raw bytes of a tensor of this shape and dtype, or nullopt if it overflows 64 bits.
std::optional<uint64_t> BlockRecordRawSize(const BlockRecordMeta& meta);

// An encoded record ready to be written, e.g. into an LMDB MDB_RESERVE'd value: size() bytes via
// WriteTo(dst). For Codec::kRaw it does not copy the payload: it points at the raw bytes given to
// EncodeBlockRecord, which must stay valid and unchanged until the last WriteTo. For the other
// codecs it owns the compressed bytes. Copying is allowed (a copy of a kRaw record still points at
// the caller's bytes).
class EncodedBlockRecord {
 public:
  // Header plus payload bytes.
  size_t size() const { return kBlockRecordHeaderSize + payload_size_; }
  // Writes exactly size() bytes to dst (any alignment; must not overlap the raw input).
  void WriteTo(void* dst) const;
  const BlockRecordHeader& header() const { return header_; }

 private:
  friend Result<EncodedBlockRecord> EncodeBlockRecord(const BlockRecordMeta&, Codec, const void*,
                                                      size_t);
  EncodedBlockRecord() = default;

  BlockRecordHeader header_{};
  std::array<uint8_t, kBlockRecordHeaderSize> header_bytes_{};
  const uint8_t* raw_payload_ = nullptr;  // kRaw: the caller's bytes
  std::string compressed_payload_;        // other codecs
  size_t payload_size_ = 0;
};

// Encodes `raw_size` bytes at `raw` (the tensor described by `meta`) with `codec`.
// Returns the record, or InvalidArgument if meta.dtype, meta.kind or codec is not an enumerator,
// if raw_size != kv_heads * tokens * head_dim * DTypeSize(dtype), or if the payload is too large
// for the codec (MaxLz4PayloadSize()). `raw` may be null only when raw_size == 0.
// The codec is used as given even when it does not shrink the payload (random data grows by
// about 0.4% under LZ4).
Result<EncodedBlockRecord> EncodeBlockRecord(const BlockRecordMeta& meta, Codec codec,
                                             const void* raw, size_t raw_size);

// A parsed record pointing into caller memory (e.g. the LMDB map): valid while that memory is.
struct BlockRecordView {
  BlockRecordHeader header;
  const uint8_t* payload;  // header.stored_size bytes
  size_t payload_size;
};

// Parses and checks the header of the `size`-byte record at `data`. Does not read the payload.
// `what` names the record in error messages, e.g. "task nlu block 3 layer 7 K".
// Returns the view, or:
//   Corruption   if the record is shorter than the header, the magic is wrong, the header checksum
//                does not match, a reserved byte is non-zero, the kind byte is not K or V, the
//                sizes are inconsistent (raw_size vs. shape and dtype, stored_size vs. `size`,
//                stored_size vs. raw_size for kRaw, stored_size vs. the LZ4 bound);
//   NotSupported if the header is intact (its checksum matches) but names a format version, dtype
//                or codec this build does not know, i.e. a record written by a newer shotdb.
// Each message names `what`, the field, the value found and the value expected.
Result<BlockRecordView> ParseBlockRecord(const void* data, size_t size, std::string_view what);

// Checks the stored payload bytes against payload_checksum, decodes them into a temporary buffer
// (kRaw: reads them in place) and compares the xxh3-64 of the result with the raw-bytes checksum.
// Returns OK, or Corruption naming `what` if a checksum differs or the payload does not decode.
Status VerifyBlockRecord(const BlockRecordView& view, std::string_view what);

// Checks the stored payload bytes against payload_checksum, decodes them into `dst` (dst_size
// bytes, which must equal header.raw_size) and verifies the raw-bytes checksum of the result.
// Returns OK; InvalidArgument if dst_size != raw_size; Corruption naming `what` if a checksum
// differs or the payload does not decode, in which case the contents of dst are unspecified and
// must not be used.
Status DecodeBlockRecord(const BlockRecordView& view, void* dst, size_t dst_size,
                         std::string_view what);

}  // namespace shotdb

#endif  // SHOTDB_FORMAT_BLOCK_RECORD_H_
