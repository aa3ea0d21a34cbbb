#include "engine/lmdb_check.h"

#include <sys/mman.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string_view>
#include <vector>

#include "engine/lmdb_util.h"

namespace shotdb {
namespace lmdb {
namespace {

static_assert(sizeof(size_t) == 8, "the checker reads the 64-bit LMDB layout");
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the checker reads little-endian files");

// LMDB's on-disk layout, version 1 (the names follow mdb.c; the values are its format, which
// every LMDB 0.9 file shares).
constexpr uint32_t kMagic = 0xBEEFC0DE;
constexpr uint32_t kDataVersion = 1;
constexpr size_t kPageHeader = 16;  // pgno u64, pad u16, flags u16, lower u16, upper u16
constexpr size_t kNodeHeader = 8;   // lo u16, hi u16, flags u16, ksize u16
constexpr size_t kDbRecord = 48;    // MDB_db
constexpr uint64_t kNoRoot = ~uint64_t{0};
constexpr uint16_t kBranch = 0x01, kLeaf = 0x02, kOverflow = 0x04, kMeta = 0x08, kDirty = 0x10,
                   kLeaf2 = 0x20, kSubPage = 0x40, kKeep = 0x8000;
constexpr uint16_t kBigData = 0x01, kSubData = 0x02, kDupData = 0x04;
constexpr uint16_t kDbDupSort = 0x04, kDbIntegerKey = 0x08, kDbDupFixed = 0x10,
                   kDbReverseKey = 0x02, kDbIntegerDup = 0x20, kDbReverseDup = 0x40;
// Offsets in a meta page, after the page header.
constexpr size_t kMetaDbs = 24, kMetaLastPage = 120, kMetaTxnId = 128;

uint16_t U16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
uint32_t U32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint64_t U64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

struct DbRecord {
  uint32_t pad = 0;  // the key size of LEAF2 pages
  uint16_t flags = 0;
  uint16_t depth = 0;
  uint64_t branch_pages = 0, leaf_pages = 0, overflow_pages = 0, entries = 0, root = kNoRoot;
};
DbRecord ParseDb(const uint8_t* p) {
  DbRecord db;
  db.pad = U32(p);
  db.flags = U16(p + 4);
  db.depth = U16(p + 6);
  db.branch_pages = U64(p + 8);
  db.leaf_pages = U64(p + 16);
  db.overflow_pages = U64(p + 24);
  db.entries = U64(p + 32);
  db.root = U64(p + 40);
  return db;
}

// How a tree's keys compare and what its leaves hold.
enum class TreeKind {
  kFree,     // the free-page DB: integer keys (txn ids), values are page lists
  kMain,     // the main DB: names of named DBs -> their MDB_db
  kNamed,    // a named DB (plain or sorted-dups)
  kDupTree,  // the duplicates of one key: keys only (LEAF2 when DUPFIXED)
};

// The counts found in one tree.
struct TreeCounts {
  uint64_t branch = 0, leaf = 0, overflow = 0, entries = 0;
};

class Checker {
 public:
  Checker(const uint8_t* map, uint64_t file_pages, uint32_t psize, uint64_t pages, std::string file,
          bool full)
      : full_(full),
        map_(map),
        file_pages_(file_pages),
        psize_(psize),
        pages_(pages),
        file_(std::move(file)),
        seen_(pages, false) {}

  Status Run(const DbRecord& free_db, const DbRecord& main_db, StructureStats* stats) {
    seen_[0] = seen_[1] = true;  // the meta pages
    stats_ = stats;
    stats_->pages = pages_;
    SHOTDB_RETURN_IF_ERROR(WalkTree(free_db, TreeKind::kFree, "free-page DB", 0));
    SHOTDB_RETURN_IF_ERROR(WalkTree(main_db, TreeKind::kMain, "main DB", 0));
    for (const auto& named : named_) {
      ++stats_->named_dbs;
      fixed_size_ = 0;
      SHOTDB_RETURN_IF_ERROR(WalkTree(named.second, TreeKind::kNamed,
                                      "database '" + named.first + "'", named.second.flags));
    }
    for (uint64_t free : free_list_) {
      if (free < 2 || free >= pages_) {
        return Fail("free-page DB", free,
                    "lists page " + std::to_string(free) + ", outside the snapshot's " +
                        std::to_string(pages_) + " pages");
      }
      if (seen_[free])
        return Fail("free-page DB", free, "lists a page that is in use or listed twice");
      seen_[free] = true;
      ++stats_->free_pages;
    }
    if (!full_) return Status::OK();  // run lengths unread: the audit cannot be exact
    uint64_t lost = 0, first_lost = 0;
    for (uint64_t p = pages_; p-- > 0;) {
      if (!seen_[p]) {
        ++lost;
        first_lost = p;
      }
    }
    if (lost != 0) {
      return Fail("file", first_lost,
                  std::to_string(lost) +
                      " pages belong to no tree and are not listed free "
                      "(a subtree or a free list is missing)");
    }
    return Status::OK();
  }

