// Internal helpers of the store: LMDB error mapping, big-endian keys and a small byte coder for the
// values the store keeps in LMDB. Not part of the public API (store.h is).
//
// Keys are big-endian so that LMDB's memcmp order is numeric order: all records of one task are a
// contiguous key range starting with its 4-byte task id, and blocks of a task sort by index.
// Values are little-endian, length-prefixed and versioned by the store format version (meta DB).
#ifndef SHOTDB_ENGINE_LMDB_UTIL_H_
#define SHOTDB_ENGINE_LMDB_UTIL_H_

#include <lmdb.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "util/status.h"

namespace shotdb {
namespace lmdb {

// Maps an LMDB return code to a Status: MDB_NOTFOUND -> NotFound, MDB_CORRUPTED / MDB_PAGE_NOTFOUND
// / MDB_INVALID / MDB_VERSION_MISMATCH -> Corruption, everything else -> IOError. The message is
// "<what>: <mdb_strerror(rc)>". Precondition: rc != MDB_SUCCESS.
Status ToStatus(int rc, std::string_view what);

// A write transaction plus what the store needs to know about its failure: whether some call hit
// MDB_MAP_FULL (then the store grows the map and retries the whole transaction).
struct WriteTxn {
  MDB_txn* txn = nullptr;
  bool map_full = false;
  // ToStatus(rc, what), remembering MDB_MAP_FULL. Returns OK for MDB_SUCCESS.
  Status Check(int rc, std::string_view what) {
    if (rc == MDB_SUCCESS) return Status::OK();
    if (rc == MDB_MAP_FULL) map_full = true;
    return ToStatus(rc, what);
  }
};

inline MDB_val Val(const void* data, size_t size) { return MDB_val{size, const_cast<void*>(data)}; }
inline MDB_val Val(const std::string& s) { return Val(s.data(), s.size()); }
inline std::string_view View(const MDB_val& v) {
  return std::string_view(static_cast<const char*>(v.mv_data), v.mv_size);
}

// Appends `v` in big-endian byte order (for keys).
void AppendBE32(std::string* out, uint32_t v);
void AppendBE64(std::string* out, uint64_t v);
uint32_t LoadBE32(const void* p);
uint64_t LoadBE64(const void* p);

// A cursor closed on every path out of a scope.
class Cursor {
 public:
  Cursor() = default;
  Cursor(const Cursor&) = delete;
  Cursor& operator=(const Cursor&) = delete;
  ~Cursor() {
    if (cursor_ != nullptr) mdb_cursor_close(cursor_);
  }
  int Open(MDB_txn* txn, MDB_dbi dbi) { return mdb_cursor_open(txn, dbi, &cursor_); }
  MDB_cursor* get() const { return cursor_; }

 private:
  MDB_cursor* cursor_ = nullptr;
};

// Record checksums (store format 3). Every value the store writes, except K/V payload records
// (which carry their own) and postings (below), is stored as the value followed by the
// little-endian xxh3-64 of the value seeded with the xxh3-64 of its key: a damaged value, or an
// intact value under another key, fails Unseal.
std::string Seal(std::string_view key, std::string_view value);
// The value of a sealed record, or Corruption naming `what` when the record is shorter than a
// checksum or the checksum does not match.
Result<std::string_view> Unseal(std::string_view key, std::string_view stored,
                                const std::string& what);
// The check word of one posting (doc, tf) of the term stored under `term_key`: the low 32 bits of
// the xxh3-64 of its 8 bytes seeded with the xxh3-64 of the key.
uint32_t PostingCheck(std::string_view term_key, uint32_t doc, uint32_t tf);
// The same in two steps, for the many postings of one term: the seed once, then each posting.
uint64_t PostingSeed(std::string_view term_key);
uint32_t PostingCheck(uint64_t seed, uint32_t doc, uint32_t tf);

// Deletes every key of `dbi` that starts with `prefix`, all duplicates included.
Status DeletePrefix(WriteTxn* txn, MDB_dbi dbi, const std::string& prefix, std::string_view what);

// Builds values: fixed-width little-endian integers and length-prefixed byte strings.
class ByteWriter {
 public:
  void U8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void U32(uint32_t v);
  void U64(uint64_t v);
  void I64(int64_t v) { U64(static_cast<uint64_t>(v)); }
  void F64(double v);
  void Str(std::string_view s);  // u32 length, then the bytes
  const std::string& data() const { return out_; }
  std::string Take() { return std::move(out_); }

 private:
  std::string out_;
};

// Reads what ByteWriter wrote. Each read returns false (and latches failure) when the value is too
// short; Finish() turns the latch, or trailing bytes, into a Corruption naming `what`.
class ByteReader {
 public:
  ByteReader(std::string_view data, std::string what) : data_(data), what_(std::move(what)) {}
  bool U8(uint8_t* v);
  bool U32(uint32_t* v);
  bool U64(uint64_t* v);
  bool I64(int64_t* v);
  bool F64(double* v);
  bool Str(std::string* s);
  // Marks the value as malformed for a reason found by the caller (e.g. an out-of-range enum).
  void Fail(std::string reason);
  // OK if every read succeeded and all bytes were consumed, else Corruption.
  Status Finish() const;
  bool failed() const { return failed_; }
  // True when every byte has been read (or a read failed).
  bool AtEnd() const { return failed_ || pos_ == data_.size(); }

 private:
  bool Take(size_t n, const char** p);
  std::string_view data_;
  size_t pos_ = 0;
  bool failed_ = false;
  std::string what_;
  std::string reason_;
};

}  // namespace lmdb
}  // namespace shotdb

#endif  // SHOTDB_ENGINE_LMDB_UTIL_H_
