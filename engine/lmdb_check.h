// A structural check of an LMDB data file that does not trust the file (internal to the engine).
//
// LMDB 0.9 keeps no page checksums and trusts every page it reads: one damaged byte in a page
// header, a node offset or a child page number can make a lookup read outside the map and crash
// the process, or hide a whole subtree so that its keys read as absent. CheckLmdbStructure reads
// data.mdb itself (its own read-only mapping, every access bounds-checked) and walks every B-tree
// of one committed snapshot: the free-page DB, the main DB, every named DB and every sorted-dups
// sub-tree (inline sub-pages and sub-databases). It checks
//   - each page: its page number, its type for its place in the tree (branch, leaf, LEAF2 leaf,
//     overflow), the bounds of its free space, and every node lying inside the page;
//   - each node: known flags, sizes that fit the page (or its overflow run, which must lie inside
//     the file), child page numbers below the snapshot's last page, keys in strictly increasing
//     order within a page and within the key range its parent gives it;
//   - each tree: all leaves at the recorded depth, and the recorded branch, leaf, overflow page and
//     entry counts equal to those found;
//   - the file: every page of the snapshot is the meta pages, in exactly one tree, or listed free
//     exactly once (LMDB's own page audit).
// When it passes, no read of that snapshot through LMDB leaves the file's pages, and no key is
// hidden by a damaged page (a hidden subtree breaks the counts).
//
// Two depths. kFull does all of the above. kTrees (for readers) skips what only writers depend
// on: it does not read the first page of each large value's overflow run (LMDB's readers use the
// node's page number and size, which are checked against the file; its writers free a run by the
// page count in that header), and so cannot audit that every page is used exactly once; pages
// reached twice are still found. A large value's first page is a random read into the file, so on
// a store of many K/V records kTrees reads a small fraction of the pages kFull does. It does not
// check values (the store's record checksums do) and cannot tell a damaged key that still sorts in
// place from a real one.
//
// Reads LMDB's on-disk format of version 1 (LMDB 0.9.x, MDB_DEVEL off) on a 64-bit little-endian
// host. Writers may run meanwhile: the check holds a read transaction on the snapshot it walks,
// so that none of its pages is reused.
#ifndef SHOTDB_ENGINE_LMDB_CHECK_H_
#define SHOTDB_ENGINE_LMDB_CHECK_H_

#include <lmdb.h>

#include <cstdint>

#include "util/status.h"

namespace shotdb {
namespace lmdb {

// What the check found, for reports.
struct StructureStats {
  uint64_t pages = 0;         // pages of the snapshot (the last page number + 1)
  uint64_t branch_pages = 0;  // all trees together, sub-databases included
  uint64_t leaf_pages = 0;
  uint64_t overflow_pages = 0;  // pages of large values (K/V payload records, mostly)
  uint64_t free_pages = 0;      // listed in the free-page DB
  uint64_t named_dbs = 0;
};

enum class StructureCheck { kTrees, kFull };

// Checks the newest committed snapshot of the open environment `env`. Returns the stats,
// Corruption naming the file, the database and the page at the first damage found, or IOError.
// Takes time in proportion to the tree pages (kFull: plus one page per large value; never the
// payload bytes): docs/storage.md has figures. With kTrees, overflow_pages counts the pages the
// values' sizes need.
Result<StructureStats> CheckLmdbStructure(MDB_env* env,
                                          StructureCheck depth = StructureCheck::kFull);

}  // namespace lmdb
}  // namespace shotdb

#endif  // SHOTDB_ENGINE_LMDB_CHECK_H_