 private:
  struct Range {  // a key range [lo, hi); empty views mean unbounded
    std::string_view lo, hi;
    bool has_lo = false, has_hi = false;
  };

  Status Fail(const std::string& where, uint64_t page, const std::string& what) const {
    return Status::Corruption(file_ + ": " + where + ", page " + std::to_string(page) + ": " +
                              what +
                              " (LMDB structure damaged; `shotdb verify` reports, and the "
                              "store must be restored from a copy or an export)");
  }

  // -1, 0, 1 as LMDB orders the keys of a tree of this kind.
  static int Compare(TreeKind kind, uint16_t db_flags, std::string_view a, std::string_view b) {
    if (kind == TreeKind::kFree || (kind != TreeKind::kDupTree && (db_flags & kDbIntegerKey)) ||
        (kind == TreeKind::kDupTree && (db_flags & kDbIntegerDup))) {
      if (a.size() == 8 && b.size() == 8) {
        uint64_t x = U64(reinterpret_cast<const uint8_t*>(a.data()));
        uint64_t y = U64(reinterpret_cast<const uint8_t*>(b.data()));
        return x < y ? -1 : x > y;
      }
      if (a.size() == 4 && b.size() == 4) {
        uint32_t x = U32(reinterpret_cast<const uint8_t*>(a.data()));
        uint32_t y = U32(reinterpret_cast<const uint8_t*>(b.data()));
        return x < y ? -1 : x > y;
      }
    }
    const int c = std::memcmp(a.data(), b.data(), std::min(a.size(), b.size()));
    if (c != 0) return c < 0 ? -1 : 1;
    return a.size() < b.size() ? -1 : a.size() > b.size();
  }

  // Whether the tree's order is one this checker knows (reverse orders are not checked).
  static bool OrderKnown(TreeKind kind, uint16_t db_flags) {
    if (kind == TreeKind::kDupTree) return (db_flags & kDbReverseDup) == 0;
    return (db_flags & kDbReverseKey) == 0;
  }

  Status Mark(const std::string& where, uint64_t page, uint64_t count) {
    if (page < 2 || page >= pages_ || count > pages_ - page) {
      return Fail(where, page,
                  "page number outside the snapshot's " + std::to_string(pages_) + " pages");
    }
    if (count > file_pages_ - std::min(page, file_pages_)) {
      return Fail(where, page,
                  "page past the end of the file (" + std::to_string(file_pages_) + " pages)");
    }
    for (uint64_t p = page; p < page + count; ++p) {
      if (seen_[p]) return Fail(where, p, "page reached twice (a cycle or a shared page)");
      seen_[p] = true;
    }
    return Status::OK();
  }

  Status WalkTree(const DbRecord& db, TreeKind kind, const std::string& where, uint16_t db_flags) {
    if (db.root == kNoRoot) {
      if (db.depth != 0 || db.entries != 0 || db.branch_pages + db.leaf_pages + db.overflow_pages)
        return Fail(where, 0, "empty tree with nonzero counts");
      return Status::OK();
    }
    if (db.depth == 0 || db.depth > 32) {
      return Fail(where, db.root, "tree depth " + std::to_string(db.depth));
    }
    TreeCounts counts;
    SHOTDB_RETURN_IF_ERROR(WalkPage(db, kind, where, db_flags, db.root, 1, Range{}, &counts));
    if (counts.branch != db.branch_pages || counts.leaf != db.leaf_pages ||
        (full_ && counts.overflow != db.overflow_pages) || counts.entries != db.entries) {
      return Fail(where, db.root,
                  "tree records " + std::to_string(db.branch_pages) + " branch, " +
                      std::to_string(db.leaf_pages) + " leaf, " +
                      std::to_string(db.overflow_pages) + " overflow pages and " +
                      std::to_string(db.entries) + " entries; found " +
                      std::to_string(counts.branch) + ", " + std::to_string(counts.leaf) + ", " +
                      std::to_string(counts.overflow) + " and " + std::to_string(counts.entries));
    }
    stats_->branch_pages += counts.branch;
    stats_->leaf_pages += counts.leaf;
    stats_->overflow_pages += counts.overflow;
    return Status::OK();
  }

