// Payload codecs of block records: how a record's raw tensor bytes are stored (docs/format.md).
//
// A codec turns the raw bytes of a tensor into stored bytes and back. The numeric values of Codec
// are written into every record header: never renumber, only append. All functions here are
// stateless and thread-safe; they use a per-thread scratch buffer for the byte shuffle, which grows
// to the largest payload the thread has shuffled and is kept for reuse.
#ifndef SHOTDB_FORMAT_CODEC_H_
#define SHOTDB_FORMAT_CODEC_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "util/status.h"

namespace shotdb {

enum class Codec : uint8_t {
  // Stored bytes are the raw bytes.
  kRaw = 0,
  // One LZ4 block (LZ4_compress_default) of the raw bytes.
  kLz4 = 1,
  // The raw bytes split into elem_size byte planes (plane b holds byte b of every element, in
  // element order), then one LZ4 block of the planes. The high byte of a bf16 value (sign and 7 of
  // the 8 exponent bits) takes few distinct values across a tensor; gathering those bytes into one
  // plane gives LZ4 repeats that the interleaved layout hides. (For f16 the high byte also holds
  // two mantissa bits, and Gaussian data gains little.)
  kShuffleLz4 = 2,
};

// "raw", "lz4", "shuffle-lz4".
std::string_view CodecName(Codec codec);
// The inverse of CodecName; nullopt for any other string.
std::optional<Codec> ParseCodec(std::string_view name);
// True if `raw` is one of the enumerators (used when validating a header byte).
inline bool IsValidCodec(uint8_t raw) { return raw <= static_cast<uint8_t>(Codec::kShuffleLz4); }

// Largest raw payload the LZ4-based codecs accept (LZ4's own block limit, about 2 GiB). kRaw has
// no limit.
size_t MaxLz4PayloadSize();

// Compresses the `n` bytes at `src`, which hold elements of `elem_size` bytes each, and appends
// the stored bytes to `*out` (existing contents of *out are kept). The element size only matters
// for kShuffleLz4; if `n` is not a multiple of it, the trailing n % elem_size bytes are stored
// after the planes unshuffled. `src` may be null when n == 0.
// Returns OK, or InvalidArgument if elem_size is 0, the codec value is not an enumerator, or n
// exceeds MaxLz4PayloadSize() for an LZ4 codec. On error *out is unchanged.
Status CompressPayload(Codec codec, size_t elem_size, const void* src, size_t n, std::string* out);

// Decodes the `n_stored` stored bytes at `src` into exactly `n_raw` bytes at `dst` (which must
// not overlap src). `elem_size` must be the value given to CompressPayload.
// Returns OK; Corruption if the stored bytes are not a valid encoding of exactly n_raw bytes (for
// kRaw: if n_stored != n_raw); InvalidArgument for elem_size 0 or an unknown codec value. On
// error the contents of dst are unspecified. Note that a valid LZ4 stream can still decode to the
// wrong bytes: callers verify content with the record checksum (block_record.h).
Status DecompressPayload(Codec codec, size_t elem_size, const void* src, size_t n_stored, void* dst,
                         size_t n_raw);

}  // namespace shotdb

#endif  // SHOTDB_FORMAT_CODEC_H_
