#include "engine/lmdb_util.h"

#include <xxhash.h>

#include <cstdio>
#include <cstring>

namespace shotdb {
namespace lmdb {

Status ToStatus(int rc, std::string_view what) {
  std::string msg = std::string(what) + ": " + mdb_strerror(rc);
  switch (rc) {
    case MDB_NOTFOUND:
      return Status::NotFound(std::move(msg));
    case MDB_CORRUPTED:
    case MDB_PAGE_NOTFOUND:
    case MDB_INVALID:
    case MDB_VERSION_MISMATCH:
      return Status::Corruption(std::move(msg));
    default:
      return Status::IOError(std::move(msg));
  }
}

void AppendBE32(std::string* out, uint32_t v) {
  for (int i = 3; i >= 0; --i) out->push_back(static_cast<char>(v >> (8 * i)));
}
void AppendBE64(std::string* out, uint64_t v) {
  for (int i = 7; i >= 0; --i) out->push_back(static_cast<char>(v >> (8 * i)));
}
uint32_t LoadBE32(const void* p) {
  const auto* b = static_cast<const uint8_t*>(p);
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = (v << 8) | b[i];
  return v;
}
uint64_t LoadBE64(const void* p) {
  const auto* b = static_cast<const uint8_t*>(p);
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v = (v << 8) | b[i];
  return v;
}

namespace {
uint64_t SealHash(std::string_view key, std::string_view value) {
  return XXH3_64bits_withSeed(value.data(), value.size(), XXH3_64bits(key.data(), key.size()));
}
}  // namespace

std::string Seal(std::string_view key, std::string_view value) {
  std::string out(value);
  const uint64_t h = SealHash(key, value);
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>(h >> (8 * i)));
  return out;
}

Result<std::string_view> Unseal(std::string_view key, std::string_view stored,
                                const std::string& what) {
  if (stored.size() < 8) {
    return Status::Corruption(what + ": record of " + std::to_string(stored.size()) +
                              " bytes is too short to hold its checksum");
  }
  const std::string_view value = stored.substr(0, stored.size() - 8);
  uint64_t want = 0;
  for (int i = 7; i >= 0; --i) {
    want = (want << 8) | static_cast<uint8_t>(stored[stored.size() - 8 + i]);
  }
  const uint64_t got = SealHash(key, value);
  if (got != want) {
    char buf[96];
    std::snprintf(buf, sizeof buf, ": record checksum is %016llx, stored %016llx",
                  static_cast<unsigned long long>(got), static_cast<unsigned long long>(want));
    return Status::Corruption(what + buf);
  }
  return value;
}

uint64_t PostingSeed(std::string_view term_key) {
  return XXH3_64bits(term_key.data(), term_key.size());
}

uint32_t PostingCheck(uint64_t seed, uint32_t doc, uint32_t tf) {
  uint8_t bytes[8];
  for (int i = 0; i < 4; ++i) {
    bytes[i] = static_cast<uint8_t>(doc >> (24 - 8 * i));
    bytes[4 + i] = static_cast<uint8_t>(tf >> (24 - 8 * i));
  }
  return static_cast<uint32_t>(XXH3_64bits_withSeed(bytes, sizeof bytes, seed));
}

uint32_t PostingCheck(std::string_view term_key, uint32_t doc, uint32_t tf) {
  return PostingCheck(PostingSeed(term_key), doc, tf);
}

// Deletes every key of `dbi` that starts with `prefix` (all duplicates included).
Status DeletePrefix(lmdb::WriteTxn* txn, MDB_dbi dbi, const std::string& prefix,
                    std::string_view what) {
  Cursor c;
  SHOTDB_RETURN_IF_ERROR(txn->Check(c.Open(txn->txn, dbi), what));
  for (;;) {
    // Seek afresh after each delete rather than rely on where a delete leaves the cursor.
    MDB_val key = Val(prefix), data;
    int rc = mdb_cursor_get(c.get(), &key, &data, MDB_SET_RANGE);
    if (rc == MDB_NOTFOUND) break;
    SHOTDB_RETURN_IF_ERROR(txn->Check(rc, what));
    if (View(key).substr(0, prefix.size()) != prefix) break;
    SHOTDB_RETURN_IF_ERROR(txn->Check(mdb_cursor_del(c.get(), MDB_NODUPDATA), what));
  }
  return Status::OK();
}

void ByteWriter::U32(uint32_t v) {
  for (int i = 0; i < 4; ++i) out_.push_back(static_cast<char>(v >> (8 * i)));
}
void ByteWriter::U64(uint64_t v) {
  for (int i = 0; i < 8; ++i) out_.push_back(static_cast<char>(v >> (8 * i)));
}
void ByteWriter::F64(double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  U64(bits);
}
void ByteWriter::Str(std::string_view s) {
  U32(static_cast<uint32_t>(s.size()));
  out_.append(s.data(), s.size());
}

bool ByteReader::Take(size_t n, const char** p) {
  if (failed_) return false;
  if (data_.size() - pos_ < n) {
    Fail("value is truncated at byte " + std::to_string(pos_) + " of " +
         std::to_string(data_.size()));
    return false;
  }
  *p = data_.data() + pos_;
  pos_ += n;
  return true;
}
bool ByteReader::U8(uint8_t* v) {
  const char* p;
  if (!Take(1, &p)) return false;
  *v = static_cast<uint8_t>(*p);
  return true;
}
bool ByteReader::U32(uint32_t* v) {
  const char* p;
  if (!Take(4, &p)) return false;
  *v = 0;
  for (int i = 3; i >= 0; --i) *v = (*v << 8) | static_cast<uint8_t>(p[i]);
  return true;
}
bool ByteReader::U64(uint64_t* v) {
  const char* p;
  if (!Take(8, &p)) return false;
  *v = 0;
  for (int i = 7; i >= 0; --i) *v = (*v << 8) | static_cast<uint8_t>(p[i]);
  return true;
}
bool ByteReader::I64(int64_t* v) {
  uint64_t u;
  if (!U64(&u)) return false;
  *v = static_cast<int64_t>(u);
  return true;
}
bool ByteReader::F64(double* v) {
  uint64_t bits;
  if (!U64(&bits)) return false;
  std::memcpy(v, &bits, sizeof bits);
  return true;
}
bool ByteReader::Str(std::string* s) {
  uint32_t n;
  const char* p;
  if (!U32(&n) || !Take(n, &p)) return false;
  s->assign(p, n);
  return true;
}
void ByteReader::Fail(std::string reason) {
  if (failed_) return;
  failed_ = true;
  reason_ = std::move(reason);
}
Status ByteReader::Finish() const {
  if (failed_) return Status::Corruption(what_ + ": " + reason_);
  if (pos_ != data_.size()) {
    return Status::Corruption(what_ + ": " + std::to_string(data_.size() - pos_) +
                              " unexpected trailing bytes after byte " + std::to_string(pos_));
  }
  return Status::OK();
}

}  // namespace lmdb
}  // namespace shotdb