  // Checks the key `key` (index `i` of the page) against the previous key and the page's range.
  Status CheckOrder(TreeKind kind, uint16_t db_flags, const std::string& where, uint64_t page,
                    size_t i, std::string_view key, std::string_view prev, const Range& range) {
    if (!OrderKnown(kind, db_flags)) return Status::OK();
    if (i > 0 && Compare(kind, db_flags, prev, key) >= 0) {
      return Fail(where, page, "key " + std::to_string(i) + " is not above the key before it");
    }
    if (range.has_lo && Compare(kind, db_flags, key, range.lo) < 0) {
      return Fail(where, page, "key " + std::to_string(i) + " is below the range its parent gives");
    }
    if (range.has_hi && Compare(kind, db_flags, key, range.hi) >= 0) {
      return Fail(where, page,
                  "key " + std::to_string(i) + " is not below the range its parent gives");
    }
    return Status::OK();
  }

  // Checks the header of a branch or leaf page (or inline sub-page) of `size` bytes at `p`, and
  // returns its number of keys.
  Result<size_t> CheckHeader(const std::string& where, uint64_t page, const uint8_t* p, size_t size,
                             uint16_t want_type) {
    const uint16_t flags = U16(p + 10) & ~(kDirty | kKeep);
    if (flags != want_type) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "page flags 0x%x, expected 0x%x", flags, want_type);
      return Fail(where, page, buf);
    }
    const uint16_t lower = U16(p + 12), upper = U16(p + 14);
    if (lower < kPageHeader || lower > upper || upper > size || (lower - kPageHeader) % 2 != 0) {
      return Fail(where, page,
                  "free space bounds " + std::to_string(lower) + ".." + std::to_string(upper) +
                      " outside the page");
    }
    const size_t n = (lower - kPageHeader) / 2;
    if (n == 0) return Fail(where, page, "page holds no keys");
    return n;
  }

  // The node `i` of a (non-LEAF2) page: its offset, checked to leave room for the node header.
  Result<size_t> NodeOffset(const std::string& where, uint64_t page, const uint8_t* p, size_t size,
                            size_t i) {
    const uint16_t upper = U16(p + 14);
    const size_t off = U16(p + kPageHeader + 2 * i);
    if (off < upper || off % 2 != 0 || off + kNodeHeader > size) {
      return Fail(where, page,
                  "node " + std::to_string(i) + " offset " + std::to_string(off) +
                      " outside the page's node area");
    }
    return off;
  }

  Status WalkPage(const DbRecord& db, TreeKind kind, const std::string& where, uint16_t db_flags,
                  uint64_t page, int depth, const Range& range, TreeCounts* counts) {
    SHOTDB_RETURN_IF_ERROR(Mark(where, page, 1));
    const uint8_t* p = map_ + page * psize_;
    if (U64(p) != page) {
      return Fail(where, page, "page header says page " + std::to_string(U64(p)));
    }
    const bool leaf = depth == db.depth;
    const bool leaf2 = leaf && kind == TreeKind::kDupTree && (db_flags & kDbDupFixed);
    const uint16_t want = leaf ? (leaf2 ? kLeaf | kLeaf2 : kLeaf) : kBranch;
    SHOTDB_ASSIGN_OR_RETURN(size_t n, CheckHeader(where, page, p, psize_, want));
    if (leaf) {
      ++counts->leaf;
      return WalkLeaf(db, kind, where, db_flags, page, p, psize_, n, range, counts);
    }
    ++counts->branch;
    std::vector<std::pair<std::string_view, uint64_t>> children;
    children.reserve(n);
    std::string_view prev;
    for (size_t i = 0; i < n; ++i) {
      SHOTDB_ASSIGN_OR_RETURN(size_t off, NodeOffset(where, page, p, psize_, i));
      const uint8_t* node = p + off;
      const size_t ksize = U16(node + 6);
      if (off + kNodeHeader + ksize > psize_) {
        return Fail(where, page, "node " + std::to_string(i) + " key runs past the page");
      }
      const uint64_t child =
          U16(node) | (uint64_t{U16(node + 2)} << 16) | (uint64_t{U16(node + 4)} << 32);
      std::string_view key(reinterpret_cast<const char*>(node + kNodeHeader), ksize);
      if (i > 0)
        SHOTDB_RETURN_IF_ERROR(CheckOrder(kind, db_flags, where, page, i, key, prev, range));
      prev = key;
      children.emplace_back(key, child);
    }
    for (size_t i = 0; i < n; ++i) {
      Range sub = range;
      if (i > 0) {
        sub.lo = children[i].first;
        sub.has_lo = true;
      }
      if (i + 1 < n) {
        sub.hi = children[i + 1].first;
        sub.has_hi = true;
      }
      SHOTDB_RETURN_IF_ERROR(
          WalkPage(db, kind, where, db_flags, children[i].second, depth + 1, sub, counts));
    }
    return Status::OK();
  }

  // Checks an overflow run holding `size` bytes, and returns its data.
  // Without full_, the run of a named DB's value is not read (only its bounds are checked): LMDB's
  // readers use the node's size and first page only; the run's own header matters to writers,
  // which free the run by its page count.
  Result<const uint8_t*> Overflow(TreeKind kind, const std::string& where, uint64_t page, size_t i,
                                  const uint8_t* node, uint64_t size, TreeCounts* counts) {
    const uint64_t first = U64(node + kNodeHeader + U16(node + 6));
    const uint64_t need = (kPageHeader - 1 + size) / psize_ + 1;
    if (first < 2 || first >= pages_ || first >= file_pages_) {
      return Fail(where, page,
                  "node " + std::to_string(i) + " overflow page " + std::to_string(first) +
                      " outside the snapshot");
    }
    const uint8_t* o = map_ + first * psize_;
    if (!full_ && kind == TreeKind::kNamed) {
      SHOTDB_RETURN_IF_ERROR(Mark(where, first, need));
      counts->overflow += need;
      return o + kPageHeader;
    }
    const uint64_t count = U32(o + 12);
    if (U64(o) != first || (U16(o + 10) & ~(kDirty | kKeep)) != kOverflow || count < need) {
      return Fail(where, first,
                  "overflow run of node " + std::to_string(i) + " of page " + std::to_string(page) +
                      " damaged (header)");
    }
    SHOTDB_RETURN_IF_ERROR(Mark(where, first, count));
    counts->overflow += count;
    return o + kPageHeader;
  }

  Status WalkLeaf(const DbRecord& db, TreeKind kind, const std::string& where, uint16_t db_flags,
                  uint64_t page, const uint8_t* p, size_t size, size_t n, const Range& range,
                  TreeCounts* counts) {
    const bool leaf2 = (U16(p + 10) & kLeaf2) != 0;
    if (leaf2) {
      const size_t ksize = (U16(p + 10) & kSubPage) ? U16(p + 8) : db.pad;
      if (ksize == 0 || kPageHeader + n * ksize > size) {
        return Fail(where, page,
                    std::to_string(n) + " fixed-size keys of " + std::to_string(ksize) +
                        " bytes overrun the page");
      }
      // Every duplicate of a DUPFIXED database has one size: a damaged size field in one
      // sub-page (or sub-database record) would make LMDB split its items differently.
      if (fixed_size_ == 0) fixed_size_ = ksize;
      if (ksize != fixed_size_) {
        return Fail(where, page,
                    "fixed-size duplicates of " + std::to_string(ksize) +
                        " bytes, elsewhere in this database " + std::to_string(fixed_size_));
      }
      std::string_view prev;
      for (size_t i = 0; i < n; ++i) {
        std::string_view key(reinterpret_cast<const char*>(p + kPageHeader + i * ksize), ksize);
        SHOTDB_RETURN_IF_ERROR(CheckOrder(kind, db_flags, where, page, i, key, prev, range));
        prev = key;
      }
      counts->entries += n;
      return Status::OK();
    }
    std::string_view prev;
    for (size_t i = 0; i < n; ++i) {
      SHOTDB_ASSIGN_OR_RETURN(size_t off, NodeOffset(where, page, p, size, i));
      const uint8_t* node = p + off;
      const uint16_t flags = U16(node + 4);
      const size_t ksize = U16(node + 6);
      const uint64_t dsize = U16(node) | (uint64_t{U16(node + 2)} << 16);
      if (flags & ~(kBigData | kSubData | kDupData)) {
        return Fail(where, page, "node " + std::to_string(i) + " has unknown flags");
      }
      const size_t stored = (flags & kBigData) ? 8 : dsize;
      if (off + kNodeHeader + ksize + stored > size) {
        return Fail(where, page, "node " + std::to_string(i) + " runs past the page");
      }
      std::string_view key(reinterpret_cast<const char*>(node + kNodeHeader), ksize);
      SHOTDB_RETURN_IF_ERROR(CheckOrder(kind, db_flags, where, page, i, key, prev, range));
      prev = key;
      const uint8_t* data = node + kNodeHeader + ksize;
      const bool dupsort = kind == TreeKind::kNamed && (db_flags & kDbDupSort);
      if (kind == TreeKind::kDupTree) {  // a duplicate is a key with no data
        if (flags != 0 || dsize != 0) {
          return Fail(where, page, "duplicate " + std::to_string(i) + " carries data");
        }
        ++counts->entries;
      } else if (flags & kBigData) {
        if (flags != kBigData) {
          return Fail(where, page, "node " + std::to_string(i) + " has conflicting flags");
        }
        SHOTDB_ASSIGN_OR_RETURN(data, Overflow(kind, where, page, i, node, dsize, counts));
        if (kind == TreeKind::kFree) SHOTDB_RETURN_IF_ERROR(FreeList(where, page, data, dsize));
        ++counts->entries;
      } else if (flags == kSubData) {  // a named DB, in the main DB
        if (kind != TreeKind::kMain || dsize != kDbRecord) {
          return Fail(where, page, "node " + std::to_string(i) + " is a misplaced sub-database");
        }
        named_.emplace_back(std::string(key), ParseDb(data));
        ++counts->entries;
      } else if (flags & kDupData) {
        if (!dupsort) {
          return Fail(where, page, "node " + std::to_string(i) + " has duplicates in a DB without");
        }
        const std::string sub = where + " (duplicates of key " + std::to_string(i) + ")";
        if (flags & kSubData) {
          if (dsize != kDbRecord) {
            return Fail(where, page, "node " + std::to_string(i) + " sub-database record size");
          }
          const DbRecord dups = ParseDb(data);
          // A sub-database's pages count in its own record, not in this tree's (WalkTree adds
          // them to the totals); its entries count here.
          SHOTDB_RETURN_IF_ERROR(WalkTree(dups, TreeKind::kDupTree, sub, db_flags));
          counts->entries += dups.entries;
        } else {
          if (dsize < kPageHeader) {
            return Fail(where, page, "node " + std::to_string(i) + " sub-page too small");
          }
          const uint16_t want = kLeaf | kSubPage | ((db_flags & kDbDupFixed) ? kLeaf2 : 0);
          SHOTDB_ASSIGN_OR_RETURN(size_t m, CheckHeader(sub, page, data, dsize, want));
          DbRecord inline_db;
          inline_db.depth = 1;
          SHOTDB_RETURN_IF_ERROR(WalkLeaf(inline_db, TreeKind::kDupTree, sub, db_flags, page, data,
                                          dsize, m, Range{}, counts));
        }
      } else if (flags != 0) {
        return Fail(where, page, "node " + std::to_string(i) + " has conflicting flags");
      } else {
        if (kind == TreeKind::kFree) SHOTDB_RETURN_IF_ERROR(FreeList(where, page, data, dsize));
        ++counts->entries;
      }
    }
    return Status::OK();
  }

  // One record of the free-page DB: a count, then that many page numbers.
  Status FreeList(const std::string& where, uint64_t page, const uint8_t* data, uint64_t size) {
    if (size < 8 || size % 8 != 0 || U64(data) != size / 8 - 1) {
      return Fail(where, page, "free-page list of " + std::to_string(size) + " bytes is damaged");
    }
    for (uint64_t j = 1; j < size / 8; ++j) free_list_.push_back(U64(data + 8 * j));
    return Status::OK();
  }

  const bool full_;
  size_t fixed_size_ = 0;  // the duplicates' size in the named DB being walked (0: none yet)
  const uint8_t* map_;
  uint64_t file_pages_;
  uint32_t psize_;
  uint64_t pages_;
  std::string file_;
  std::vector<bool> seen_;
  std::vector<std::pair<std::string, DbRecord>> named_;
  std::vector<uint64_t> free_list_;
  StructureStats* stats_ = nullptr;
};

// A read-only mapping of a file, unmapped on every path out.
struct Mapping {
  void* addr = MAP_FAILED;
  size_t size = 0;
  ~Mapping() {
    if (addr != MAP_FAILED) ::munmap(addr, size);
  }
};

}  // namespace

Result<StructureStats> CheckLmdbStructure(MDB_env* env, StructureCheck depth) {
  const char* dir = nullptr;
  mdb_filehandle_t fd;
  MDB_stat st;
  int rc;
  if ((rc = mdb_env_get_path(env, &dir)) != MDB_SUCCESS ||
      (rc = mdb_env_get_fd(env, &fd)) != MDB_SUCCESS ||
      (rc = mdb_env_stat(env, &st)) != MDB_SUCCESS) {
    return ToStatus(rc, "structure check: environment");
  }
  const std::string file = std::string(dir) + "/data.mdb";
  const uint32_t psize = st.ms_psize;
  // The read transaction pins the snapshot; its id names the meta page that describes it. A writer
  // that commits twice between mdb_txn_begin and reading the metas overwrites that page: retry.
  for (int attempt = 0; attempt < 16; ++attempt) {
    MDB_txn* txn = nullptr;
    if ((rc = mdb_txn_begin(env, nullptr, MDB_RDONLY, &txn)) != MDB_SUCCESS) {
      return ToStatus(rc, file + ": structure check: begin read transaction");
    }
    struct Abort {
      MDB_txn* txn;
      ~Abort() { mdb_txn_abort(txn); }
    } abort_guard{txn};
    const uint64_t txnid = mdb_txn_id(txn);
    struct ::stat fst;
    if (::fstat(fd, &fst) != 0) return Status::IOError(file + ": fstat: " + std::strerror(errno));
    const uint64_t file_pages = static_cast<uint64_t>(fst.st_size) / psize;
    if (file_pages < 2) return Status::Corruption(file + ": shorter than its two meta pages");
    Mapping m;
    m.size = file_pages * psize;
    m.addr = ::mmap(nullptr, m.size, PROT_READ, MAP_SHARED, fd, 0);
    if (m.addr == MAP_FAILED) return Status::IOError(file + ": mmap: " + std::strerror(errno));
    // The walk jumps between tree pages spread over the file: read ahead nothing around them (on a
    // cold store, readahead would pull in the payload pages between them).
    ::madvise(m.addr, m.size, MADV_RANDOM);
    const uint8_t* map = static_cast<const uint8_t*>(m.addr);
    const uint8_t* meta = nullptr;
    for (int i = 0; i < 2; ++i) {
      const uint8_t* p = map + i * psize;
      const uint8_t* mm = p + kPageHeader;
      if ((U16(p + 10) & kMeta) && U32(mm) == kMagic && U32(mm + 4) == kDataVersion &&
          U64(mm + kMetaTxnId) == txnid) {
        meta = mm;
      }
    }
    if (meta == nullptr) continue;  // overwritten meanwhile
    const DbRecord free_db = ParseDb(meta + kMetaDbs);
    const DbRecord main_db = ParseDb(meta + kMetaDbs + kDbRecord);
    if (free_db.pad != psize) {
      return Status::Corruption(file + ": meta page records page size " +
                                std::to_string(free_db.pad) + ", LMDB uses " +
                                std::to_string(psize));
    }
    const uint64_t pages = U64(meta + kMetaLastPage) + 1;
    if (pages < 2 || pages > (uint64_t{1} << 40)) {
      return Status::Corruption(file + ": meta page records " + std::to_string(pages) + " pages");
    }
    Checker checker(map, file_pages, psize, pages, file, depth == StructureCheck::kFull);
    StructureStats stats;
    SHOTDB_RETURN_IF_ERROR(checker.Run(free_db, main_db, &stats));
    return stats;
  }
  return Status::IOError(file + ": structure check: the store changed under 16 attempts");
}

}  // namespace lmdb
}  // namespace shotdb
